"""Gather what benchmarks/gpu_session.sh measured on a GPU machine into one record for the docs.

    python benchmarks/gpu_record.py --from DIR --code "commit ..." --out docs/records/gpu.json

DIR holds gpu_check.json, gpu_demo.json and (optional) gpu_conversion_safety.json as the session wrote them; they
are kept unedited under "check", "demo" and "efficientnet_lite2". ``--code`` says which commit's tree ran: the
device's copy of a checkout may report a stale HEAD.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def gpu_record(folder: Path, code: str, date: str, note: str = "") -> dict:
    check = json.loads((folder / "gpu_check.json").read_text())
    demo = json.loads((folder / "gpu_demo.json").read_text())
    safety_file = folder / "gpu_conversion_safety.json"
    safety = json.loads(safety_file.read_text()) if safety_file.is_file() else None
    machine = check["machine"]
    record = {
        "title": "A lent GPU: the benchmark's tables, the demo end to end, the real EfficientNet-Lite2's conversion",
        "provenance": {
            "command": "benchmarks/gpu_session.sh OUT WORK (gpu_check.py; scripts/record_demo.py; "
                       "conversion_safety.py --defaults-only), then python benchmarks/gpu_record.py --from OUT",
            "date": date, "code": code,
            "machine": f"{machine.get('gpu')}, {machine.get('cpu_cores_available')} CPU cores, torch "
                       f"{machine.get('torch')}, CUDA {machine.get('cuda')}, Python {machine.get('python')}",
            "source": "the scripts' own JSON, unedited, under check / demo / efficientnet_lite2" + note},
        "check": check, "demo": demo}
    if safety is not None:
        record["efficientnet_lite2"] = safety["efficientnet_lite2"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="folder", type=Path, required=True)
    parser.add_argument("--code", required=True, help="the commit whose tree ran, and any difference")
    parser.add_argument("--date", required=True)
    parser.add_argument("--note", default="", help="appended to the provenance's source")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.write_text(json.dumps(gpu_record(args.folder, args.code, args.date, args.note), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
