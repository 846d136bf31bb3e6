"""Cost of a Boot Camp conversion step relative to one ordinary supervised training step, side by side.

    python benchmarks/bootcamp_step_cost.py [--model resnet50] [--size 128] [--batch 4] [--repeats 3]

Both run on the same model, batch and device, interleaved (``benchmarks/run.py``'s conversion benchmark): the
default conversion step (the generic recipe's, lazy penalties timed over a whole period) and the paper's
estimator with ``--reps`` terms, so that the ratios hold across machines. Multiply a published images/s for
ordinary training of the model on your GPU by 1/ratio to estimate conversion throughput (docs/recipes.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import DEFAULT, bench_conversion, step_configurations  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = {**step_configurations((DEFAULT,)), f"paper ({args.reps} reps)": dict(estimator="paper", reps=args.reps)}
    result = bench_conversion(args.model, args.batch, args.size, device, args.repeats, steps)
    plain = result["steps"]["plain cross-entropy"]["seconds"]
    for name in steps:
        row = result["steps"][name]
        print(f"{args.model} {args.size}px batch {args.batch} on {device}: supervised step {plain:.3f}s, {name} step "
              f"{row['seconds']:.3f}s (mean over {row['penalty_every']}), ratio {row['time_vs_plain']:.1f}x")


if __name__ == "__main__":
    main()
