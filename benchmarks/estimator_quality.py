"""Quality of the penalty estimators on the offline demo: convert the same base with each, certify, audit.

    PYTHONPATH=. python benchmarks/estimator_quality.py --out /tmp/estq --seeds 0,1,2 paper jl:1

Each estimator spec is NAME[:PROBES][,KEY=VALUE...] (other convert settings, e.g. clip_grad_norm=1). The base
is the demo's (its recipe and seed 0), trained once and reused;
every (estimator, seed) pair converts it with recipe ``demo`` and only the estimator and the conversion seed
(data order and noise) changed, then runs ``evaluate --method all --audit pgd`` as the CLI does: clean accuracy
and Monte-Carlo certified accuracy (n = 2,000, the demo's setting) with binomial 95% intervals (Clopper-Pearson),
and the PGD audit of the deterministic radii (100 steps, 4 restarts). Results are appended to OUT/results.jsonl
(an existing (estimator, seed) is not rerun) and summarised per estimator: the mean over seeds with each run's
interval, and the pooled audit count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certify_zoo.certificates import clopper_pearson_lower  # noqa: E402
from certify_zoo.conversion import ConvertSettings, convert  # noqa: E402
from certify_zoo.demo import DEMO_RADII, train_demo_base  # noqa: E402
from certify_zoo.evaluation import EvaluateSettings, evaluate  # noqa: E402
from certify_zoo.recipes import load_recipe  # noqa: E402


def binomial_interval(successes: int, trials: int) -> list[float]:
    """Two-sided 95% Clopper-Pearson interval, from the one-sided bound the certificates use."""
    lower = clopper_pearson_lower(torch.tensor([successes]), trials, 0.025).item()
    upper = 1 - clopper_pearson_lower(torch.tensor([trials - successes]), trials, 0.025).item()
    return [lower, upper]


def parse_spec(spec: str) -> dict:
    """NAME[:PROBES][,KEY=VALUE...] -> convert overrides, e.g. "jl:1,clip_grad_norm=0.5"."""
    head, *pairs = spec.split(",")
    name, _, probes = head.partition(":")
    overrides = {"estimator": name, "probes": int(probes) if probes else None}
    for pair in pairs:
        key, _, value = pair.partition("=")
        for kind in (int, float, str):
            try:
                overrides[key] = kind(value)
                break
            except ValueError:
                continue
    return overrides


def run_one(spec: str, seed: int, base_dir: Path, out: Path, n: int) -> dict:
    recipe = load_recipe("demo")
    target = out / f"{spec.replace(':', '-p').replace(',', '-').replace('=', '')}-seed{seed}"
    started = time.perf_counter()
    convert(ConvertSettings.from_recipe(recipe, model=str(base_dir), data="demo", out=str(target), seed=seed,
                                        overwrite=True, **parse_spec(spec)))
    seconds = time.perf_counter() - started
    evaluation = evaluate(EvaluateSettings(model=str(target), data="demo", sigma=recipe["sigma"], radii=DEMO_RADII,
                                           method="all", n=n, audit="pgd", seed=0))
    record, per_image = evaluation.record, evaluation.per_image
    total = record["num_images"]
    labels = per_image["label"]
    mc_correct = per_image["mc_prediction"] == labels
    monte_carlo = {}
    for radius in DEMO_RADII:
        hits = int((mc_correct & (per_image["mc_radius"] >= radius)).sum())
        monte_carlo[f"{radius:g}"] = {"accuracy": hits / total, "ci95": binomial_interval(hits, total)}
    clean_hits = int((per_image["prediction"] == labels).sum())
    audit = record["audit"]
    return {"estimator": spec, "seed": seed, "convert_seconds": round(seconds, 1), "images": total,
            "clean": {"accuracy": clean_hits / total, "ci95": binomial_interval(clean_hits, total)},
            "monte_carlo": monte_carlo, "mc_n": n, "audited": audit["attacked"],
            "pgd_counterexamples": audit["counterexamples"],
            "deterministic": record["certificates"]["deterministic"]["certified_accuracy"]}


def mean_accuracy(runs: list[dict], key: str, radius: str | None = None) -> float:
    return 100 * statistics.mean((r[key] if radius is None else r[key][radius])["accuracy"] for r in runs)


def summary_table(results: list[dict]) -> str:
    def cell(entry: dict) -> str:
        low, high = entry["ci95"]
        return f"{100 * entry['accuracy']:.1f} [{100 * low:.0f}, {100 * high:.0f}]"

    lines = ["| estimator | seed | convert s | clean % [95% CI] | MC r=0.25 % | MC r=0.5 % | PGD counterexamples |",
             "|---|---|---|---|---|---|---|"]
    by_estimator: dict[str, list[dict]] = {}
    for r in results:
        by_estimator.setdefault(r["estimator"], []).append(r)
        lines.append(f"| {r['estimator']} | {r['seed']} | {r['convert_seconds']:.0f} | {cell(r['clean'])} | "
                     f"{cell(r['monte_carlo']['0.25'])} | {cell(r['monte_carlo']['0.5'])} | "
                     f"{r['pgd_counterexamples']} / {r['audited']} |")
    for spec, runs in by_estimator.items():
        lines.append(f"| **{spec}, mean of {len(runs)}** | | {statistics.mean(r['convert_seconds'] for r in runs):.0f} "
                     f"| {mean_accuracy(runs, 'clean'):.1f} | {mean_accuracy(runs, 'monte_carlo', '0.25'):.1f} | "
                     f"{mean_accuracy(runs, 'monte_carlo', '0.5'):.1f} | "
                     f"{sum(r['pgd_counterexamples'] for r in runs)} / {sum(r['audited'] for r in runs)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("estimators", nargs="+", help="NAME[:PROBES][,KEY=VALUE...], e.g. paper jl:1,lr=0.01")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0", help="conversion seeds, comma-separated")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    base_dir = args.out / "base"
    if not (base_dir / "model.safetensors").is_file():
        train_demo_base(base_dir, seed=0)
    results_file = args.out / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    done = {(r["estimator"], r["seed"]) for r in results}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for spec in args.estimators:
            if (spec, seed) in done:
                continue
            result = run_one(spec, seed, base_dir, args.out, args.n)
            results.append(result)
            with results_file.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            print(json.dumps(result), file=sys.stderr, flush=True)
    print(summary_table([r for r in results if r["estimator"] in args.estimators]))


if __name__ == "__main__":
    main()
