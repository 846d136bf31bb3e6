"""certify-zoo benchmarks: what a certificate and a conversion cost, as ratios measured side by side.

    PYTHONPATH=. python benchmarks/run.py            # full: 224x224, a small CNN, a ConvNeXt and a ViT
    PYTHONPATH=. python benchmarks/run.py --quick    # smoke run, < 2 minutes on 2 CPU cores

For every model (random weights built from timm configs: throughput does not depend on the weights), on the
same batch, each figure the median of repeated runs after a warm-up, the variants of one measurement
interleaved so that a busy machine slows all alike. Precision: float32 everywhere, as ``convert`` and
``evaluate`` run by default, except the frozen base's forward during conversion, which runs under bf16 autocast
on a GPU (no gradient flows through it; the student stays float32, since the penalty's finite differences of
step h = 0.01 would drown in bf16 rounding):

1. certification: images/s of the deterministic certificate (one forward, then softmax/top-2/PhiInv on the
   batch, as in ``evaluate --method deterministic``) vs plain inference (the floor); Monte-Carlo CERTIFY as
   ``evaluate --method monte-carlo`` runs it (a batch of images, each forward one noisy copy of every image):
   noisy forwards/s vs plain inference at the same batch size, and from it the seconds per image at n = 1,000
   (n0 = 100) and at n = 100,000. On a GPU also both certificates under bf16 autocast, with the largest radius
   difference against float32 on the same images and noise (bf16 is only worth using when that is < 1e-3).
2. conversion: mean time and peak memory of an optimiser step with each step configuration vs a plain
   cross-entropy fine-tuning step (same model, batch, optimiser): "fidelity only" (the floor every penalty
   estimator sits on), each estimator, lazy penalties (the penalty every k-th step with k times its weight; the
   time is the mean over a whole period of k steps, the memory the period's peak) and "default": the step the
   generic recipe configures (estimator, lazy period, gradient clip, bn_mode; ``default_step``). Peak memory:
   CUDA allocator peak on a GPU; on CPU the same quantity counted from the tensors' storages
   (``tensor_memory.PeakTensorMemory``), and beside it the resident high-water mark of one period above the
   resident size before it, each configuration in a fresh process (both stated in the table).
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

from certify_zoo.certificates import Smooth, certify_deterministic  # noqa: E402
from certify_zoo.clipping import MedianNormClip, fixed_clip_threshold  # noqa: E402
from certify_zoo.models import ImageClassifier, create_timm_model, preprocessing_config  # noqa: E402
from certify_zoo.objective import (ObjectiveSettings, boot_camp_step, effective_gamma, lazy_weight,  # noqa: E402
                                   penalty_due)
from certify_zoo.recipes import load_recipe  # noqa: E402
from benchmarks.tensor_memory import PeakTensorMemory  # noqa: E402

MODELS = {"cnn": "resnet10t", "convnext": "convnext_atto", "vit": "vit_tiny_patch16_224"}
PLAIN = "plain cross-entropy"
DEFAULT = "default"  # the generic recipe's step (default_step): the row the acceptance ratios are read from
JL = dict(estimator="jl", probes=1, probe_distribution="rademacher")
# row label -> the step's recipe keys (ObjectiveSettings fields, penalty_every, clip_grad_norm,
# clip_grad_median_multiple, bn_mode); ordered by expected memory (see the CPU memory note)
STEPS = {"fidelity only": dict(reps=0),
         "jl (1 probe)": JL,
         "jl lazy k=4": dict(JL, penalty_every=4),
         "jl lazy k=8": dict(JL, penalty_every=8),
         "jl lazy k=16": dict(JL, penalty_every=16),
         "jl share 1/16": dict(JL, penalty_share=1 / 16),
         "jl k=4 share 1/4": dict(JL, penalty_every=4, penalty_share=1 / 4),
         "jl (2 probes)": dict(JL, probes=2),
         # the paper's six Gaussian terms, backpropagated one graph at a time: its estimator, not its memory
         "jl (6 Gaussian probes)": dict(estimator="jl", probes=6, probe_distribution="gaussian"),
         "jl 6 Gaussian lazy k=4": dict(estimator="jl", probes=6, probe_distribution="gaussian", penalty_every=4),
         "paper (6 reps)": dict(estimator="paper")}
QUICK_STEPS = ("fidelity only", "jl (1 probe)", "jl lazy k=4", "paper (6 reps)", DEFAULT)
STEP_KEYS = ("clip_grad_norm", "clip_grad_median_multiple", "bn_mode")  # the loop's, beside ObjectiveSettings'
SIGMA = 0.25
GAMMA = 0.05  # at 1000 classes (the recipes' value; gamma "auto" is a controller, not a cost)
# the gamma controller's cost is stated for one epoch of ImageNet-1k (its training split) at the benchmark's batch,
# with the default number of held-out images (measured on CHECK_MEASURED of them, scaled linearly)
IMAGENET_TRAIN_IMAGES, CHECK_MEASURED = 1_281_167, 8
MC_N0, MC_N, MC_N_STANDARD = 100, 1_000, 100_000  # per-image sample counts the seconds/image are stated at
BF16_RADIUS_TOLERANCE = 1e-3  # largest radius change against float32 for bf16 certification to be acceptable


def default_step(recipe: str = "generic") -> dict:
    """The default conversion step's configuration, read from the recipe so that the "default" row follows it."""
    chosen = load_recipe(recipe)
    keys = [k for k in ObjectiveSettings.__dataclass_fields__ if k not in ("sigma", "gamma")] + list(STEP_KEYS)
    return {key: chosen[key] for key in keys if key in chosen}


