"""Does `--deterministic` make a GPU conversion (and evaluation) repeatable, and what does it cost? Twin runs.

    python benchmarks/determinism.py [--json PATH]     # on a GPU machine (torch, timm, accelerate; offline)
    python benchmarks/determinism.py --dry-run         # tiny sizes on the CPU (~1 minute): checks the script
    python benchmarks/determinism.py --evaluate        # twin evaluations instead (one process, seconds per run)
    benchmarks/gpu_determinism.sh                      # the three models at once on a lent GPU, one record back

Per model (random weights saved as a local folder; ImageNet-like JPEGs from run.write_jpegs), the real command
line converts four times with one seed, each in its own process as a user runs it: with --deterministic, without,
without, with (the order balances drift). The record holds, per model and setting, the largest absolute difference
between the twins' weights (model.safetensors) and the conversion's seconds (certify_zoo.json), or the error line
of a run that stopped; ``table`` is what the docs render. Default path: $OUT/determinism.json, else ./determinism.json.

``--evaluate``: the same order of four evaluations of the random model (sigma 0.25, Monte-Carlo on every image, the
PGD audit of every image: each image is filed under the class the model predicts, so every one is attacked), in
this process through the API; per setting, how many images' rows (radii, Monte-Carlo prediction and radius, PGD
counterexample) differ between the twins and the largest radius difference; record ``evaluate_table``.
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

from certify_zoo.guards import CUBLAS_WORKSPACE  # noqa: E402
from run import build_model, machine_description, write_jpegs  # noqa: E402

GPU_MODELS = ("resnet50", "convnext_base", "vit_base_patch16_224")
DRY_RUN_MODELS = ("resnet10t", "vit_tiny_patch16_224")
FULL = dict(image_size=224, batch=32, steps=20, check_images=32, images=64, mc_samples=1000)
DRY_RUN = dict(image_size=32, batch=4, steps=3, check_images=8, images=8, mc_samples=20)
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
               str(size["check_images"]), "--sigma", "0.25", "--seed", "0"] \
        + (["--deterministic"] if deterministic else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    run = {"deterministic": deterministic, "process_seconds": round(time.perf_counter() - started, 2)}
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {**run, "error": lines[-1][:300] if lines else f"exit {done.returncode}"}
    metadata = json.loads((out / "certify_zoo.json").read_text())
    return {**run, "seconds": metadata["seconds"], "self_check_seconds": metadata.get("self_check_seconds")}


def summary(arch: str, runs: list[dict], apart: Callable[[int, int], dict]) -> dict:
    """Per setting, how its twins differ (``apart`` of the two runs' indices, once both finished) and their seconds,
    from the runs done so far (of ORDER, in order)."""
    result = {"arch": arch, "runs": runs}
    for flag, name in ((True, "deterministic"), (False, "default")):
        indices = [i for i, chosen in enumerate(ORDER[:len(runs)]) if chosen == flag]
        finished = [i for i in indices if "error" not in runs[i]]
        result[name] = {**(apart(*finished) if len(finished) == 2 else {}),
                        "seconds": [runs[i]["seconds"] for i in finished],
                        "error": next((runs[i]["error"] for i in indices if "error" in runs[i]), None)}
    seconds = [statistics.mean(result[name]["seconds"]) if result[name]["seconds"] else None
               for name in ("deterministic", "default")]
    result["seconds_ratio"] = seconds[0] / seconds[1] if None not in seconds else None
    return result


def twins(arch: str, run: Callable[[int, bool], dict], apart: Callable[[int, int], dict],
          done: Callable[[dict], None]) -> dict:
    """The four runs of one model in ORDER (``run(index, deterministic)``); ``done`` receives the summary after
    each (a call cut short keeps the runs it finished)."""
    runs, result = [], {}
    for index, flag in enumerate(ORDER):
        runs.append(run(index, flag))
        print(f"{arch} run {index + 1}/{len(ORDER)}: {json.dumps(runs[-1])}", flush=True)
        result = summary(arch, runs, apart)
        done(result)
    return result


def conversion_twins(arch: str, work: Path, images: Path, size: dict, done: Callable[[dict], None]) -> dict:
    model = work / arch
    build_model(arch, size["image_size"], torch.device("cpu")).save(model)
    return twins(arch, lambda index, flag: conversion(model, images, work / f"{arch}-{index}", size, flag),
                 lambda i, j: {"max_abs_weight_difference": largest_difference(work / f"{arch}-{i}",
                                                                               work / f"{arch}-{j}")}, done)


def labelled_by_the_model(model: Path, images: Path, folder: Path) -> Path:
    """``images`` filed into class folders named by the index the model predicts for each: its audit attacks all."""
    from certify_zoo.data import unlabelled_images
    from certify_zoo.models import load_classifier

    classifier = load_classifier(str(model))
    dataset = unlabelled_images(str(images), classifier.transform())
    with torch.inference_mode():
        predicted = [int(classifier(dataset[i][0][None]).argmax()) for i in range(len(dataset))]
    for file, label in zip(dataset.files, predicted):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / file.name).write_bytes(file.read_bytes())
    return folder


def evaluation(model: Path, data: Path, out: Path, size: dict, deterministic: bool) -> dict:
    """One evaluation through the API (what `certify-zoo evaluate` runs), timed; an error is kept as its line."""
    from certify_zoo.errors import CertifyZooError
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    started = time.perf_counter()
    try:
        result = evaluate(EvaluateSettings(model=str(model), data=str(data), sigma=0.25, method="all",
                                           n=size["mc_samples"], n0=max(10, size["mc_samples"] // 10), audit="pgd",
                                           audit_steps=20, audit_restarts=1, batch_size=size["batch"], out=str(out),
                                           deterministic=deterministic))
    except CertifyZooError as error:
        return {"deterministic": deterministic, "error": str(error)[:300]}
    return {"deterministic": deterministic, "seconds": round(time.perf_counter() - started, 2),
            "attacked": result.record["audit"]["attacked"]}  # images whose gradients the audit took


def rows_apart(first: Path, second: Path) -> dict:
    """How two evaluations' per-image rows differ: images with any column unequal, the largest radius difference."""
    a, b = (json.loads((folder / "per_image.json").read_text()) for folder in (first, second))
    columns = [key for key, value in a.items() if isinstance(value, list)]
    differing = sum(any(a[key][i] != b[key][i] for key in columns) for i in range(a["num_images"]))
    radius = max((abs(x - y) for key in ("radius_raw", "mc_radius") for x, y in zip(a[key], b[key])), default=0.0)
    return {"differing_images": differing, "images": a["num_images"], "max_radius_difference": radius}


def evaluation_twins(arch: str, work: Path, images: Path, size: dict, done: Callable[[dict], None]) -> dict:
    model = work / arch
    build_model(arch, size["image_size"], torch.device("cpu")).save(model)
    data = labelled_by_the_model(model, images, work / f"{arch}-labelled")
    return twins(arch, lambda index, flag: evaluation(model, data, work / f"{arch}-evaluation-{index}", size, flag),
                 lambda i, j: rows_apart(work / f"{arch}-evaluation-{i}", work / f"{arch}-evaluation-{j}"), done)


def evaluate_table(models: list[dict], size: dict) -> dict:
    def apart(block: dict) -> str:
        if block["error"]:
            return f"stopped: {block['error']}"
        if "differing_images" not in block:
            return "-"
        if block["differing_images"] == 0:
            return "0 (identical)"
        return (f"{block['differing_images']} of {block['images']} images, radius up to "
                f"{block['max_radius_difference']:.2e}")

    rows = [[m["arch"], apart(m["default"]), apart(m["deterministic"]),
             f"{m['seconds_ratio']:.2f}x" if m["seconds_ratio"] else "-"] for m in models]
    return {"columns": [f"model ({size['images']} images, {size['image_size']} px, Monte-Carlo n = "
                        f"{size['mc_samples']}, PGD 20 steps)", "twin evaluations without --deterministic: rows apart",
                        "with --deterministic", "time with / without"], "rows": rows}


def table(models: list[dict], size: dict) -> dict:
    def difference(block: dict) -> str:
        if block["error"]:
            return f"stopped: {block['error']}"
        value = block.get("max_abs_weight_difference")
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
    evaluations = [model for part in records for model in part.get("evaluations", [])]
    if evaluations:
        record["evaluations"] = evaluations
        record["evaluate_table"] = evaluate_table(evaluations, record["size"])
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="twin conversions of one seed, with and without --deterministic")
    parser.add_argument("--dry-run", action="store_true", help="tiny models and sizes on the CPU (checks the script)")
    parser.add_argument("--models", nargs="*", help="timm architectures (default: three ImageNet families)")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "determinism.json")
    parser.add_argument("--merge", type=Path, nargs="+", help="join these records into --json instead of measuring")
    parser.add_argument("--note", help="how the runs shared the machine, kept in the record")
    parser.add_argument("--evaluate", action="store_true",
                        help="twin evaluations (--deterministic or not) instead of twin conversions")
    args = parser.parse_args(argv)
    if args.merge:
        record = merged([json.loads(path.read_text()) for path in args.merge])
        record["note"] = args.note or record.get("note")
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        return record
    size = DRY_RUN if args.dry_run else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    archs = args.models or (DRY_RUN_MODELS if args.dry_run else GPU_MODELS)
    if args.evaluate:  # before CUDA starts in this process, as the CLI sets it for --deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    record = {"check": "determinism", "dry_run": args.dry_run, "machine": machine_description(device),
              "command": "python benchmarks/determinism.py" + (" --dry-run" if args.dry_run else "")
                         + (" --evaluate" if args.evaluate else ""),
              "date": time.strftime("%Y-%m-%d"), "size": size, "models": []}
    kind = "evaluations" if args.evaluate else "models"
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        data = work / "images"
        data.mkdir()
        write_jpegs(data, size["images"] if args.evaluate else size["steps"] * size["batch"] + size["check_images"])
        for arch in archs:
            def save(model: dict) -> None:  # after every run: a cut-short call keeps what it measured
                record[kind] = [m for m in record.get(kind, []) if m["arch"] != arch] + [model]
                record["table"] = table(record["models"], size)
                if args.evaluate:
                    record["evaluate_table"] = evaluate_table(record["evaluations"], size)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(record, indent=1) + "\n")

            (evaluation_twins if args.evaluate else conversion_twins)(arch, work, data, size, save)
    return record


if __name__ == "__main__":
    main()
