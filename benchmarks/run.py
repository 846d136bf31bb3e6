"""certify-zoo benchmarks: what a certificate and a conversion cost, as ratios measured side by side.

    PYTHONPATH=. python benchmarks/run.py            # full: 224x224, a small CNN, a ConvNeXt and a ViT
    PYTHONPATH=. python benchmarks/run.py --quick    # smoke run, < 2 minutes on 2 CPU cores

For every model (random weights built from timm configs: throughput does not depend on the weights), on the
same batch and precision (float32 on CPU, bf16 autocast on a GPU), each figure the median of repeated runs
after a warm-up, the variants of one measurement interleaved so that a busy machine slows all alike:

1. certification: images/s of the deterministic certificate (one forward, then softmax/top-2/PhiInv on the
   batch, as in ``evaluate --method deterministic``) vs plain inference (the floor); Monte-Carlo CERTIFY as
   ``evaluate --method monte-carlo`` runs it (a batch of images, each forward one noisy copy of every image):
   noisy forwards/s vs plain inference at the same batch size, and from it the seconds per image at n = 1,000
   (n0 = 100) and at n = 100,000.
2. conversion: time and peak memory of one optimiser step with each penalty estimator vs a plain
   cross-entropy fine-tuning step (same model, batch, optimiser). Peak memory: CUDA allocator peak on a
   GPU; on CPU the resident high-water mark of one step above the resident size before it, each
   configuration in a fresh process (stated in the table).
3. data: decode + preprocess throughput (JPEGs at ImageNet-like size through the model's own timm
   transform and the DataLoader the CLI uses) vs the model's inference and conversion throughput.
4. with ``--stack``: plain inference eager vs channels_last vs ``torch.compile`` (what the stack offers; the
   product uses them only where this measures a gain).

Prints markdown tables; ``--json PATH`` writes every number.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from certify_zoo.certify import Smooth, certify_deterministic  # noqa: E402
from certify_zoo.models import ImageClassifier, preprocessing_config  # noqa: E402
from certify_zoo.objective import ObjectiveSettings, boot_camp_step, effective_gamma  # noqa: E402

MODELS = {"cnn": "resnet10t", "convnext": "convnext_atto", "vit": "vit_tiny_patch16_224"}
# estimator label -> ObjectiveSettings overrides; ordered by expected memory (see the CPU memory note)
ESTIMATORS = {"jl (1 probe)": dict(estimator="jl", probes=1),
              "jl (2 probes)": dict(estimator="jl", probes=2),
              "paper (6 reps)": dict(estimator="paper")}
CHEAPEST = "jl (1 probe)"
DEFAULT = "paper (6 reps)"  # what the recipes use (see README, "Penalty estimators")
SIGMA = 0.25
MC_N0, MC_N, MC_N_STANDARD = 100, 1_000, 100_000  # per-image sample counts the seconds/image are stated at


def build_model(arch: str, image_size: int, device: torch.device, channels_last: bool = False) -> ImageClassifier:
    import timm

    extra = {"img_size": image_size} if arch.startswith("vit") else {}
    net = timm.create_model(arch, pretrained=False, num_classes=1000, **extra)
    cfg = preprocessing_config(net)
    cfg["input_size"] = (3, image_size, image_size)
    model = ImageClassifier(net, cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, warmup: int,
                        device: torch.device) -> dict[str, float]:
    """Median seconds per call of each variant, the variants taking turns within every repeat."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---------------------------------------------------------------- 1. certification

