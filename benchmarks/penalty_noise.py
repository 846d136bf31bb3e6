"""How noisy is each penalty estimator's weight gradient at the start of a conversion?

    PYTHONPATH=. python benchmarks/penalty_noise.py --work W --record docs/records/penalty_noise.json \
        [--models demo,cnn16,effnet16,convnext32,vit16,efficientnet_lite2]

For each model (the gamma study's bases, built in W as gamma_study.py builds them, and the real EfficientNet-Lite2
on the shipped photos), the student is the base in its conversion mode (BatchNorm on batch statistics where the
gamma study converted with them). On each of a few conversion batches, with the same pixel noise, the penalty's
weight gradient (weight 1, the fidelity's gradient subtracted) is computed for ``DRAWS`` independent draws of the
estimator's w: their mean cosine similarity, and their noise-to-signal ratio (the draws' variance over the squared
norm of their mean). A ratio above 1: one step's penalty gradient is more noise than signal. The question it
answers: does anything measured before a conversion tell which models tolerate the one-probe step (the penalty
cost study: the demo and the EfficientNet-style network did, the BatchNorm resnet did not)?
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from certify_zoo.forward_modes import set_conversion_mode  # noqa: E402
from certify_zoo.data_sources import conversion_loader  # noqa: E402
from certify_zoo.models import load_classifier  # noqa: E402
from certify_zoo.objective import Draws, ObjectiveSettings, boot_camp_step  # noqa: E402

SIGMA = 0.5
DRAWS = 4
BATCHES = 3
BATCH = 64
ESTIMATORS = {"paper (6 Gaussian terms)": dict(estimator="paper"),
              "jl, 2 Rademacher probes": dict(estimator="jl", probes=2, probe_distribution="rademacher"),
              "jl, 1 Rademacher probe": dict(estimator="jl", probes=1, probe_distribution="rademacher")}
MODELS = ("demo", "cnn16", "effnet16", "convnext32", "vit16", "efficientnet_lite2")


def _source(model: str, work: Path) -> tuple[Path, str, int, str, float]:
    """(base folder, conversion data, batch, bn_mode, sigma) as the studies converted the model."""
    if model == "efficientnet_lite2":
        from real_model import efficientnet_lite2_folder, photo_folder

        base = efficientnet_lite2_folder(work / "efficientnet_lite2")
        photos = photo_folder(work / "photos")
        return base, str(photos), len(list(photos.iterdir())), "eval", 0.25  # every photo in one batch
    from gamma_study import prepare

    spec = prepare(model, work)
    return Path(spec["base"]), spec["train"], BATCH, "recompute", SIGMA


def gradient_noise(student, base, images: torch.Tensor, sigma: float, seed: int) -> dict[str, dict[str, float]]:
    """Per estimator: mean pairwise cosine of DRAWS penalty gradients on ``images`` (same pixel noise, fresh w) and
    their noise-to-signal ratio."""
    parameters = [p for p in student.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    batch = images.shape[0]
    noised = torch.zeros(batch, dtype=torch.bool)
    noised[torch.randperm(batch, generator=generator)[: batch // 2]] = True
    noise = torch.randn(images.shape, generator=generator) * sigma * noised.view(-1, 1, 1, 1)
    classes = base(images[:1]).shape[-1]

    def gradient(settings: ObjectiveSettings, weight: float) -> torch.Tensor:
        for p in parameters:
            p.grad = None
        w = torch.randn(settings.reps, batch, classes, generator=generator) / classes ** 0.5
        boot_camp_step(student, base, images, settings, weight, Draws(noise, noised, w))
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])

    fidelity = gradient(ObjectiveSettings(sigma=sigma), 0.0)
    result = {}
    for name, options in ESTIMATORS.items():
        draws = torch.stack([gradient(ObjectiveSettings(sigma=sigma, **options), 1.0) - fidelity
                             for _ in range(DRAWS)])
        mean = draws.mean(0)
        cosines = [float(torch.nn.functional.cosine_similarity(draws[i], draws[j], dim=0))
                   for i in range(DRAWS) for j in range(i + 1, DRAWS)]
        variance = float((draws - mean).pow(2).sum(1).sum() / (DRAWS - 1))
        result[name] = {"cosine": statistics.mean(cosines), "noise_to_signal": variance / float(mean.pow(2).sum())}
    return result


def measure(model: str, work: Path) -> dict:
    base_folder, data, batch, bn_mode, sigma = _source(model, work)
    base = load_classifier(str(base_folder))
    batches = iter(conversion_loader(data, base.transform(), batch, 0).loader)
    student = copy.deepcopy(base)
    set_conversion_mode(student, bn_mode)  # recompute: batch statistics, running ones frozen (momentum 0)
    base.eval()
    rows = []
    for index in range(BATCHES if model != "efficientnet_lite2" else 1):
        images = next(batches).images
        rows.append(gradient_noise(student, base, images, sigma, seed=index))
        print(model, index, json.dumps(rows[-1]), flush=True)
    return {"model": model, "batch": batch, "batches": len(rows), "bn_mode": bn_mode, "sigma": sigma,
            "per_batch": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.manual_seed(0)
    record = {"title": "Noise of the penalty's weight gradient at the start of a conversion",
              "provenance": {"command": "PYTHONPATH=. python benchmarks/penalty_noise.py --work W --record R",
                             "date": time.strftime("%Y-%m-%d"),
                             "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
                             "setup": f"{DRAWS} draws of w per batch and estimator, the same pixel noise; "
                                      f"{BATCHES} conversion batches of {BATCH} (the shipped photos in one batch "
                                      "for EfficientNet-Lite2, sigma 0.25 as its studies); the student is the base "
                                      "in its conversion mode; noise-to-signal: the draws' variance over the "
                                      "squared norm of their mean"},
              "models": [measure(model, args.work) for model in args.models.split(",")]}
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
