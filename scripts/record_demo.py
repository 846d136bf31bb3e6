"""Run the offline demo and keep what it measured as docs/records/demo.json, with where and how it ran.

    PYTHONPATH=. python scripts/record_demo.py        # then: python scripts/render_docs.py

The README's sample output and every demo figure in docs/ are rendered from this record, so rerun it whenever a
change moves the demo's numbers (the docs test then says which pages to re-render). The records are stored as
``push`` would publish them: no local path.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from certify_zoo.demo import run_demo  # noqa: E402
from certify_zoo.export import CERTIFICATION_NAME, METADATA_NAME, read_json  # noqa: E402
from certify_zoo.public import public_records  # noqa: E402

DEFAULT_N = inspect.signature(run_demo).parameters["n"].default


def code_version() -> str:
    """The commit the demo ran, and whether the checkout had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    changed = " with uncommitted changes" if git("status", "--porcelain") else ""
    return f"commit {git('rev-parse', '--short', 'HEAD')}{changed}"


def machine() -> dict:
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"cpu": cpu, "cpu_cores_available": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "python": platform.python_version()}


def published(folder: Path) -> dict[str, dict]:
    """The folder's records as push publishes them."""
    public = public_records(folder)
    return {name: public.get(name, read_json(folder / name)) for name in (METADATA_NAME, CERTIFICATION_NAME)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="Monte-Carlo samples (the demo's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "records" / "demo.json")
    args = parser.parse_args(argv)
    code = code_version()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = run_demo(Path(tmp) / "demo", n=args.n, seed=args.seed)
        seconds = time.perf_counter() - started
        base, converted = published(result.base_dir), published(result.converted_dir)
    record = {
        "title": "The offline demo: base vs converted on the held-out 8x8 digits",
        "provenance": {"command": f"certify-zoo demo --n {args.n} --seed {args.seed}", "code": code,
                       "date": datetime.date.today().isoformat(), "machine": machine(), "seconds": round(seconds, 1),
                       "how": "scripts/record_demo.py (the demo's own functions, as the command runs them)"},
        "base": base[CERTIFICATION_NAME],
        "converted": converted[CERTIFICATION_NAME],
        "conversion": converted[METADATA_NAME],
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
