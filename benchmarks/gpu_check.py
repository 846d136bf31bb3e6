"""The first minutes on a lent GPU: the benchmark's tables at ImageNet scale, in under 4 minutes, offline.

    benchmarks/gpu_check.sh [--json PATH]     # on the GPU machine (torch, timm, accelerate; no `datasets`, no network)
    benchmarks/gpu_check.sh --dry-run         # tiny sizes on the CPU, < 1 minute: checks the script itself

resnet50, convnext_base and vit_base_patch16_224 at 224 px with random weights (nothing is downloaded):
conversion steps (plain cross-entropy, the fidelity-only floor, jl, a lazy period, the paper's estimator and the
generic recipe's "default" step) at batch 64 with CUDA peak memory, deterministic and Monte-Carlo certification
throughput at batch 128 in float32 and bf16 (with the largest radius difference), the product's data pipeline,
and the JPEG decode rate: PIL and torchvision on the CPU, torchvision (nvjpeg) on the GPU. The record has the
layout of ``benchmarks/run.py --json`` (its tables render it) plus ``jpeg_decode``; it is written after every
model, so a run cut short still leaves what it measured. Default path: $OUT/gpu_check.json, else ./gpu_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (DEFAULT, MODELS, bench_certification, bench_conversion, bench_data, build_model,  # noqa: E402
                 default_step, interleaved_medians, machine_description, markdown_tables, step_configurations,
                 write_jpegs)

GPU_MODELS = {"cnn": "resnet50", "convnext": "convnext_base", "vit": "vit_base_patch16_224"}
STEPS = ("fidelity only", "jl (1 probe)", "jl lazy k=4", "paper (6 reps)", DEFAULT)
# (image size, certification batch, conversion batch, repeats, MC n0 and n measured per image, JPEG files)
FULL = dict(image_size=224, batch=128, conversion_batch=64, repeats=3, mc=(4, 32), jpegs=256)
DRY_RUN = dict(image_size=32, batch=4, conversion_batch=2, repeats=1, mc=(2, 4), jpegs=8)


def bench_jpeg_decode(folder: Path, device: torch.device, repeats: int) -> dict:
    """Decoded JPEGs per second: PIL one by one (what the product's DataLoader workers do), torchvision on the CPU
    (one thread), and torchvision on the GPU (nvjpeg, the whole list at once) when there is one."""
    from PIL import Image
    from torchvision.io import decode_jpeg, read_file

    paths = sorted(folder.glob("*.jpg"))
    encoded = [read_file(str(path)) for path in paths]

    def pil():
        for path in paths:
            with Image.open(path) as image:
                image.convert("RGB")

    try:  # asked once, outside the timed calls: torchvision before 0.19 decodes one image per call
        decode_jpeg(encoded[:1])
        torchvision_cpu = lambda: decode_jpeg(encoded)  # noqa: E731
    except RuntimeError:
        torchvision_cpu = lambda: [decode_jpeg(data) for data in encoded]  # noqa: E731

    variants = {"pil_cpu": pil, "torchvision_cpu": torchvision_cpu}
    if device.type == "cuda":
        variants["torchvision_cuda"] = lambda: decode_jpeg(encoded, device=device)
    seconds = interleaved_medians(variants, repeats, 1, device)
    return {"images": len(paths), "size": "500x375", "images_per_s": {k: len(paths) / v for k, v in seconds.items()}}


def jpeg_table(decode: dict) -> str:
    rates = decode["images_per_s"]
    return "\n".join([f"**JPEG decode** ({decode['images']} files of {decode['size']}, images/s)", "",
                      "| " + " | ".join(rates) + " |", "|" + "---|" * len(rates),
                      "| " + " | ".join(f"{v:.0f}" for v in rates.values()) + " |"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="GPU readiness check: step ratios, memory, certification and "
                                     "JPEG decode throughput in a few minutes")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes and models on the CPU (checks the script)")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    size = DRY_RUN if args.dry_run else FULL
    models = dict(MODELS) if args.dry_run else GPU_MODELS
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    bf16 = True  # on the CPU too in a dry run: the bf16 paths are what the GPU run needs to work
    result = {"machine": machine_description(device), "check": "gpu_check", "dry_run": args.dry_run,
              "image_size": size["image_size"], "repeats": size["repeats"], "default_estimator": DEFAULT,
              "default_step": default_step(), "models": {}}

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f}s] {message}", file=sys.stderr, flush=True)

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_jpegs(folder, size["jpegs"])
        progress(f"JPEG decode on {device}")
        result["jpeg_decode"] = bench_jpeg_decode(folder, device, size["repeats"])
        for key, arch in models.items():
            progress(f"{arch}: certification")
            model = build_model(arch, size["image_size"], device)
            row = {"arch": arch, "certification": bench_certification(model, size["batch"], size["image_size"],
                                                                      device, size["repeats"], *size["mc"], bf16)}
            if "data" not in result:
                progress("data pipeline (PIL decode + the model's timm transform, DataLoader)")
                result["data"] = bench_data(model, folder, size["batch"], device, size["repeats"])
            del model
            progress(f"{arch}: conversion steps")
            row["conversion"] = bench_conversion(arch, size["conversion_batch"], size["image_size"], device,
                                                 size["repeats"], step_configurations(STEPS), bf16=bf16)
            result["models"][key] = row
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    result["seconds"] = time.perf_counter() - started
    save()
    print(markdown_tables(result))
    print()
    print(jpeg_table(result["jpeg_decode"]))
    progress(f"done; record in {args.json}")
    return result


if __name__ == "__main__":
    main()
