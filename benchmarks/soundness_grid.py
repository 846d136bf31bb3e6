"""The demo's soundness / tightness trade-off: convert the demo base under several settings, then certify each
(deterministic + Monte-Carlo on the whole held-out split) and audit its deterministic radii with L2 PGD.

    nice python benchmarks/soundness_grid.py --work /tmp/grid --results grid.jsonl [NAME ...]

One json line per setting is appended to --results as soon as it is measured, so a long run can be watched
and resumed (settings already in the file are skipped). The base is trained once (same seed as the demo).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from certify_zoo.conversion import ConvertSettings, convert
from certify_zoo.demo import DEMO_RADII, train_demo_base
from certify_zoo.evaluation import EvaluateSettings, evaluate
from certify_zoo.recipes import load_recipe

# name -> overrides of recipes/demo.toml (gamma is stated at 1000 classes: 20 = 0.2 effective on 10 classes)
GRID = {
    "recipe": {},
    "gamma10": {"gamma": 10.0},
    "gamma40": {"gamma": 40.0},
    "gamma5": {"gamma": 5.0},
    "epochs80": {"epochs": 80},
    "gamma10-epochs80": {"gamma": 10.0, "epochs": 80},
    "noise-all": {"noise_prob": 1.0},
    "lr0.05": {"lr": 0.05},
    "reps12": {"reps": 12},
    "gamma10-noise-all": {"gamma": 10.0, "noise_prob": 1.0},
}


def summary(record: dict) -> dict:
    def at(block: str, radius: float):
        rows = record["certificates"][block]["certified_accuracy"]
        return next(row["accuracy"] for row in rows if abs(row["radius"] - radius) < 1e-9)

    audit = record.get("audit", {})
    return {"clean": record["clean_accuracy"],
            "det@0.25": at("deterministic", 0.25), "det@0.5": at("deterministic", 0.5),
            "mc@0.25": at("monte_carlo", 0.25), "mc@0.5": at("monte_carlo", 0.5),
            "pgd_steps": audit.get("steps"), "pgd_restarts": audit.get("restarts"),
            "pgd_attacked": audit.get("attacked"), "pgd_counterexamples": audit.get("counterexamples"),
            "gap_median_max_abs": record["agreement"]["gap_to_gaussian_average"]["median_max_abs"],
            "num_images": record["num_images"]}


def certify(folder: Path, sigma: float, n: int, steps: int, restarts: int) -> dict:
    return evaluate(EvaluateSettings(model=str(folder), data="demo", sigma=sigma, radii=DEMO_RADII, method="all", n=n,
                                     audit="pgd", audit_steps=steps, audit_restarts=restarts)).record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="*", default=list(GRID))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--audit-steps", type=int, default=100)
    parser.add_argument("--audit-restarts", type=int, default=4)
    parser.add_argument("--no-base", action="store_true", help="do not certify the base (another run does)")
    arguments = parser.parse_args()
    done = set()
    if arguments.results.exists():
        done = {json.loads(line)["name"] for line in arguments.results.read_text().splitlines() if line.strip()}
    recipe = load_recipe("demo")
    base = arguments.work / "base"
    if not (base / "config.json").exists():
        train_demo_base(base, seed=0)
    jobs = [] if "base" in done or arguments.no_base else [("base", None)]
    jobs += [(name, GRID[name]) for name in arguments.names if name not in done]
    for name, overrides in jobs:
        started = time.perf_counter()
        folder = base
        if overrides is not None:
            folder = arguments.work / name
            convert(ConvertSettings.from_recipe(recipe, model=str(base), data="demo", out=str(folder), overwrite=True,
                                                **overrides))
        record = certify(folder, recipe["sigma"], arguments.n, arguments.audit_steps, arguments.audit_restarts)
        row = {"name": name, "overrides": overrides, **summary(record),
               "seconds": round(time.perf_counter() - started, 1)}
        with arguments.results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