def bench_certification(model: ImageClassifier, batch: int, image_size: int, device: torch.device, repeats: int,
                        mc_n0: int, mc_n: int) -> dict:
    model.eval()
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    smooth = Smooth(model, model.num_classes, SIGMA)
    generator = torch.Generator(device=device).manual_seed(0)

    @torch.inference_mode()
    def plain():
        with autocast(device):
            return model(images)

    @torch.inference_mode()
    def deterministic():
        with autocast(device):
            cert = certify_deterministic(model(images), SIGMA)
        # what evaluate keeps per image, brought to the host once per batch
        return [t.cpu() for t in (cert.prediction, cert.p1, cert.p2, cert.radius, cert.radius_lipschitz)]

    def monte_carlo():  # as evaluate does: the whole batch, each forward one noisy copy of every image
        with autocast(device):
            return smooth.certify(images, mc_n0, mc_n, 0.001, batch, generator)

    fast = interleaved_medians({"plain": plain, "deterministic": deterministic}, repeats, 1, device)
    mc = interleaved_medians({"plain": plain, "monte_carlo": monte_carlo}, max(1, repeats // 2), 1, device)
    plain_ips = batch / fast["plain"]
    deterministic_ips = batch / fast["deterministic"]
    mc_seconds = mc["monte_carlo"]
    mc_noisy_ips = batch * (mc_n0 + mc_n) / mc_seconds
    per_image_1000 = (MC_N0 + MC_N) / mc_noisy_ips
    per_image_100k = (MC_N0 + MC_N_STANDARD) / mc_noisy_ips
    return {"batch": batch, "plain_images_per_s": plain_ips, "deterministic_images_per_s": deterministic_ips,
            "deterministic_vs_plain": deterministic_ips / plain_ips,
            "mc_measured_n0": mc_n0, "mc_measured_n": mc_n,
            "mc_noisy_forwards_per_s": mc_noisy_ips, "mc_noisy_vs_plain": mc_noisy_ips / (batch / mc["plain"]),
            "mc_seconds_per_image_n1000": per_image_1000, "mc_seconds_per_image_n100000": per_image_100k,
            "deterministic_speedup_vs_mc_n1000": per_image_1000 * deterministic_ips,
            "deterministic_speedup_vs_mc_n100000": per_image_100k * deterministic_ips}


# ---------------------------------------------------------------- 4. what the stack offers (--stack)

def bench_stack_options(arch: str, batch: int, image_size: int, device: torch.device, repeats: int) -> dict:
    """Plain inference eager vs channels_last vs torch.compile (default mode), same batch; compile time apart."""
    model = build_model(arch, image_size, device).eval()
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    channels_last_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    channels_last_images = images.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(copy.deepcopy(model))
    started = time.perf_counter()
    with torch.inference_mode(), autocast(device):
        compiled(images)
    synchronize(device)
    compile_seconds = time.perf_counter() - started

    def runner(net, x):
        @torch.inference_mode()
        def run():
            with autocast(device):
                return net(x)
        return run

    seconds = interleaved_medians({"eager": runner(model, images),
                                   "channels_last": runner(channels_last_model, channels_last_images),
                                   "compiled": runner(compiled, images)}, repeats, 1, device)
    return {"batch": batch, "compile_seconds": compile_seconds,
            **{f"{name}_images_per_s": batch / value for name, value in seconds.items()},
            "channels_last_vs_eager": seconds["eager"] / seconds["channels_last"],
            "compiled_vs_eager": seconds["eager"] / seconds["compiled"]}


# ---------------------------------------------------------------- 2. conversion (one process per model)

def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench_conversion(arch: str, batch: int, image_size: int, device: torch.device, repeats: int,
                     estimators: dict[str, dict], memory_of: Callable[[str], int] | None = None,
                     only: str | None = None) -> dict:
    """Step time and peak memory: plain cross-entropy step vs a Boot Camp step with each estimator.

    ``only``: run that configuration's step once and report its peak (the fresh-process memory worker);
    ``memory_of(name)``: how a CPU run gets each configuration's peak (from such a worker).
    """
    torch.manual_seed(0)
    student = build_model(arch, image_size, device)
    base = copy.deepcopy(student).eval().requires_grad_(False)
    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    gamma = effective_gamma(0.05, 1000)

    def plain_step():
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(student(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def estimator_step(overrides: dict) -> Callable[[], None]:
        settings = ObjectiveSettings(sigma=SIGMA, **overrides)

        def step():
            with autocast(device):
                boot_camp_step(student, base, images, settings, gamma)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    variants = {"plain cross-entropy": plain_step, **{name: estimator_step(o) for name, o in estimators.items()}}
    if only is not None:
        start_rss = _rss_bytes()
        variants[only]()
        return {"peak_bytes": _max_rss_bytes() - start_rss}
    memory: dict[str, int] = {}
    for name, run in variants.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run()
            memory[name] = torch.cuda.max_memory_allocated(device) - before
        else:
            run()  # the warm-up; the CPU high-water mark only rises, so each peak comes from its own process
            memory[name] = memory_of(name) if memory_of is not None else 0
    seconds = interleaved_medians(variants, repeats, 0, device)
    reference = "plain cross-entropy"
    return {"batch": batch, "memory_method": "cuda peak allocated" if device.type == "cuda" else
            "CPU RSS high-water of one step above the RSS before it, each configuration in fresh processes "
            "(median of 3; 1 with --quick)",
            "steps": {name: {"seconds": seconds[name], "time_vs_plain": seconds[name] / seconds[reference],
                             "peak_bytes": memory[name], "memory_vs_plain": memory[name] / max(1, memory[reference])}
                      for name in variants}}


def conversion_in_fresh_process(arch: str, args: argparse.Namespace, *extra: str) -> dict:
    """Each model's conversion numbers come from its own process (``extra``: e.g. one CPU memory peak, from one
    more)."""
    command = [sys.executable, __file__, "--conversion-worker", arch, "--image-size", str(args.image_size),
               "--conversion-batch", str(args.conversion_batch), "--repeats", str(args.repeats),
               "--threads", str(args.threads), *extra] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"conversion benchmark for {arch} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- 3. data pipeline

def write_jpegs(folder: Path, count: int) -> None:
    """ImageNet-like files: 500x375 JPEGs with smooth content plus grain (decode cost like real photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    for index in range(count):
        phase = rng.uniform(0, 6.3, size=3)
        rgb = np.stack([128 + 100 * np.sin(x / (40 + 10 * c) + y / 60 + phase[c]) for c in range(3)], -1)
        rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{index:05d}.jpg", quality=90)


def bench_data(model: ImageClassifier, folder: Path, batch: int, device: torch.device, repeats: int) -> dict:
    from torch.utils.data import DataLoader

    from certify_zoo.data import collate_skipping_unreadable, dataloader_workers, unlabelled_images

    dataset = unlabelled_images(str(folder), model.transform())
    results = {}
    for workers in sorted({0, dataloader_workers()}):
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate_skipping_unreadable,
                            pin_memory=device.type == "cuda")

        def epoch():
            return sum(b.images.shape[0] for b in loader)

        seconds = interleaved_medians({"epoch": epoch}, max(1, repeats // 2), 1, device)["epoch"]
        results[f"workers={workers}"] = len(dataset) / seconds
    return {"images": len(dataset), "images_per_s": results}


# ---------------------------------------------------------------- driver and tables

def machine_description(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "threads": torch.get_num_threads(),
            "cpu_cores_available": len(os.sched_getaffinity(0)), "load_average": os.getloadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def markdown_tables(result: dict) -> str:
    m = result["machine"]
    precision = "bf16 autocast" if m["device"].startswith("cuda") else "float32"
    lines = [f"Machine: {m.get('gpu') or m['cpu']}, {m['cpu_cores_available']} cores available, torch {m['torch']}, "
             f"{m['device']}, {precision}, {result['image_size']}x{result['image_size']}, load average at start "
             f"{m['load_average'][0]:.1f}. Medians of {result['repeats']} runs after warm-up; absolute times are of "
             "this machine only, ratios are the result.", "",
             "**1. Certification** (images/s; MC = Monte-Carlo CERTIFY, n0 = 100, per image)", "",
             "| model | batch | plain inference img/s | deterministic img/s | det / plain | MC noisy fwd/s | "
             "MC noisy / plain | MC s/img n=1k | MC s/img n=100k (extrap.) | det speed-up vs MC n=100k |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, row in result["models"].items():
        c = row["certification"]
        lines.append(f"| {key} ({row['arch']}) | {c['batch']} | {c['plain_images_per_s']:.1f} | "
                     f"{c['deterministic_images_per_s']:.1f} | {c['deterministic_vs_plain']:.2f}x | "
                     f"{c['mc_noisy_forwards_per_s']:.1f} | {c['mc_noisy_vs_plain']:.2f}x | "
                     f"{c['mc_seconds_per_image_n1000']:.1f} | {c['mc_seconds_per_image_n100000']:.0f} | "
                     f"{c['deterministic_speedup_vs_mc_n100000']:,.0f}x |")
    lines += ["", "**2. Conversion step** (one optimiser step; ratios vs a plain cross-entropy step, same batch)", "",
              "| model | batch | step | s/step | time vs plain | peak memory MiB | memory vs plain |",
              "|---|---|---|---|---|---|---|"]
    for key, row in result["models"].items():
        conversion = row["conversion"]
        for name, s in conversion["steps"].items():
            lines.append(f"| {key} | {conversion['batch']} | {name} | {s['seconds']:.2f} | {s['time_vs_plain']:.2f}x "
                         f"| {s['peak_bytes'] / 2**20:.0f} | {s['memory_vs_plain']:.2f}x |")
    any_row = next(iter(result["models"].values()))
    lines += ["", f"Peak memory: {any_row['conversion']['memory_method']}.", "",
              "**3. Data pipeline vs model** (images/s; decode + resize + crop of "
              f"{result['data']['images']} 500x375 JPEGs)", "",
              "| model | data, " + " | data, ".join(result["data"]["images_per_s"]) +
              " | inference | conversion step (default estimator) | bottleneck |",
              "|---|" + "---|" * (len(result["data"]["images_per_s"]) + 3)]
    best_data = max(result["data"]["images_per_s"].values())
    for key, row in result["models"].items():
        inference = row["certification"]["plain_images_per_s"]
        steps = row["conversion"]["steps"]
        convert_ips = row["conversion"]["batch"] / steps[result["default_estimator"]]["seconds"]
        data_cells = " | ".join(f"{v:.1f}" for v in result["data"]["images_per_s"].values())
        bottleneck = (f"inference: {'data' if best_data < inference else 'model'}, "
                      f"conversion: {'data' if best_data < convert_ips else 'model'}")
        lines.append(f"| {key} | {data_cells} | {inference:.1f} | {convert_ips:.1f} | {bottleneck} |")
    if any("stack" in row for row in result["models"].values()):
        lines += ["", "**4. What the stack offers** (plain inference, images/s; ratios vs eager float32)", "",
                  "| model | batch | eager | channels_last | vs eager | torch.compile | vs eager | compile s |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, row in result["models"].items():
            if "stack" in row:
                t = row["stack"]
                lines.append(f"| {key} | {t['batch']} | {t['eager_images_per_s']:.1f} | "
                             f"{t['channels_last_images_per_s']:.1f} | {t['channels_last_vs_eager']:.2f}x | "
                             f"{t['compiled_images_per_s']:.1f} | {t['compiled_vs_eager']:.2f}x | "
                             f"{t['compile_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="certify-zoo benchmarks (ratios measured side by side)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small batches, few repeats, short MC")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=None, help="inference batch (default 32, quick 8)")
    parser.add_argument("--conversion-batch", type=int, default=None, help="conversion batch (default 8, quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--stack", action="store_true", help="also measure channels_last and torch.compile "
                        "(inference; compiling takes minutes on a CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--tables-from", type=Path, default=None, help="print the tables of an earlier --json run")
    parser.add_argument("--conversion-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tables_from:
        result = json.loads(args.tables_from.read_text())
        print(markdown_tables(result))
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (8 if args.quick else 32)
    args.conversion_batch = args.conversion_batch or (4 if args.quick else 8)
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.conversion_worker:
        # quick: only the cheapest estimator and the default (the others cost as many probes as they draw)
        estimators = {k: v for k, v in ESTIMATORS.items() if not args.quick or k in (CHEAPEST, DEFAULT)}

        def memory_of(name: str) -> int:  # the CPU high-water mark is noisy (+-15%): median of 3 fresh processes
            peaks = [conversion_in_fresh_process(args.conversion_worker, args, "--memory-of", name)["peak_bytes"]
                     for _ in range(1 if args.quick else 3)]
            return int(statistics.median(peaks))

        print(json.dumps(bench_conversion(args.conversion_worker, args.conversion_batch, args.image_size, device,
                                          args.repeats, estimators, memory_of, only=args.memory_of)))
        return {}
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        parser.error(f"unknown model key(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    mc_n0, mc_n = (2, 4) if args.quick else (4, 30)  # forwards measured per image (rates, then scaled)
    result = {"machine": machine_description(device), "quick": args.quick, "image_size": args.image_size,
              "repeats": args.repeats, "default_estimator": DEFAULT, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), 32 if args.quick else 128)
        for key in chosen:
            arch = MODELS[key]
            print(f"[{key}] {arch}: certification", file=sys.stderr, flush=True)
            model = build_model(arch, args.image_size, device)
            certification = bench_certification(model, args.batch, args.image_size, device, args.repeats, mc_n0, mc_n)
            if "data" not in result:
                print("data pipeline", file=sys.stderr, flush=True)
                result["data"] = bench_data(model, Path(tmp), args.batch, device, args.repeats)
            print(f"[{key}] {arch}: conversion", file=sys.stderr, flush=True)
            result["models"][key] = {"arch": arch, "certification": certification,
                                     "conversion": conversion_in_fresh_process(arch, args)}
            if args.stack:
                print(f"[{key}] {arch}: channels_last and torch.compile", file=sys.stderr, flush=True)
                result["models"][key]["stack"] = bench_stack_options(arch, args.batch, args.image_size, device,
                                                                     args.repeats)
    print(markdown_tables(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