def step_configurations(names=None) -> dict[str, dict]:
    """Row label -> step configuration: STEPS and "default" (all of them, or ``names`` in STEPS' order)."""
    rows = {**STEPS, DEFAULT: default_step()}
    return {name: config for name, config in rows.items() if names is None or name in names}


def build_model(arch: str, image_size: int, device: torch.device, channels_last: bool = False) -> ImageClassifier:
    extra = {"img_size": image_size} if arch.startswith("vit") else {}
    net = create_timm_model(arch, pretrained=False, num_classes=1000, **extra)
    # the config's size too, so that a saved copy loads at it (timm before 1.0.31 kept a ViT's 224 there)
    net.pretrained_cfg = {**net.pretrained_cfg, "input_size": (3, image_size, image_size)}
    cfg = preprocessing_config(net)
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


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def forward_in_bf16(model: torch.nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's forward under bf16 autocast, its logits back in float32 (for the frozen base)."""
    def forward(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, True):
            return model(images).float()
    return forward


# ---------------------------------------------------------------- 1. certification

def bench_certification(model: ImageClassifier, batch: int, image_size: int, device: torch.device, repeats: int,
                        mc_n0: int, mc_n: int, bf16: bool | None = None) -> dict:
    """Certification throughput in float32 (as evaluate runs); with ``bf16`` (default: on a GPU) the same under
    bf16 autocast, with the largest radius difference against float32 (``bf16`` key)."""
    bf16 = device.type == "cuda" if bf16 is None else bf16
    model.eval()
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    smooth = Smooth(model, model.num_classes, SIGMA)

    def plain(half: bool = False):
        with torch.inference_mode(), autocast(device, half):
            return model(images)

    def deterministic(half: bool = False):
        with torch.inference_mode(), autocast(device, half):
            cert = certify_deterministic(model(images).float(), SIGMA)
        # what evaluate keeps per image, brought to the host once per batch
        return [t.cpu() for t in (cert.prediction, cert.p1, cert.p2, cert.radius, cert.radius_lipschitz)]

    def monte_carlo(half: bool = False, seed: int = 0):  # as evaluate does: each forward one noisy copy per image
        generator = torch.Generator(device=device).manual_seed(seed)
        with autocast(device, half):
            return smooth.certify(images, mc_n0, mc_n, 0.001, batch, generator)

    fast_runs = {"plain": plain, "deterministic": deterministic}
    mc_runs = {"plain": plain, "monte_carlo": monte_carlo}
    if bf16:
        fast_runs.update({"plain bf16": lambda: plain(True), "deterministic bf16": lambda: deterministic(True)})
        mc_runs["monte_carlo bf16"] = lambda: monte_carlo(True)
    fast = interleaved_medians(fast_runs, repeats, 1, device)
    mc = interleaved_medians(mc_runs, max(1, repeats // 2), 1, device)
    plain_ips = batch / fast["plain"]
    deterministic_ips = batch / fast["deterministic"]
    mc_noisy_ips = batch * (mc_n0 + mc_n) / mc["monte_carlo"]
    per_image_1000 = (MC_N0 + MC_N) / mc_noisy_ips
    per_image_100k = (MC_N0 + MC_N_STANDARD) / mc_noisy_ips
    result = {"batch": batch, "precision": "float32", "plain_images_per_s": plain_ips,
              "deterministic_images_per_s": deterministic_ips, "deterministic_vs_plain": deterministic_ips / plain_ips,
              "mc_measured_n0": mc_n0, "mc_measured_n": mc_n,
              "mc_noisy_forwards_per_s": mc_noisy_ips, "mc_noisy_vs_plain": mc_noisy_ips / (batch / mc["plain"]),
              "mc_seconds_per_image_n1000": per_image_1000, "mc_seconds_per_image_n100000": per_image_100k,
              "deterministic_speedup_vs_mc_n1000": per_image_1000 * deterministic_ips,
              "deterministic_speedup_vs_mc_n100000": per_image_100k * deterministic_ips}
    if bf16:
        exact, half = deterministic(), deterministic(True)
        mc_exact, mc_half = monte_carlo(seed=1), monte_carlo(True, seed=1)  # the same noise
        deterministic_difference = (exact[3] - half[3]).abs().max().item()
        mc_difference = (mc_exact[1].cpu() - mc_half[1].cpu()).abs().max().item()
        result["bf16"] = {
            "plain_images_per_s": batch / fast["plain bf16"],
            "deterministic_images_per_s": batch / fast["deterministic bf16"],
            "deterministic_vs_float32": fast["deterministic"] / fast["deterministic bf16"],
            "mc_noisy_forwards_per_s": batch * (mc_n0 + mc_n) / mc["monte_carlo bf16"],
            "mc_vs_float32": mc["monte_carlo"] / mc["monte_carlo bf16"],
            "deterministic_max_radius_difference": deterministic_difference,
            "deterministic_max_radius_float32": exact[3].max().item(),  # the scale: random weights, small margins
            "deterministic_prediction_agreement": (exact[0] == half[0]).float().mean().item(),
            "mc_max_radius_difference": mc_difference,
            "mc_prediction_agreement": (mc_exact[0].cpu() == mc_half[0].cpu()).float().mean().item(),
            "radius_tolerance": BF16_RADIUS_TOLERANCE,
            "acceptable": max(deterministic_difference, mc_difference) < BF16_RADIUS_TOLERANCE}
    return result


# ---------------------------------------------------------------- 4. what the stack offers (--stack)

def bench_stack_options(arch: str, batch: int, image_size: int, device: torch.device, repeats: int) -> dict:
    """Plain inference eager vs channels_last vs torch.compile (default mode), same batch; compile time apart."""
    model = build_model(arch, image_size, device).eval()
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    channels_last_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    channels_last_images = images.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(copy.deepcopy(model))
    started = time.perf_counter()
    with torch.inference_mode():
        compiled(images)
    synchronize(device)
    compile_seconds = time.perf_counter() - started

    def runner(net, x):
        @torch.inference_mode()
        def run():
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


def set_batchnorm_eval(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def conversion_period(student: torch.nn.Module, base_forward: Callable, images: torch.Tensor,
                      optimizer: torch.optim.Optimizer, config: dict, gamma: float) -> tuple[Callable[[], None], int]:
    """One whole lazy period (k optimiser steps) of a step configuration, as the conversion loop runs it:
    the penalty on the period's first step with k times its weight, fidelity alone on the others, then the
    configured clip. Returns (run the period, k)."""
    settings = ObjectiveSettings(sigma=SIGMA, **{k: v for k, v in config.items()
                                                 if k in ObjectiveSettings.__dataclass_fields__})
    every = max(1, settings.penalty_every)
    multiple = config.get("clip_grad_median_multiple", 0.0)
    median_clip = MedianNormClip(multiple) if multiple > 0 else None
    fixed_clip = config.get("clip_grad_norm", 0.0)

    def run() -> None:
        student.train()
        if config.get("bn_mode") == "eval":  # BatchNorm frozen with the base's statistics
            set_batchnorm_eval(student)
        for step in range(every):
            weight = lazy_weight(gamma, every) if penalty_due(step, every) else 0.0
            parts = boot_camp_step(student, base_forward, images, settings, weight)
            if median_clip is not None:
                median_clip(student.parameters(), parts.with_penalty)
            if fixed_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(),
                                               fixed_clip_threshold(fixed_clip, every, parts.with_penalty))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return run, every


def controller_check_seconds(student: torch.nn.Module, base: torch.nn.Module, images: torch.Tensor,
                             repeats: int, device: torch.device) -> float:
    """Seconds of one gamma-controller measurement (rho at the held-out images, their neighbours and the points
    along each claim, plus the agreement forward) at the default number of held-out images, and the copy of the
    student and its SGD momentum that a check meeting the agreement floor keeps (rollback.LastGoodState)."""
    from certify_zoo.conversion import ConvertSettings
    from certify_zoo.rollback import LastGoodState
    from certify_zoo.smoothness import rho_at_probe_points

    held_out = images[torch.arange(CHECK_MEASURED) % images.shape[0]]  # the batch's images, repeated if fewer
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0, momentum=0.9)
    for parameter in student.parameters():  # one step at lr 0 gives every parameter its momentum buffer
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def check() -> None:
        student.eval()
        rho_at_probe_points(student, held_out, SIGMA)
        with torch.no_grad():
            (student(held_out).argmax(-1) == base(held_out).argmax(-1)).float().mean()
        LastGoodState(0, student, optimizer)
    scale = ConvertSettings.__dataclass_fields__["check_images"].default / CHECK_MEASURED
    return interleaved_medians({"check": check}, max(1, repeats // 2), 1, device)["check"] * scale


def bench_conversion(arch: str, batch: int, image_size: int, device: torch.device, repeats: int,
                     steps: dict[str, dict], memory_of: Callable[[str], int] | None = None,
                     only: str | None = None, bf16: bool | None = None) -> dict:
    """Mean step time and peak memory: a plain cross-entropy step vs each step configuration (``steps``: row label
    -> recipe keys, see ``conversion_period``), lazy ones over a whole period.

    ``bf16`` (default: on a GPU): the base's forward under bf16 autocast, and one more row, the cross-entropy step
    under bf16 autocast (what plain fine-tuning on a GPU often uses; the ratios stay against float32).
    ``only``: run that configuration's period once and report its peak (the fresh-process memory worker);
    ``memory_of(name)``: how a CPU run gets each configuration's peak (from such a worker).
    """
    bf16 = device.type == "cuda" if bf16 is None else bf16
    torch.manual_seed(0)
    student = build_model(arch, image_size, device)
    base = copy.deepcopy(student).eval().requires_grad_(False)
    base_forward = forward_in_bf16(base, device) if bf16 else base
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    gamma = effective_gamma(GAMMA, 1000)

    def plain_step(half: bool = False):
        student.train()
        with autocast(device, half):
            loss = torch.nn.functional.cross_entropy(student(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    variants, periods = {PLAIN: plain_step}, {PLAIN: 1}
    if bf16:
        variants[PLAIN + ", bf16 autocast"], periods[PLAIN + ", bf16 autocast"] = lambda: plain_step(True), 1
    for name, config in steps.items():
        variants[name], periods[name] = conversion_period(student, base_forward, images, optimizer, config, gamma)
    if only is not None:
        start_rss = _rss_bytes()
        variants[only]()
        return {"peak_bytes": _max_rss_bytes() - start_rss}
    memory: dict[str, int] = {}
    rss: dict[str, int] = {}
    for name, run in variants.items():
        run()  # the warm-up (optimiser buffers, kernels' autotuning)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run()
            memory[name] = torch.cuda.max_memory_allocated(device) - before
        else:  # the same quantity, counted from the tensors' storages (benchmarks/tensor_memory.py)
            with PeakTensorMemory() as counter:
                run()
            memory[name] = counter.peak_bytes
            if memory_of is not None:  # the CPU high-water mark only rises: each from its own process
                rss[name] = memory_of(name)
    seconds = {name: value / periods[name] for name, value in interleaved_medians(variants, repeats, 0, device).items()}
    # the default row pays for the gamma controller too: one check every controller_check_every(steps) steps of an
    # ImageNet-1k epoch, spread over the steps between two checks
    from certify_zoo.conversion import controller_check_every

    check_every = controller_check_every(IMAGENET_TRAIN_IMAGES // batch)
    check = controller_check_seconds(student, base, images, repeats, device) if DEFAULT in steps else 0.0
    controller = {"check_seconds": check, "check_every_steps": check_every, "seconds_per_step": check / check_every,
                  "run": f"one ImageNet-1k epoch ({IMAGENET_TRAIN_IMAGES:,} images) at batch {batch}"}
    if DEFAULT in seconds:
        seconds[DEFAULT] += controller["seconds_per_step"]
    return {"batch": batch, "base_forward": "bf16 autocast" if bf16 else "float32",
            "memory_method": "cuda peak allocated during one period, above what was allocated before it"
            if device.type == "cuda" else "peak bytes of the tensor storages created during one period and alive at "
            "once (what cuda peak allocated reports on a GPU; kernels' internal scratch buffers not seen)",
            **({"rss_method": RSS_METHOD} if rss else {}),
            "settings": steps, "gamma_controller": controller,
            "steps": {name: {"seconds": seconds[name], "time_vs_plain": seconds[name] / seconds[PLAIN],
                             "penalty_every": periods[name], "peak_bytes": memory[name],
                             "memory_vs_plain": memory[name] / max(1, memory[PLAIN]),
                             **({"rss_peak_bytes": rss[name], "rss_vs_plain": rss[name] / max(1, rss[PLAIN])}
                                if rss else {})}
                      for name in variants}}


RSS_METHOD = ("CPU RSS high-water of one period above the RSS before it, each configuration in fresh processes "
              "(median of 3; 1 with --quick): it also counts what the allocator keeps after tensors are freed")


def conversion_in_fresh_process(arch: str, args: argparse.Namespace, *extra: str) -> dict:
    """Each model's conversion numbers come from its own process (``extra``: e.g. one CPU memory peak, from one
    more)."""
    command = [sys.executable, __file__, "--conversion-worker", arch, "--image-size", str(args.image_size),
               "--conversion-batch", str(args.conversion_batch), "--repeats", str(args.repeats),
               "--threads", str(args.threads), *extra] + (["--quick"] if args.quick else [])
    command += ["--steps", args.steps] if args.steps else []
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
        info["cuda"] = torch.version.cuda
        info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def precision_line(conversion: dict) -> str:
    return f"float32 (the base's forward during conversion: {conversion.get('base_forward', 'float32')})"


def markdown_tables(result: dict) -> str:
    m = result["machine"]
    precision = precision_line(next(iter(result["models"].values()))["conversion"])
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
    lines += bf16_certification_table(result["models"])
    lines += ["", "**2. Conversion step** (mean over a whole lazy period of k steps; ratios vs a plain cross-entropy "
              "step, same batch; \"default\": the generic recipe's step)", ""]
    lines += conversion_table(result["models"])
    any_row = next(iter(result["models"].values()))
    rss_method = any_row["conversion"].get("rss_method")
    lines += ["", f"Peak memory: {any_row['conversion']['memory_method']}."
              + (f" RSS: {rss_method}." if rss_method else ""), "",
              "**3. Data pipeline vs model** (images/s; decode + resize + crop of "
              f"{result['data']['images']} 500x375 JPEGs)", "",
              "| model | data, " + " | data, ".join(result["data"]["images_per_s"]) +
              " | inference | conversion step (default) | bottleneck |",
              "|---|" + "---|" * (len(result["data"]["images_per_s"]) + 3)]
    best_data = max(result["data"]["images_per_s"].values())
    for key, row in result["models"].items():
        inference = row["certification"]["plain_images_per_s"]
        default = row["conversion"]["steps"].get(result["default_estimator"])  # absent when --steps left it out
        convert_ips = row["conversion"]["batch"] / default["seconds"] if default else None
        data_cells = " | ".join(f"{v:.1f}" for v in result["data"]["images_per_s"].values())
        bottleneck = (f"inference: {'data' if best_data < inference else 'model'}, conversion: "
                      + ("-" if convert_ips is None else 'data' if best_data < convert_ips else 'model'))
        lines.append(f"| {key} | {data_cells} | {inference:.1f} | "
                     f"{'-' if convert_ips is None else f'{convert_ips:.1f}'} | {bottleneck} |")
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


def conversion_table(models: dict) -> list[str]:
    with_rss = any("rss_vs_plain" in s for row in models.values() for s in row["conversion"]["steps"].values())
    lines = ["| model | batch | step | k | s/step | time vs plain | peak memory MiB | memory vs plain |"
             + (" RSS vs plain |" if with_rss else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if with_rss else "")]
    for key, row in models.items():
        conversion = row["conversion"]
        for name, s in conversion["steps"].items():
            rss = (f" {s['rss_vs_plain']:.2f}x |" if "rss_vs_plain" in s else " - |") if with_rss else ""
            lines.append(f"| {key} | {conversion['batch']} | {name} | {s.get('penalty_every', 1)} | "
                         f"{s['seconds']:.3g} | {s['time_vs_plain']:.2f}x | {s['peak_bytes'] / 2**20:.0f} | "
                         f"{s['memory_vs_plain']:.2f}x |{rss}")
    for key, row in models.items():
        c = row["conversion"].get("gamma_controller")
        if c and c["check_seconds"]:
            lines.append(f"\n{key}: the default row includes the gamma controller, {c['check_seconds']:.3g} s per "
                         f"check every {c['check_every_steps']} steps ({c['run']}): "
                         f"+{c['seconds_per_step']:.2g} s/step.")
    return lines


def bf16_certification_table(models: dict) -> list[str]:
    """Certification under bf16 autocast beside float32 (GPU runs), with what it does to the radii."""
    rows = {key: row["certification"]["bf16"] for key, row in models.items() if "bf16" in row["certification"]}
    if not rows:
        return []
    lines = ["", f"bf16 autocast certification (same images and noise as float32; acceptable when the largest radius "
             f"difference is < {BF16_RADIUS_TOLERANCE:g}; random weights: small margins, re-measure on a converted "
             "model)", "",
             "| model | det img/s | vs float32 | MC noisy fwd/s | vs float32 | max radius diff det | "
             "max radius diff MC | same prediction det / MC | acceptable |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, b in rows.items():
        lines.append(f"| {key} | {b['deterministic_images_per_s']:.1f} | {b['deterministic_vs_float32']:.2f}x | "
                     f"{b['mc_noisy_forwards_per_s']:.1f} | {b['mc_vs_float32']:.2f}x | "
                     f"{b['deterministic_max_radius_difference']:.2g} | {b['mc_max_radius_difference']:.2g} | "
                     f"{b['deterministic_prediction_agreement']:.0%} / {b['mc_prediction_agreement']:.0%} | "
                     f"{'yes' if b['acceptable'] else 'no'} |")
    return lines


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
    parser.add_argument("--steps", default=None, help="conversion rows to measure, comma-separated (default: all; "
                        f"with --quick: {', '.join(QUICK_STEPS)}); the plain cross-entropy step always")
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
        # quick: the floor, the cheapest estimator, one lazy period, the paper's and the default
        names = args.steps.split(",") if args.steps else QUICK_STEPS if args.quick else None
        steps = step_configurations(names)

        def memory_of(name: str) -> int:  # the CPU high-water mark is noisy (+-15%): median of 3 fresh processes
            peaks = [conversion_in_fresh_process(args.conversion_worker, args, "--memory-of", name)["peak_bytes"]
                     for _ in range(1 if args.quick else 3)]
            return int(statistics.median(peaks))

        print(json.dumps(bench_conversion(args.conversion_worker, args.conversion_batch, args.image_size, device,
                                          args.repeats, steps, memory_of, only=args.memory_of)))
        return {}
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        parser.error(f"unknown model key(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    mc_n0, mc_n = (2, 4) if args.quick else (4, 30)  # forwards measured per image (rates, then scaled)
    result = {"machine": machine_description(device), "quick": args.quick, "image_size": args.image_size,
              "repeats": args.repeats, "default_estimator": DEFAULT, "default_step": default_step(), "models": {}}
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
    if args.json:  # first: the measurements survive whatever the tables do
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown_tables(result))
    return result


if __name__ == "__main__":
    main()
