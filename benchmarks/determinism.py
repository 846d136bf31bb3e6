"""Does `convert --deterministic` make a GPU conversion repeatable, and what does it cost? Twin runs of one seed.

    python benchmarks/determinism.py [--json PATH]     # on a GPU machine (torch, timm, accelerate; offline)
    python benchmarks/determinism.py --dry-run         # tiny sizes on the CPU (~1 minute): checks the script
    benchmarks/gpu_determinism.sh                      # the three models at once on a lent GPU, one record back

Per model (random weights saved as a local folder; ImageNet-like JPEGs from run.write_jpegs), the real command
line converts four times with one seed, each in its own process as a user runs it: with --deterministic, without,
without, with (the order balances drift). The record holds, per model and setting, the largest absolute difference
between the twins' weights (model.safetensors) and the conversion's seconds (certify_zoo.json), or the error line
of a run that stopped; ``table`` is what the docs render. Default path: $OUT/determinism.json, else ./determinism.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from run import build_model, machine_description, write_jpegs  # noqa: E402

GPU_MODELS = ("resnet50", "convnext_base", "vit_base_patch16_224")
DRY_RUN_MODELS = ("resnet10t", "vit_tiny_patch16_224")
FULL = dict(image_size=224, batch=32, steps=20, check_images=32)
DRY_RUN = dict(image_size=32, batch=4, steps=3, check_images=8)
ORDER = (True, False, False, True)  # --deterministic per run


def largest_difference(first: Path, second: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()), default=0.0)


def conversion(model: Path, data: Path, out: Path, size: dict, deterministic: bool) -> dict:
    """One `certify-zoo convert` in a fresh process (the CLI sets cuBLAS's workspace before CUDA starts)."""
    command = [sys.executable, "-m", "certify_zoo", "convert", str(model), "--data", str(data), "--out", str(out),
               "--max-steps", str(size["steps"]), "--batch-size", str(size["batch"]), "--check-images",
               str(size["check_images"]), "--sigma", "0.25", "--seed", "0"] + (["--deterministic"] if deterministic else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    run = {"deterministic": deterministic, "process_seconds": round(time.perf_counter() - started, 2)}
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {**run, "error": lines[-1][:300] if lines else f"exit {done.returncode}"}
    metadata = json.loads((out / "certify_zoo.json").read_text())
    return {**run, "seconds": metadata["seconds"], "self_check_seconds": metadata.get("self_check_seconds")}


def summary(arch: str, work: Path, runs: list[dict]) -> dict:
    """The twins' weight difference and seconds per setting, from the runs done so far (of ORDER, in order)."""
    result = {"arch": arch, "runs": runs}
    for flag, name in ((True, "deterministic"), (False, "default")):
        indices = [i for i, chosen in enumerate(ORDER[:len(runs)]) if chosen == flag]
        finished = [i for i in indices if "error" not in runs[i]]
        result[name] = {"max_abs_weight_difference": (largest_difference(work / f"{arch}-{finished[0]}",
                                                                          work / f"{arch}-{finished[1]}")
                                                      if len(finished) == 2 else None),
                        "seconds": [runs[i]["seconds"] for i in finished],
                        "error": next((runs[i]["error"] for i in indices if "error" in runs[i]), None)}
    seconds = [statistics.mean(result[name]["seconds"]) if result[name]["seconds"] else None
               for name in ("deterministic", "default")]
    result["seconds_ratio"] = seconds[0] / seconds[1] if None not in seconds else None
    return result


def twins(arch: str, work: Path, data: Path, size: dict, done: Callable[[dict], None]) -> dict:
    """The four runs of one model; ``done`` receives the summary after each (a run cut short keeps the others)."""
    model = work / arch
    build_model(arch, size["image_size"], torch.device("cpu")).save(model)
    runs, result = [], {}
    for index, flag in enumerate(ORDER):
        runs.append(conversion(model, data, work / f"{arch}-{index}", size, flag))
        print(f"{arch} run {index + 1}/{len(ORDER)}: {json.dumps(runs[-1])}", flush=True)
        result = summary(arch, work, runs)
        done(result)
    return result


def table(models: list[dict], size: dict) -> dict:
    def difference(block: dict) -> str:
        if block["error"]:
            return f"stopped: {block['error']}"
        value = block["max_abs_weight_difference"]
        return "-" if value is None else "0 (identical)" if value == 0 else f"{value:.2e}"

    rows = [[m["arch"], difference(m["default"]), difference(m["deterministic"]),
             f"{m['seconds_ratio']:.2f}x" if m["seconds_ratio"] else "-"] for m in models]
    return {"columns": [f"model ({size['steps']} steps, batch {size['batch']}, {size['image_size']} px)",
                        "twin runs without --deterministic: largest weight difference",
                        "with --deterministic", "time with / without"], "rows": rows}


def merged(records: list[dict]) -> dict:
    """One record of several runs' models (a lent machine sends back a few files only), in the order given."""
    record = {**records[0], "models": [model for part in records for model in part["models"]]}
    record["table"] = table(record["models"], record["size"])
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="twin conversions of one seed, with and without --deterministic")
    parser.add_argument("--dry-run", action="store_true", help="tiny models and sizes on the CPU (checks the script)")
    parser.add_argument("--models", nargs="*", help="timm architectures (default: three ImageNet families)")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "determinism.json")
    parser.add_argument("--merge", type=Path, nargs="+", help="join these records into --json instead of measuring")
    parser.add_argument("--note", help="how the runs shared the machine, kept in the record")
    args = parser.parse_args(argv)
    if args.merge:
        record = merged([json.loads(path.read_text()) for path in args.merge])
        record["note"] = args.note or record.get("note")
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        return record
    size = DRY_RUN if args.dry_run else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    archs = args.models or (DRY_RUN_MODELS if args.dry_run else GPU_MODELS)
    record = {"check": "determinism", "dry_run": args.dry_run, "machine": machine_description(device),
              "command": "python benchmarks/determinism.py" + (" --dry-run" if args.dry_run else ""),
              "date": time.strftime("%Y-%m-%d"), "size": size, "models": []}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        data = work / "images"
        data.mkdir()
        write_jpegs(data, size["steps"] * size["batch"] + size["check_images"])
        for arch in archs:
            def save(model: dict) -> None:  # after every run: a cut-short call keeps what it measured
                record["models"] = [m for m in record["models"] if m["arch"] != arch] + [model]
                record["table"] = table(record["models"], size)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(record, indent=1) + "\n")

            twins(arch, work, data, size, save)
    return record


if __name__ == "__main__":
    main()
