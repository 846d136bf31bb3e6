"""Quality of the penalty estimators on the offline demo: convert the same base with each, certify, audit.

    PYTHONPATH=. python benchmarks/estimator_quality.py --out /tmp/estq paper forward:1 forward:2

Each estimator spec is NAME[:PROBES]. The base is trained once (the demo's recipe and seed) and reused.
For every converted model: clean accuracy and Monte-Carlo certified accuracy at each radius (n = 2,000,
the demo's setting) with binomial 95% intervals (Clopper-Pearson), and a minimal L2 PGD audit of the
deterministic radii: for every correctly classified test image, PGD on v inside its claimed Gaussian radius;
a counterexample is an image whose prediction changes there. (The project's full audit lives in
certify_zoo/audit.py; this one is self-contained so that the comparison runs on any branch.)
Results are appended to OUT/results.json, one entry per estimator, and printed as a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certify_zoo.convert import ConvertSettings, convert  # noqa: E402
from certify_zoo.demo import DEMO_RADII, train_demo_base  # noqa: E402
from certify_zoo.evaluate import EvaluateSettings, evaluate  # noqa: E402
from certify_zoo.models import load_classifier  # noqa: E402
from certify_zoo.recipes import load_recipe  # noqa: E402


def binomial_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval for a proportion."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = beta.ppf(tail, successes, trials - successes + 1) if successes > 0 else 0.0
    high = beta.ppf(1 - tail, successes + 1, trials - successes) if successes < trials else 1.0
    return float(low), float(high)


def pgd_l2_counterexamples(model, images: torch.Tensor, labels: torch.Tensor, radii: torch.Tensor,
                           steps: int = 20) -> int:
    """Images whose prediction v can be changed by an L2 perturbation within its own radius (pixels in [0,1])."""
    found = 0
    for start in range(0, images.shape[0], 128):
        x, y, r = images[start:start + 128], labels[start:start + 128], radii[start:start + 128]
        view = (-1, 1, 1, 1)
        delta = torch.zeros_like(x)
        step_size = (2.5 * r / steps).view(view)
        broken = torch.zeros(x.shape[0], dtype=torch.bool)
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model((x + delta).clamp(0, 1))
            broken |= (logits.argmax(-1) != y).detach()
            loss = torch.nn.functional.cross_entropy(logits, y)
            (grad,) = torch.autograd.grad(loss, delta)
            grad = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            delta = delta.detach() + step_size * grad
            norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (r / norm).clamp(max=1.0).view(view)
        with torch.no_grad():
            broken |= model((x + delta).clamp(0, 1)).argmax(-1) != y
        found += int(broken.sum())
    return found


def run_one(spec: str, base_dir: Path, out: Path, n: int, seed: int) -> dict:
    name, _, probes = spec.partition(":")
    recipe = load_recipe("demo")
    target = out / spec.replace(":", "-p")
    started = time.perf_counter()
    convert(ConvertSettings.from_recipe(recipe, model=str(base_dir), data="demo", out=str(target), seed=seed,
                                        estimator=name, probes=int(probes) if probes else None, overwrite=True))
    seconds = time.perf_counter() - started
    evaluation = evaluate(EvaluateSettings(model=str(target), data="demo", sigma=recipe["sigma"], radii=DEMO_RADII,
                                           method="all", n=n, seed=seed))
    record, per_image = evaluation.record, evaluation.per_image
    total = record["num_images"]
    labels = per_image["label"]
    mc_correct = per_image["mc_prediction"] == labels
    mc = {}
    for r in DEMO_RADII:
        hits = int((mc_correct & (per_image["mc_radius"] >= r)).sum())
        mc[f"{r:g}"] = {"accuracy": hits / total, "ci95": binomial_interval(hits, total)}
    correct = per_image["prediction"] == labels
    # audit: images correctly classified with a positive deterministic radius
    from certify_zoo.data import labelled_images

    model = load_classifier(str(target)).eval().requires_grad_(False)
    dataset = labelled_images("demo", model.transform(), model.label_names, model.num_classes)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    audited = correct & (per_image["radius"] > 0)
    torch.manual_seed(seed)
    counterexamples = pgd_l2_counterexamples(model, images[audited], labels[audited], per_image["radius"][audited])
    clean_hits = int(correct.sum())
    return {"estimator": spec, "convert_seconds": round(seconds, 1), "images": total,
            "clean": {"accuracy": clean_hits / total, "ci95": binomial_interval(clean_hits, total)},
            "monte_carlo": mc, "mc_n": n, "audited": int(audited.sum()), "pgd_counterexamples": counterexamples,
            "deterministic": record["certificates"]["deterministic"]["certified_accuracy"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("estimators", nargs="+", help="NAME[:PROBES], e.g. paper forward:1")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    base_dir = args.out / "base"
    if not (base_dir / "model.safetensors").is_file():
        train_demo_base(base_dir, seed=args.seed)
    for spec in args.estimators:
        result = run_one(spec, base_dir, args.out, args.n, args.seed)
        print(json.dumps(result), flush=True)
        with (args.out / "results.jsonl").open("a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
