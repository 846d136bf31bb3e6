"""The measurements behind the recipes' default conversion step, shipped with them.

``penalty_cost_study.json`` is the record ``benchmarks/penalty_cost_study.py`` writes (the docs render the same
file: ``docs/records/penalty_cost_study.json`` links to it). ``evidence_text`` renders it as the markdown tables
that ``certify-zoo recipes show`` prints and the docs page shows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVIDENCE_FILE = Path(__file__).parent / "penalty_cost_study.json"


def load_evidence() -> dict[str, Any] | None:
    return json.loads(EVIDENCE_FILE.read_text()) if EVIDENCE_FILE.is_file() else None


def _mean_interval(cell: dict, percent: bool = True) -> str:
    """Mean [95% t interval] over seeds, or the per-seed values when there are fewer than three (a t interval of two
    seeds says little); every quantity here is >= 0, a share also <= 100%."""
    scale, digits = (100, 1) if percent else (1, 2)
    mean = f"{cell['mean'] * scale:.{digits}f}"
    if len(cell["per_seed"]) < 3:
        return mean + " (" + ", ".join(f"{value * scale:.{digits}f}" for value in cell["per_seed"]) + ")"
    low, high = max(0.0, cell["interval"][0]), cell["interval"][1]
    if percent:
        high = min(1.0, high)
    return f"{mean} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def _cost(record: dict, tag: str) -> str:
    """The step's time and memory against plain cross-entropy, on each benchmark model ("-" if not measured)."""
    costs, row = record.get("step_costs") or {}, record.get("cost_rows", {}).get(tag)
    cells = [f"{c[row]['time_vs_plain']:.2f}x / {c[row]['memory_vs_plain']:.2f}x" for c in costs.values()
             if row in c]
    return ", ".join(cells) if cells else "-"


def _reported(row: dict[str, Any]) -> str:
    """PGD counterexamples inside the reported (calibrated) radius, or "no claim" where kappa 0 withdrew it."""
    if "pgd_calibrated_attacked" not in row:
        return "-"
    if not row["pgd_calibrated_attacked"]:
        return "no claim (kappa 0)"
    return f"{row['pgd_calibrated_counterexamples']} of {row['pgd_calibrated_attacked']}"


# what the performance issue asks of a cheaper step against the paper's estimator at the same steps
BAR_POINTS = 2.0


def _difference(cell: dict) -> str:
    """A difference of percentages in points: the mean, with the 95% t interval of the paired difference over seeds
    where the record has one."""
    text = f"{100 * cell['mean']:+.1f}"
    if len(cell.get("per_seed", ())) >= 3:
        text += f" [{100 * cell['interval'][0]:+.1f}, {100 * cell['interval'][1]:+.1f}]"
    return text


def _against_paper(record: dict[str, Any]) -> list[str]:
    """Markdown lines: each row of the record's ``equal_steps`` against its paper row, in points, and which part of
    the bar it misses (mean Monte-Carlo more than 2 points below at a radius, mean kappa smaller at the two decimals
    shown, more PGD counterexamples inside the raw radius)."""
    pairs = record.get("equal_steps") or {}
    if not pairs:
        return []
    lines = ["", f"Against the paper's estimator at the same steps (points; the mean difference [95% t interval of "
                 f"the difference seed by seed]; the bar: Monte-Carlo within {BAR_POINTS:g} points at r = 0.25 and "
                 "0.5, kappa no smaller, no more PGD counterexamples inside the raw radius):", "",
             "| model | step | against | steps | clean | MC@0.25 | MC@0.5 | kappa | PGD inside raw radius | misses |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, groups in pairs.items():
        for paper_tag, rows in groups.items():
            paper = record["labelled"][model][paper_tag]
            for tag, gap in rows.items():
                row = record["labelled"][model][tag]
                kappa, paper_kappa = row["kappa"]["mean"], paper["kappa"]["mean"]
                misses = [f"MC@{radius}" for radius in ("0.25", "0.5")
                          if 100 * gap[f"mc_{radius}"]["mean"] < -BAR_POINTS]
                misses += ["kappa"] * (round(kappa, 2) < round(paper_kappa, 2))
                misses += ["PGD"] * (row["pgd_raw_counterexamples"] > paper["pgd_raw_counterexamples"])
                lines.append(f"| {model} | {tag} | {paper_tag} | {row['steps']} | {_difference(gap['clean'])} | "
                             f"{_difference(gap['mc_0.25'])} | {_difference(gap['mc_0.5'])} | "
                             f"{kappa:.2f} ({paper_kappa:.2f}) | "
                             f"{row['pgd_raw_counterexamples']} ({paper['pgd_raw_counterexamples']}) | "
                             f"{', '.join(misses) or 'none'} |")
    return lines


def evidence_text(record: dict[str, Any]) -> str:
    """Markdown: the default step, its cost beside the others, and what each did to certified quality."""
    default = record.get("default_step") or {}
    models = ", ".join((record.get("step_costs") or {}).keys())
    lines = [f"Default step: {', '.join(f'{k}={v}' for k, v in default.items())}", "",
             f"Labelled models (means over seeds [95% t interval], or (per seed) under three seeds; time / memory per "
             "step against plain cross-entropy "
             f"on {models or 'the benchmark models'}):", "",
             "| model | step | steps | seeds | MC n | clean % | MC@0.25 % | MC@0.5 % | kappa | PGD inside raw radius | "
             "PGD inside reported radius | time / memory per step vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    header = lines[-2:]
    budget = record.get("equal_budget") or {}
    suffix = budget.get("suffix")
    at_budget = []
    for model, tags in record["labelled"].items():
        for tag, row in tags.items():
            line = (f"| {model} | {tag} | {row['steps']} | {len(row['seeds'])} | {row.get('mc_n') or '-'} | "
                    f"{_mean_interval(row['clean'])} | "
                    f"{_mean_interval(row['mc_0.25'])} | {_mean_interval(row['mc_0.5'])} | "
                    f"{_mean_interval(row['kappa'], percent=False)} | "
                    f"{row['pgd_raw_counterexamples']} of {row['pgd_raw_attacked']} | {_reported(row)} | "
                    f"{_cost(record, tag)} |")
            (at_budget if suffix and tag.endswith(suffix) else lines).append(line)
    if at_budget:
        lengths = ", ".join(f"{steps} on {model}" for model, steps in budget["recipe_steps"].items())
        lines += ["", f"At an equal wall-clock budget: each step given the steps that cost {budget['budget']:g} times "
                  f"a plain fine-tuning of the recipe's length ({lengths}), from its time per step:", "", *header,
                  *at_budget]
    lines += _against_paper(record)
    effnet = record.get("efficientnet_lite2") or {}
    if effnet:
        lines += ["", "EfficientNet-Lite2 (ImageNet-1k weights), label-free, on every shipped photo:", "",
                  "| step | seeds | top-1 agreement % | smoothed agreement % | rho p90 | share rho > 1 % |",
                  "|---|---|---|---|---|---|"]
        for tag, row in effnet.items():
            lines.append(f"| {tag} | {len(row['seeds'])} | {_mean_interval(row['top1_agreement'])} | "
                         f"{_mean_interval(row['smoothed_agreement'])} | "
                         f"{_mean_interval(row['rho_p90'], percent=False)} | "
                         f"{_mean_interval(row['rho_share_above_1'])} |")
    return "\n".join(lines)
