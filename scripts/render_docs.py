"""Fill the marked regions of README.md and docs/**/*.md from the records committed beside them.

    python scripts/render_docs.py           # rewrite every region from its record
    python scripts/render_docs.py --check   # change nothing; list the regions that differ, exit 1 if any

A region is an HTML comment pair around what a record says, on its own lines or inside one line:

    <!-- record:estimator_study summary -->
    ...rendered, never typed...
    <!-- /record -->

``record:NAME`` reads ``docs/records/NAME.json`` (``recipes`` reads the recipe files the CLI ships). The view after
it is either generic, for any record: ``provenance``, ``value:PATH``, ``percent:PATH``, ``json:PATH``,
``table:PATH`` (PATH is dotted, list indices as numbers; a table is {"columns": [...], "rows": [[...], ...]}), or
one of the views registered for that record in ``VIEWS`` below. A new study needs no code: commit
``docs/records/NAME.json`` with ``title``, ``provenance`` and its tables, and a page whose regions name it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "docs" / "records"
REGION = re.compile(r"<!-- record:(?P<name>[\w-]+) (?P<view>\S+) -->(?P<body>(?:(?!<!-- record:).)*?)<!-- /record -->",
                    re.DOTALL)
FENCE = re.compile(r"^ *```", re.MULTILINE)
DEMO_TITLE = "Demo: base vs converted, certified accuracy (%)"  # as `certify-zoo demo` prints it
OUTPUT_WIDTH = 118  # columns of the rendered terminal output


def pages() -> list[Path]:
    """Every page that may hold regions."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


@dataclass(frozen=True)
class Page:
    path: Path

    def link(self, name: str) -> str:
        """A link from this page to a record file (the records are published with the site)."""
        return os.path.relpath(RECORDS / f"{name}.json", self.path.parent).replace(os.sep, "/")


# ---------------------------------------------------------------------------------------------- reading records

def load_record(name: str) -> Any:
    if name == "recipes":
        return recipes_record()
    path = RECORDS / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no record {path.relative_to(REPO)}")
    return json.loads(path.read_text())


def recipes_record() -> dict:
    """The recipes the package ships, as the CLI loads them: the settings pages describe are these."""
    sys.path.insert(0, str(REPO))
    from certify_zoo.recipes import available_recipes, load_recipe

    return {name: load_recipe(name) for name in available_recipes()}


def at(record: Any, path: str) -> Any:
    value = record
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


# ---------------------------------------------------------------------------------------------- formatting

def pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def ratio_range(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}x" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}x"


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- generic views

def provenance(record: dict, page: Page, name: str) -> str:
    """Where a record's numbers come from: command, code, date, machine; and a link to the record itself.

    Records written straight by a benchmark script may keep these at the top level instead of in ``provenance``.
    A record gathered over many commits keeps ``code`` as a list, one entry per group of rows: a bulleted list
    after the sentence, where one paragraph of them would be a wall."""
    p = record.get("provenance") or {k: record[k] for k in ("command", "date", "what", "machine", "code")
                                     if k in record}
    parts = [" ".join(part for part in (f"Measured {p['date']}" if p.get("date") else "Measured",
                                        f"with `{p['command']}`" if p.get("command") else "",
                                        f"({p['what']})" if p.get("what") else "") if part)]
    groups = p["code"] if isinstance(p.get("code"), list) else []
    for key in ("code", "machine", "seeds", "setup"):
        if not p.get(key):
            continue
        if key == "code" and groups:
            value = "per group of rows, below"
        elif isinstance(p[key], str):
            value = p[key]
        else:
            value = ", ".join(f"{k} {v}" for k, v in p[key].items())
        parts.append(f"{key}: {value}")
    if p.get("source"):
        parts.append(f"source: {p['source']}")
    sentence = "; ".join(parts) + f". Record: [`{name}.json`]({page.link(name)})."
    return sentence + ("\n\n" + "\n".join(f"- {group}" for group in groups) if groups else "")


def generic_view(view: str, record: Any, page: Page, name: str) -> str:
    kind, _, path = view.partition(":")
    if kind == "provenance":
        return provenance(record, page, name)
    if kind == "value":
        value = at(record, path)
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    if kind == "percent":
        return pct(at(record, path))
    if kind == "json":
        return "```json\n" + json.dumps(at(record, path), indent=2) + "\n```"
    if kind == "table":
        table = at(record, path)
        return markdown_table(table["columns"], table["rows"])
    raise KeyError(f"unknown view {view!r} of record {name!r}")


# ---------------------------------------------------------------------------------------------- demo

def demo_printed(record: dict, with_lines: bool) -> str:
    """What `certify-zoo demo` prints on stdout: the table, then (``with_lines``) the audit sentences."""
    sys.path.insert(0, str(REPO))
    from rich.console import Console

    from certify_zoo.report import audit_lines, certification_table

    with open(os.devnull, "w") as sink:
        console = Console(width=OUTPUT_WIDTH, record=True, file=sink, color_system=None)
        console.print(certification_table([record["base"], record["converted"]], ["base", "converted"],
                                          title=DEMO_TITLE))
        for name in ("base", "converted") if with_lines else ():
            for line in audit_lines(record[name]):
                console.print(f"{name}: {line}", highlight=False)
        text = "\n".join(line.rstrip() for line in console.export_text().splitlines())
    return f"```text\n{text}\n```"


def demo_output(record: dict, page: Page) -> str:
    return demo_printed(record, with_lines=True)


def demo_table(record: dict, page: Page) -> str:
    return demo_printed(record, with_lines=False)


def demo_card_metric(record: dict, page: Page) -> str:
    """One metric of the converted demo model's model-index, as its card's metadata carries it."""
    sys.path.insert(0, str(REPO))
    import yaml
    from huggingface_hub.repocard_data import eval_results_to_model_index

    from certify_zoo.card import eval_results

    chosen = [result for result in eval_results(record["converted"])
              if result.metric_type == "certified_accuracy" and result.metric_args.get("certificate") == "monte_carlo"
              and math.isclose(result.metric_args["radius"], 0.5)]
    index = eval_results_to_model_index("converted", chosen)
    return "```yaml\n" + yaml.safe_dump(index, sort_keys=False).rstrip() + "\n```"


def certified(record: dict, certificate: str, radius: float) -> float:
    rows = record["certificates"][certificate]["certified_accuracy"]
    return next(row["accuracy"] for row in rows if math.isclose(row["radius"], radius))


def demo_summary(record: dict, page: Page) -> str:
    """The demo's result in one sentence: what conversion bought, and what the audit found."""
    base, converted = record["base"], record["converted"]
    audit, base_audit = converted["audit"], base["audit"]
    return (f"the converted model keeps {pct(converted['clean_accuracy'])}% clean accuracy (base "
            f"{pct(base['clean_accuracy'])}%) and certifies {pct(certified(converted, 'monte_carlo', 0.25))}% / "
            f"{pct(certified(converted, 'monte_carlo', 0.5))}% of the held-out digits at L2 radius 0.25 / 0.5 with "
            f"the Monte-Carlo certificate, against the base's {pct(certified(base, 'monte_carlo', 0.25))}% / "
            f"{pct(certified(base, 'monte_carlo', 0.5))}%; PGD breaks {audit['counterexamples']} of the converted "
            f"model's {audit['attacked']} one-forward-pass claims, and {base_audit['counterexamples']} of the "
            f"base's {base_audit['attacked']}")


def demo_duration(record: dict, page: Page) -> str:
    p, threads = record["provenance"], record["provenance"]["machine"]["torch_threads"]
    return (f"{p['seconds'] / 60:.1f} minutes on {p['machine']['cpu_cores_available']} CPU cores, {threads} torch "
            f"thread{'s' if threads > 1 else ''}")


def demo_agreement(record: dict, page: Page) -> str:
    """Deterministic vs Monte-Carlo per radius, and the gap to the Gaussian average, base and converted."""
    rows = []
    for name in ("base", "converted"):
        agreement = record[name]["agreement"]
        gap = agreement["gap_to_gaussian_average"]
        cells = [f"{pct(row['deterministic'])} / {pct(row['monte_carlo'])}" for row in agreement["certified_accuracy"]]
        rows.append([name, *cells, f"{gap['median_max_abs']:.3f}"])
    radii = [f"r = {row['radius']:g}" for row in record["converted"]["agreement"]["certified_accuracy"]]
    return markdown_table(["model", *[f"{r}: det. / MC %" for r in radii],
                           "median max_c abs(softmax v(x) - E softmax v(x+eta))"], rows)


def demo_radius_reach(record: dict, page: Page) -> str:
    """How far each certificate of the converted demo model reaches."""
    converted = record["converted"]
    deterministic = converted["certificates"]["deterministic"]["certified_accuracy"]
    monte_carlo = {row["radius"]: row["accuracy"]
                   for row in converted["certificates"]["monte_carlo"]["certified_accuracy"]}
    first_zero = next((row["radius"] for row in deterministic if row["accuracy"] == 0), None)
    if first_zero is None:
        return "on the demo the deterministic radius certifies images at every radius measured"
    return (f"on the demo the deterministic radius certifies nothing at r = {first_zero:g}, where Monte-Carlo still "
            f"certifies {pct(monte_carlo[first_zero])}%")


# ---------------------------------------------------------------------------------------------- benchmarks

def benchmark_tables(record: dict, page: Page) -> str:
    """The tables exactly as `benchmarks/run.py --tables-from RECORD` prints them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from run import markdown_tables

    return markdown_tables(record["run"])


def steps_of(run: dict, step: str) -> list[dict]:
    """One step's measurements on every model of a run in `benchmarks/run.py --json`'s layout (also gpu_check's)."""
    return [model["conversion"]["steps"][step] for model in run["models"].values()]


def step_cost_rows(run: dict) -> tuple[list[list[str]], bool]:
    """Per step but the plain one: time, peak memory (and RSS where measured) against a plain step, as ranges over the
    run's models; and whether the run measured RSS."""
    first = next(iter(run["models"].values()))["conversion"]
    with_rss = "rss_method" in first
    rows = []
    for step in first["steps"]:
        if step == "plain cross-entropy":
            continue
        steps = steps_of(run, step)
        rows.append([f"`{step}`", ratio_range([s["time_vs_plain"] for s in steps]),
                     ratio_range([s["memory_vs_plain"] for s in steps])]
                    + ([ratio_range([s["rss_vs_plain"] for s in steps])] if with_rss else []))
    return rows, with_rss


def benchmark_step_costs(record: dict, page: Page) -> str:
    """Each estimator's step cost as the range over the benchmarked models."""
    rows, with_rss = step_cost_rows(record["run"])
    models = ", ".join(model["arch"] for model in record["run"]["models"].values())
    header = ["step", "time vs a plain cross-entropy step", "peak memory vs a plain step"]
    return (markdown_table(header + (["resident memory (RSS) vs a plain step"] if with_rss else []), rows)
            + f"\n\nRange over {models} (benchmark below)."
            + (" Peak memory: the tensors alive at once, what a GPU's allocator peak reports; RSS: the process's "
               "resident high-water, which also holds what the CPU allocator keeps after frees." if with_rss else ""))


def benchmark_certification(record: dict, page: Page) -> str:
    models = record["run"]["models"].values()
    deterministic = ratio_range([m["certification"]["deterministic_vs_plain"] for m in models])
    noisy = ratio_range([m["certification"]["mc_noisy_vs_plain"] for m in models])
    speedup = min(m["certification"]["deterministic_speedup_vs_mc_n100000"] for m in models)
    return (f"the deterministic certificate runs at {deterministic} the speed of plain inference, Monte-Carlo's "
            f"noisy forwards at {noisy}, and one deterministic certificate is at least {speedup:,.0f}x faster than "
            "Monte-Carlo at n = 100,000")


def benchmark_stack(record: dict, page: Page) -> str:
    parts = []
    for key, model in record["run"]["models"].items():
        stack = model.get("stack")
        if stack:
            parts.append(f"{key}: channels_last {stack['channels_last_vs_eager']:.2f}x, torch.compile "
                         f"{stack['compiled_vs_eager']:.2f}x")
    return "; ".join(parts)


IMAGENET_TRAIN_IMAGES = 1_281_167
# Outside assumptions of the estimate, not measurements of ours (stated on the page where they are used).
PLAIN_TRAINING_IMAGES_PER_S = 1_000  # fp32/TF32 ResNet-50 training on one A100-class GPU, order of magnitude
SCALING_EFFICIENCY = (0.85, 0.95)  # data-parallel ResNet-50


def span(low: float, high: float, spec: str) -> str:
    """'low-high' at ``spec``, or one number where both round alike."""
    low_text, high_text = format(low, spec), format(high, spec)
    return low_text if low_text == high_text else f"{low_text}-{high_text}"


def imagenet_estimate(record: dict, page: Page) -> str:
    """Hours per ImageNet epoch of a conversion: the measured step-cost ratio times an ordinary training epoch."""
    rows = []
    for step in ("paper (6 reps)", "jl (1 probe)"):
        ratios = [s["time_vs_plain"] for s in steps_of(record["run"], step)]
        one_gpu = [IMAGENET_TRAIN_IMAGES / PLAIN_TRAINING_IMAGES_PER_S * r / 3600 for r in (min(ratios), max(ratios))]
        eight = [one_gpu[0] / (8 * SCALING_EFFICIENCY[1]) * 60, one_gpu[1] / (8 * SCALING_EFFICIENCY[0]) * 60]
        sixteen = [one_gpu[0] / (16 * SCALING_EFFICIENCY[1]) * 60, one_gpu[1] / (16 * SCALING_EFFICIENCY[0]) * 60]
        rows.append([f"`{step}`", ratio_range(ratios), f"{span(*one_gpu, '.1f')} h", f"{span(*eight, '.0f')} min",
                     f"{span(*sixteen, '.0f')} min"])
    return markdown_table(["estimator", "step cost (measured, CPU)", "1 GPU", "8 GPUs", "2 nodes x 8 GPUs"], rows)


# ---------------------------------------------------------------------------------------------- estimator study

def runs_by_group(record: dict) -> list[tuple[dict, list[dict]]]:
    return [(group, [run for run in record["runs"] if run["estimator"] == group["spec"]]) for group in record["groups"]]


def mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {se:.1f}"


def estimator_summary(record: dict, page: Page) -> str:
    """Per estimator setting: mean over seeds with its standard error, the lowest clean accuracy in brackets."""
    rows = []
    for group, runs in runs_by_group(record):
        clean = [100 * r["clean"]["accuracy"] for r in runs]
        attacked, broken = sum(r["audited"] for r in runs), sum(r["pgd_counterexamples"] for r in runs)
        rows.append([f"{group['label']} (`{group['spec']}`)", len(runs), f"{mean_se(clean)} ({min(clean):.1f})",
                     mean_se([100 * r["monte_carlo"]["0.25"]["accuracy"] for r in runs]),
                     mean_se([100 * r["monte_carlo"]["0.5"]["accuracy"] for r in runs]),
                     f"{broken} / {attacked} ({100 * broken / attacked:.2f}%)",
                     f"{statistics.mean(r['convert_seconds'] for r in runs):.0f}"])
    return markdown_table(["estimator (demo recipe otherwise)", "seeds", "clean % mean ± s.e. (lowest)",
                           "MC r=0.25 %", "MC r=0.5 %", "PGD counterexamples / audited", "convert s"], rows)


def estimator_per_seed(record: dict, page: Page) -> str:
    """Every run with its 95% intervals, exactly as `benchmarks/estimator_quality.py` prints them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from estimator_quality import summary_table

    return summary_table(record["runs"])


def estimator_code(record: dict, page: Page) -> str:
    codes: dict[str, list[str]] = {}
    for group in record["groups"]:
        codes.setdefault(group["code"], []).append(f"`{group['spec']}`")
    return "\n".join(f"- {', '.join(specs)}: {code}." for code, specs in codes.items())


def group_means(record: dict, spec: str) -> dict[str, float]:
    runs = next(runs for group, runs in runs_by_group(record) if group["spec"] == spec)
    return {"clean": statistics.mean(100 * r["clean"]["accuracy"] for r in runs),
            "mc@0.25": statistics.mean(100 * r["monte_carlo"]["0.25"]["accuracy"] for r in runs),
            "mc@0.5": statistics.mean(100 * r["monte_carlo"]["0.5"]["accuracy"] for r in runs),
            "lowest": min(100 * r["clean"]["accuracy"] for r in runs), "seeds": len(runs),
            "broken": sum(r["pgd_counterexamples"] for r in runs), "attacked": sum(r["audited"] for r in runs)}


def estimator_verdict(record: dict, page: Page) -> str:
    """The comparison the demo recipe's choice rests on, computed from the runs."""
    demo = next(g["spec"] for g in record["groups"] if g.get("demo_recipe"))
    jl, paper, unclipped = (group_means(record, s)
                            for s in (demo, "paper,clip_grad_norm=1.0", "paper,clip_grad_norm=0"))
    gaussian = group_means(record, "jl:1,probe_distribution=gaussian,clip_grad_norm=1.0")
    return (f"Against the paper's estimator with the same clip, one Rademacher probe certifies "
            f"{jl['mc@0.25']:.1f}% vs {paper['mc@0.25']:.1f}% at r = 0.25 and {jl['mc@0.5']:.1f}% vs "
            f"{paper['mc@0.5']:.1f}% at r = 0.5 ({jl['seeds']} seeds each), with {jl['broken']} PGD counterexamples "
            f"in {jl['attacked']} claims against {paper['broken']} in {paper['attacked']}. Without the clip the "
            f"paper's estimator kept as little as {unclipped['lowest']:.1f}% clean accuracy (lowest of "
            f"{unclipped['seeds']} seeds; mean {unclipped['clean']:.1f}%), against {jl['lowest']:.1f}% for the "
            f"clipped one-probe estimator. One Gaussian probe with the same clip certifies "
            f"{jl['mc@0.25'] - gaussian['mc@0.25']:.1f} / {jl['mc@0.5'] - gaussian['mc@0.5']:.1f} points less at "
            f"r = 0.25 / 0.5 than one Rademacher probe.")


def estimator_collapse(record: dict, page: Page) -> str:
    runs = [r for r in record["runs"] if r["estimator"] == "jl:1,probe_distribution=gaussian,clip_grad_norm=0"]
    clean = [100 * r["clean"]["accuracy"] for r in runs]
    return f"{min(clean):.1f}-{max(clean):.1f}%"


def gradient_norms(record: dict, page: Page) -> str:
    norms = record["observations"]["gradient_norm"]
    return f"~{norms['first_hundred_steps']:g} in the first hundred steps, ~{norms['later']:g} later"


# ---------------------------------------------------------------------------------------------- soundness grid

def grid_table(record: dict, page: Page) -> str:
    rows = []
    for row in record["rows"]:
        audit = "-" if row["pgd_attacked"] is None else (
            f"{row['pgd_counterexamples']}/{row['pgd_attacked']} "
            f"({100 * row['pgd_counterexamples'] / row['pgd_attacked']:.1f}%; "
            f"{row['pgd_steps']} steps, {row['pgd_restarts']} restarts)")
        rows.append([row["name"], f"{row['mc_n']:,}", pct(row["clean"]), pct(row["mc@0.25"]), pct(row["mc@0.5"]),
                     pct(row["det@0.25"]), pct(row["det@0.5"]), audit, row["code"]])
    return markdown_table(["setting (overrides of the demo recipe)", "MC n", "clean", "MC@0.25", "MC@0.5",
                           "det@0.25", "det@0.5", "PGD counterexamples", "code"], rows)


def grid_warmup_spread(record: dict, page: Page) -> str:
    """Clean accuracy of the same short-warm-up setting in different random streams."""
    runs = [row for row in record["rows"] if row["name"].startswith("gamma 20, warm-up 10%, run")]
    return " and ".join(f"{pct(row['clean'])}%" for row in runs)


# ---------------------------------------------------------------------------------------------- gamma study

def gamma_summary(record: dict, page: Page) -> str:
    """Per model and setting (tag), means over seeds: what --gamma auto with the calibrated radius gives, the raw
    radius beside it, and the PGD audit of both (counterexamples summed over seeds); runs on the whole evaluation
    split."""
    return _gamma_table([run for run in record["runs"] if "evaluated_on" not in run])


def gamma_rho_penalty(record: dict, page: Page) -> str:
    """The prototypes with a penalty on rho (removed), beside the paper's penalty on the same bases: the recipes'
    defaults, the same defaults converted again beside the prototypes and certified at their Monte-Carlo n, and the
    settings a prototype was compared with (30 epochs, frozen BatchNorm)."""
    models = {run["model"] for run in record["runs"] if run.get("tag") in RHO_PENALTY_PROTOTYPES}
    return _gamma_table([run for run in record["runs"] if run["model"] in models and "evaluated_on" not in run
                         and run.get("tag") in RHO_PENALTY_PROTOTYPES + RHO_PENALTY_BESIDE])


RHO_PENALTY_PROTOTYPES = ("rho penalty (not shipped)", "rho penalty on the clean images (not shipped)",
                          "rho penalty, bn_mode eval (not shipped)", "rho penalty, 30 epochs (not shipped)",
                          "paper's penalty plus 100 x the rho hinge (not shipped)")
RHO_PENALTY_BESIDE = ("defaults", "paper, side by side", "paper's penalty, beside rho", "30 epochs", "bn_mode eval")


def gamma_fidelity_target(record: dict, page: Page) -> str:
    """The prototypes with a sharper fidelity target (removed), beside the recipe's defaults converted again from the
    same base."""
    return _gamma_table([run for run in record["runs"] if run.get("tag") in FIDELITY_TARGET_ROWS])


FIDELITY_TARGET_ROWS = ("defaults, beside the fidelity targets", "fidelity target at temperature 0.25 (not shipped)",
                        "fidelity target at temperature 0.1 (not shipped)",
                        "clean images' target half the student's noisy vote (not shipped)",
                        "clean images' target the student's noisy vote (not shipped)")


def gamma_check_data(record: dict, page: Page) -> str:
    """The same table for the runs certified on half of the evaluation split: calibrated on a slice of the
    conversion data, or on the other half (--check-data)."""
    return _gamma_table([run for run in record["runs"] if "evaluated_on" in run])


def _seed_mean(runs: list[dict], key: str, radius: str | None = None, interval: bool = False) -> str:
    """Mean of a gamma study quantity over seeds, in percent; with ``interval``, the half-width of its 95%
    t-interval too."""
    values = [100 * (r[key] if radius is None else r[key][radius]) for r in runs]
    if len(values) < 2 or not interval:
        return f"{statistics.mean(values):.1f}"
    sys.path.insert(0, str(REPO / "benchmarks"))
    from seeds import t_half_width

    return f"{statistics.mean(values):.1f} ± {t_half_width(values):.1f}"


def noise_capacity_table(record: dict, page: Page) -> str:
    """Per study model: its 10-epoch label-free conversion with the recipe's defaults (the gamma study's 'defaults'
    rows), and the same architecture taught the noise with labels (benchmarks/noise_capacity.py); each beside the
    base it started from (a base trained again on another day need not be the same network: the ViT's was not)."""
    conversions = [run for run in load_record("gamma_study")["runs"]
                   if run.get("tag") == "defaults" and "evaluated_on" not in run]
    radii = ("0.0", "0.25", "0.5")

    def row(model: str, training: str, runs: list[dict]) -> list:
        return [model, training, len(runs), f"{runs[0]['n']:,}",
                f"{_seed_mean(runs, 'clean', interval=True)} ({_seed_mean(runs[:1], 'base_clean')})",
                *[f"{_seed_mean(runs, 'mc', r, True)} ({_seed_mean(runs[:1], 'base_mc', r)})" for r in radii]]

    rows = []
    for model in dict.fromkeys(run["model"] for run in record["runs"]):
        defaults = [run for run in conversions if run["model"] == model]
        if defaults:
            rows.append(row(model, "conversion, recipe defaults, 10 epochs, no labels (gamma study)", defaults))
        for setting in dict.fromkeys(run["setting"] for run in record["runs"] if run["model"] == model):
            rows.append(row(model, f"{setting}, labels and noise",
                            [run for run in record["runs"] if run["model"] == model and run["setting"] == setting]))
    return markdown_table(["model", "training", "seeds", "MC n", "clean % ± 95% CI (base)", "MC@0 % (base)",
                           "MC@0.25 % (base)", "MC@0.5 % (base)"], rows)


def _pgd_counts(runs: list[dict], key: str) -> tuple[int, int]:
    """(counterexamples, attacked) of the PGD audit ``key`` (pgd_calibrated or pgd_raw), summed over ``runs``."""
    return sum(r[key]["counterexamples"] for r in runs), sum(r[key]["attacked"] for r in runs)


def _gamma_table(runs: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["model"], run.get("tag", "")), []).append(run)

    def broken(runs: list[dict], key: str) -> str:
        counterexamples, attacked = _pgd_counts(runs, key)
        return f"{counterexamples}/{attacked}" if attacked else "no claim (kappa 0)"

    rows = []
    for (model, tag), runs in groups.items():
        rows.append([model, tag, runs[0].get("recipe", "-"), len(runs),
                     f"{runs[0]['n']:,}" if runs[0].get("n") else "-",
                     f"{statistics.mean(r['kappa'] for r in runs):.2f}",
                     f"{_seed_mean(runs, 'clean', interval=True)} ({_seed_mean(runs, 'base_clean')})",
                     *[f"{_seed_mean(runs, 'mc', r, True)} ({_seed_mean(runs, 'base_mc', r)})"
                       for r in ("0.25", "0.5")],
                     *[f"{_seed_mean(runs, 'det_calibrated', r, True)} / {_seed_mean(runs, 'det_raw', r)}"
                       for r in ("0.25", "0.5")],
                     broken(runs, "pgd_calibrated"), broken(runs, "pgd_raw")])
    return markdown_table(["model", "setting", "recipe", "seeds", "MC n", "kappa", "clean % ± 95% CI (base)",
                           "MC@0.25 % (base)",
                           "MC@0.5 % (base)", "det@0.25 % calibrated / raw", "det@0.5 % calibrated / raw",
                           "PGD broke, calibrated", "PGD broke, raw"], rows)


def gamma_flip_ratios(record: dict, page: Page) -> str:
    """Held-out, trained and evaluation images of the same conversions: PGD flips inside the calibrated radius
    (summed over seeds) and the shortest flip as a share of the raw claim (mean over seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in record["runs"]:
        if "flip_ratios" in run:
            groups.setdefault((run["model"], run["tag"]), []).append(run["flip_ratios"])
    sets = ("held-out", "trained", "evaluation")

    def cell(found: list[dict], name: str) -> str:
        inside = sum(f[name]["inside_calibrated"] for f in found)
        shortest = [f[name]["shortest"] for f in found if f[name]["shortest"] is not None]
        return (f"{inside}/{sum(f[name]['attacked'] for f in found)}, "
                + (f"{statistics.mean(shortest):.2f}" if shortest else "none"))

    rows = [[model, tag, len(found), f"{statistics.mean(f['kappa'] for f in found):.2f}",
             *[cell(found, name) for name in sets]] for (model, tag), found in groups.items()]
    return markdown_table(["model", "setting", "seeds", "kappa", *[f"{name}: flips inside / attacked, shortest"
                                                                  for name in sets]], rows)


# the recipes' own settings: "defaults" (the built models for 10 epochs, the demo for its recipe's 40), the built
# models for 30 epochs, and for as many passes as give 840 steps (what `convert` now runs on folders this small)
DEFAULT_TAGS = ("defaults", "30 epochs", "min steps (default)")


def gamma_headline(record: dict, page: Page) -> str:
    """One sentence for the README: how many conversions of how many models, and what PGD found in each radius."""
    runs = [run for run in record["runs"] if run.get("tag") in DEFAULT_TAGS]
    models = sorted({run["model"] for run in runs})

    def broken(key: str) -> str:
        return "{} of {}".format(*_pgd_counts(runs, key))

    longer = any(run["tag"] != "defaults" for run in runs)
    return (f"{len(runs)} conversions of {len(models)} models ({', '.join(models)}) with the recipes' defaults"
            + (" (the models built here for 10 and for 30 epochs, and for 840 steps)" if longer else "") + ": PGD "
            f"broke {broken('pgd_calibrated')} calibrated deterministic claims on the held-out splits, and "
            f"{broken('pgd_raw')} raw ones")


def gamma_demo_spread(record: dict, page: Page) -> str:
    """How far the demo's figures move between runs: the study's demo conversions with the recipe's defaults (two
    bases, each trained from seed 0 on another thread count, four conversion seeds each), per certificate at r = 0.25
    the lowest and highest certified accuracy."""
    runs = [run for run in record["runs"]
            if run["model"] == "demo" and run["tag"] in ("defaults", "second base, defaults")]

    def spread(key: str) -> str:
        values = [100 * run[key]["0.25"] for run in runs]
        return f"{min(values):.1f}% to {max(values):.1f}%"

    kappas = [run["kappa"] for run in runs]
    broken = sum(run["pgd_calibrated"]["counterexamples"] for run in runs)
    return (f"over {len(runs)} conversions of the demo ({len({run['base_clean'] for run in runs})} bases, "
            f"{len({run['seed'] for run in runs})} seeds each), Monte-Carlo certified {spread('mc')} of the held-out "
            f"digits at r = 0.25 and the calibrated deterministic radius {spread('det_calibrated')} (kappa "
            f"{min(kappas):.2f} to {max(kappas):.2f}); PGD broke {broken} of their calibrated claims")


def _seeds(model: str, count: int) -> str:
    return f"{model} ({count} seed{'s' * (count != 1)})"


def gamma_recipes(record: dict, page: Page) -> str:
    """Per shipped recipe: the study models converted with its defaults (10 epochs; the demo's own length), what
    they certified, and whether PGD broke a reported radius; a recipe no study model used says so."""
    from certify_zoo.recipes import available_recipes

    rows = []
    for recipe in available_recipes():
        runs = [r for r in record["runs"] if r.get("recipe") == recipe and r.get("tag") == "defaults"]
        if not runs:
            rows.append([f"`{recipe}`", "not measured on a model here", *["-"] * 5])
            continue
        models = sorted({r["model"] for r in runs})
        reported = [r for r in runs if r["pgd_calibrated"]["attacked"]]
        rows.append([f"`{recipe}`", ", ".join(_seeds(m, sum(r["model"] == m for r in runs)) for m in models),
                     f"{_seed_mean(runs, 'clean')} ({_seed_mean(runs, 'base_clean')})",
                     f"{_seed_mean(runs, 'mc', '0.5')} ({_seed_mean(runs, 'base_mc', '0.5')})",
                     f"{statistics.mean(r['kappa'] for r in runs):.2f}",
                     f"{len(reported)} of {len(runs)}",
                     "{} of {}".format(*_pgd_counts(reported, "pgd_calibrated")) if reported else "-"])
    return markdown_table(["recipe", "study models (seeds)", "clean % (base)", "Monte-Carlo@0.5 % (base)", "kappa",
                           "conversions reporting a deterministic radius", "PGD broke, inside it"], rows)


def gamma_near_ties(record: dict, page: Page) -> str:
    """Per seed of the runs whose self-check counted the base's near-ties among the held-out images: how many, the
    student's agreement with the base on all of them and where the base is sure, and what the conversion kept."""
    rows = [[run["model"], run["tag"], run["seed"],
             f"{run['self_check']['base_near_ties']} of {run['self_check']['held_out_images']}",
             f"{100 * run['self_check']['agreement_with_base']:.1f}",
             f"{100 * run['self_check']['agreement_where_base_sure']:.1f}",
             f"{run['gamma_final_effective']:.4g}", f"{100 * run['clean']:.1f} ({100 * run['base_clean']:.1f})"]
            for run in record["runs"] if "base_near_ties" in (run.get("self_check") or {})]
    return markdown_table(["model", "setting", "seed", "near-ties among the held-out images",
                           "agreement with the base, all held-out %", "where the base is sure %",
                           "gamma (effective, final)", "clean % (base)"], rows)


def gamma_trajectories(record: dict, page: Page) -> str:
    """The controller at work: gamma and rho at every check of the first seed of each model (defaults only)."""
    parts = []
    for run in record["runs"]:
        if run.get("tag") != "defaults" or run["seed"] != min(r["seed"] for r in record["runs"]
                                                               if r["model"] == run["model"]):
            continue
        steers_lr = any("lr_scale" in point for point in run["gamma_trajectory"])  # AdamW: the lr lever
        rows = [[point["step"], f"{point['gamma']:.4g}", f"{point['rho_quantile']:.2f}",
                 f"{100 * point['share_above_1']:.1f}", f"{100 * point['agreement']:.1f}", f"{point['factor']:.2f}",
                 *([point["lever"], f"{point['lr_scale']:g}", f"{point['penalty_share']:.2f}"] if steers_lr else [])]
                for point in run["gamma_trajectory"]]
        parts.append(f"**{run['model']}** (seed {run['seed']}, {run['steps']} steps):\n\n" + markdown_table(
            ["step", "gamma (stated at 1000 classes)", "rho 99th pct", "% rho > 1", "agreement %", "factor",
             *(["lever", "lr scale", "penalty share of the loss"] if steers_lr else [])], rows))
    return "\n\n".join(parts)


def gamma_step_limits(record: dict, page: Page) -> str:
    """The SGD step each penalty estimator tolerated, from the controller's trajectories: per check interval the
    weight in force is k x lr x gamma (gamma set at the check that opened it, stated at 1000 classes; lr the
    schedule's there; k the lazy period); per setting, the weight over the first interval that breached the
    agreement floor (the next check sent the student back) and the largest over an interval that kept it, per seed."""
    rows = []
    for model, tag in STEP_LIMIT_SETTINGS:
        runs = sorted((run for run in record["runs"] if run["model"] == model and run.get("tag") == tag),
                      key=lambda run: run["seed"])
        if not runs:
            raise ValueError(f"gamma_study.json has no {model} run tagged {tag!r}")
        breached, held = [], []
        for run in runs:
            overrides = run.get("overrides", {})
            # a replayed lazy penalty (prototype) adds its every-step weight on each of the k steps: no k-fold step
            k = 1 if overrides.get("penalty_replay") else overrides.get("penalty_every", 1)
            points = run["gamma_trajectory"]
            if any("lr" not in point for point in points[:-1]):
                raise ValueError(f"{model} {tag!r} seed {run['seed']}: a check without its lr")
            weights = [(k * point["lr"] * point["gamma"], "restored_to_step" in following)
                       for point, following in zip(points, points[1:]) if not following.get("final")]
            first = next((weight for weight, broke in weights if broke), None)
            breached.append("none" if first is None else f"{first:.3f}")
            held.append(f"{max(weight for weight, broke in weights if not broke):.3f}")
        switched = sum(any("estimator_from_here" in point for point in run["gamma_trajectory"]) for run in runs)
        rows.append([model, tag, runs[0].get("overrides", {}).get("estimator", "paper"), len(runs),
                     sum("restored_to_step" in point for run in runs for point in run["gamma_trajectory"]),
                     switched if tag == "adaptive" else "-", ", ".join(breached), ", ".join(held)])
    return markdown_table(["model", "setting", "estimator", "seeds", "breaches (all seeds)",
                           "seeds that switched to the paper's", "k x lr x gamma at the first breach, per seed",
                           "largest k x lr x gamma that kept the floor, per seed"], rows)


# the penalty steps of two BatchNorm CNNs side by side: the paper's estimator (their recipes'), one probe on every
# step, lazy, one probe until a breach ("adaptive"), and two prototypes measured and removed (margin probe, replay)
STEP_LIMIT_SETTINGS = (("cnn16", "paper, side by side"), ("cnn16", "jl 2 probes"), ("cnn16", "jl 1 probe"),
                       ("cnn16", "jl 1 probe, k=4"), ("cnn16", "jl 1 probe, k=8"), ("cnn16", "adaptive"),
                       ("cnn16", "margin probe (not shipped)"), ("cnn16", "paper k=4, replayed (not shipped)"),
                       ("effnet16", "paper, side by side"), ("effnet16", "adaptive"))


def penalty_noise_table(record: dict, page: Page) -> str:
    """Per model and estimator: the draws' mean cosine and noise-to-signal ratio, mean over batches (range)."""
    estimators = list(record["models"][0]["per_batch"][0])

    def cell(batches: list[dict], estimator: str) -> str:
        def mean_range(key: str) -> str:
            values = [batch[estimator][key] for batch in batches]
            spread = f" ({min(values):.2f} to {max(values):.2f})" if len(values) > 1 else ""
            return f"{statistics.mean(values):.2f}{spread}"
        return f"{mean_range('cosine')} / {mean_range('noise_to_signal')}"

    rows = [[model["model"], f"{model['batches']} x {model['batch']}",
             *[cell(model["per_batch"], estimator) for estimator in estimators]] for model in record["models"]]
    return markdown_table(["model", "batches x images", *[f"{name}: cosine / noise-to-signal" for name in estimators]],
                          rows)


# ---------------------------------------------------------------------------------------------- conversion safety

def efficientnet_safety(record: dict, page: Page) -> str:
    """The real EfficientNet-Lite2 on real photos: what short conversions with its recipe did to its predictions."""
    from certify_zoo.recipes import load_recipe

    start = load_recipe("efficientnet")["gamma_start"]  # the recipe as it ships: a record of another start is stale
    # the README's line: the recipe's 20-step runs (the study's table holds every run, the 2- and 200-step ones too)
    runs = [run for run in record["efficientnet_lite2"] if run.get("bn_mode", "eval") == "eval"
            and run.get("gamma", "auto") == "auto" and run.get("gamma_start") == start and run["steps"] == 20
            and not run.get("variant")]
    if not runs:
        raise ValueError(f"conversion_safety.json has no run from the efficientnet recipe's gamma_start {start}: "
                         "measure it again (benchmarks/conversion_safety.py)")
    return "; ".join(f"{run['steps']} steps (seed {run.get('seed', 0)}{_check_data(run)}) kept the top-1 class of "
                     f"{run['kept_top1_confident']} of its {run['confident_photos']} confident photos "
                     f"({run['kept_top1_all']} of {run['photos']} in all)"
                     + (f"; on the {run['check_photos']} further photos it kept the top-1 class of "
                        f"{run['check_kept_top1_confident']} of their {run['check_confident_photos']} confident ones "
                        f"({run['check_kept_top1_all']} in all) and reported gamma {run['gamma_final_effective']:.4g} "
                        f"(effective), rho's 90th percentile {run['self_check']['rho']['p90']:.2f} and "
                        + (f"kappa {run['kappa']:.2f}" if run["kappa"] else "kappa 0 (no deterministic radius)")
                        if "check_data_images" in run else "")
                     for run in runs)


def _check_data(run: dict) -> str:
    """How a conversion of the real model was calibrated, when not on its held-out conversion photo."""
    return f", --check-data: {run['check_data_images']} further photos" if "check_data_images" in run else ""


def _gamma_setting(run: dict) -> str:
    """How a conversion set gamma: "auto from START" (the controller's start, an effective weight: at 1000 classes
    the same number as gamma) or the fixed number."""
    gamma = run.get("gamma", "auto")
    setting = f"auto from {run['gamma_start']:g}" if gamma == "auto" and "gamma_start" in run else str(gamma)
    return setting + (f", {run['variant']}" if run.get("variant") else "")  # a prototype measured, then removed


def efficientnet_bn_modes(record: dict, page: Page) -> str:
    """Every conversion of the real EfficientNet-Lite2 in the record, one row each: BatchNorm mode, steps, what it kept,
    and what the self-check measured."""
    rows = [[run.get("bn_mode", "eval"), _gamma_setting(run), run.get("seed", 0), run["steps"],
             f"{run['check_data_images']} check photos" if "check_data_images" in run else
             f"{run['held_out_images']} held-out photo{'s' if run['held_out_images'] != 1 else ''}",
             f"{run['kept_top1_confident']} / {run['confident_photos']}",
             f"{run['kept_top1_all']} / {run['photos']}", f"{run['largest_top1_probability_change']:.3f}",
             f"{run['gamma_final_effective']:.4g}", f"{run['kappa']:.3f}" if run.get("kappa") is not None else "-",
             f"{run['self_check']['rho']['p90']:.2f}" if run.get("self_check") else "-"]
            for run in record["efficientnet_lite2"]]
    return markdown_table(["bn_mode", "gamma", "seed", "steps", "self-check on", "top-1 kept, photos with p >= 0.2",
                           "top-1 kept, all photos", "largest change of the top-1 probability",
                           "gamma (effective, final)", "kappa", "rho 90th pct (self-check)"], rows)


# ---------------------------------------------------------------------------------------------- a lent GPU

def gpu_tables(record: dict, page: Page) -> str:
    """The benchmark's tables as `benchmarks/gpu_check.py` printed them on the GPU, then its JPEG decode rates."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import jpeg_table
    from run import markdown_tables

    return markdown_tables(record["check"]) + "\n\n" + jpeg_table(record["check"]["jpeg_decode"])


def gpu_step_costs(record: dict, page: Page) -> str:
    """One line per step: its time and peak memory against a plain fp32 cross-entropy step, over the GPU's models."""
    check = record["check"]
    rows, _ = step_cost_rows(check)
    names = ", ".join(m["arch"] for m in check["models"].values())
    batch = next(iter(check["models"].values()))["conversion"]["batch"]
    return (markdown_table(["step", "time vs a plain cross-entropy step", "CUDA peak memory vs a plain step"], rows)
            + f"\n\nRange over {names} at batch {batch}, {check['image_size']} px.")


def gpu_findings(record: dict, page: Page) -> str:
    """What the GPU's tables show, as bullets whose every figure comes from the record."""
    check = record["check"]
    models = list(check["models"].values())

    def step_range(step: str) -> str:
        return ratio_range([s["time_vs_plain"] for s in steps_of(check, step)])

    memory = ratio_range([step["memory_vs_plain"] for m in models for name, step in m["conversion"]["steps"].items()
                          if "bf16" not in name])
    bf16 = {m["arch"]: m["certification"]["bf16"] for m in models}
    refused = [(arch, b) for arch, b in bf16.items() if not b["acceptable"]]
    speedups = ratio_range([b["deterministic_vs_float32"] for b in bf16.values()])
    inference = [m["certification"]["plain_images_per_s"] for m in models]
    certification = ratio_range([m["certification"]["deterministic_vs_plain"] for m in models])
    conversion = [m["conversion"]["batch"] / m["conversion"]["steps"]["default"]["seconds"] for m in models]
    workers, data_rate = max(check["data"]["images_per_s"].items(), key=lambda item: item[1])
    nvjpeg = check["jpeg_decode"]["images_per_s"].get("torchvision_cuda", float("nan"))
    lines = [f"- The estimators cost on the GPU about what they cost on the CPU: the paper's estimator (the ImageNet "
             f"recipes' `default`) {step_range('default')} a plain step, one `jl` probe {step_range('jl (1 probe)')}, "
             f"a lazy `jl` period of 4 {step_range('jl lazy k=4')}, fidelity alone {step_range('fidelity only')}; "
             f"CUDA peak memory {memory} a plain step's, because the terms are backpropagated one graph at a time.",
             f"- Certification in fp32 runs at {certification} the speed of inference. bf16 autocast would be "
             f"{speedups} faster"
             + ("" if not refused else ", but " + "; ".join(
                 f"{arch}'s deterministic radii moved by up to {b['deterministic_max_radius_difference']:.2g} and its "
                 f"Monte-Carlo radii by {b['mc_max_radius_difference']:.2g}, with "
                 f"{100 * (1 - b['deterministic_prediction_agreement']):.0f}% of predictions changed"
                 for arch, b in refused) + f" (tolerance {refused[0][1]['radius_tolerance']:g})")
             + ": `evaluate` keeps fp32.",
             f"- The data pipeline (PIL decode, DataLoader {workers}) feeds {data_rate:,.0f} images/s, below the GPU's "
             f"inference ({min(inference):,.0f}-{max(inference):,.0f} images/s): an evaluation on this machine is "
             f"bound by JPEG decoding, which nvjpeg on the GPU does at {nvjpeg:,.0f} "
             f"images/s. A default conversion step ({min(conversion):,.0f}-{max(conversion):,.0f} images/s) is not."]
    return "\n".join(lines)


def gpu_demo(record: dict, page: Page) -> str:
    return demo_printed(record["demo"], with_lines=True)


def gpu_efficientnet(record: dict, page: Page) -> str:
    """The real EfficientNet-Lite2's conversions on the GPU beside the same settings' CPU rows."""
    cpu = load_record("conversion_safety")["efficientnet_lite2"]
    rows = []
    for run in record["efficientnet_lite2"]:
        same = [c for c in cpu if all(c.get(k) == run.get(k) for k in ("steps", "bn_mode", "gamma", "gamma_start",
                                                                         "seed"))]
        for device, r in [("GPU", run)] + [("CPU", c) for c in same[:1]]:
            rows.append([device, r["steps"], r.get("seed", 0), _gamma_setting(r),
                         f"{r['kept_top1_confident']} / {r['confident_photos']}",
                         f"{r['kept_top1_all']} / {r['photos']}",
                         f"{r['largest_top1_probability_change']:.3f}", f"{r['gamma_final_effective']:.4g}",
                         f"{r['kappa']:.3f}", f"{r['self_check']['rho']['p90']:.2f}", f"{r['seconds']:.0f}"])
    return markdown_table(["device", "steps", "seed", "gamma", "top-1 kept, photos with p >= 0.2",
                           "top-1 kept, all photos", "largest change of the top-1 probability",
                           "gamma (effective, final)", "kappa", "rho 90th pct (held-out)", "seconds"], rows)


def swin_penalty(record: dict, page: Page) -> str:
    swin = record["swin"]
    values = swin["penalty_per_sample"]
    return (f"{swin['model']}: penalty per sample {values['train']:.4g} in train mode (new dropout/drop-path masks "
            f"in every forward) against {values['conversion']:.4g} in conversion mode")


# ---------------------------------------------------------------------------------------------- reliability

def reliability_resume(record: dict, page: Page) -> str:
    kill = record["kill_test"]
    rows = [[run_index + 1, point["killed"], point["resumed_at"], point["lost_steps"]]
            for run_index, points in enumerate(kill["runs"]) for point in points]
    return (markdown_table(["test run", "killed", "resumed at step", "steps lost"], rows) +
            f"\n\nLargest absolute difference to the uninterrupted run's weights: "
            f"{kill['max_abs_weight_difference']:g} in all {len(rows)} kills "
            f"({kill['steps']}-step conversion, checkpoint every {kill['checkpoint_every']} steps).")


def reliability_two_processes(record: dict, page: Page) -> str:
    run = record["two_process_resume"]
    return (f"SIGTERM at step {run['signal_step']} of {run['steps']} under `{run['command']}`, then `--resume`: "
            f"largest absolute weight difference {run['max_abs_weight_difference']:g}")


def reliability_signal_exit(record: dict, page: Page) -> str:
    seconds = record["signal_exit"]["seconds"]
    return f"{min(seconds):g}-{max(seconds):g} s on {record['signal_exit']['machine']}"


def reliability_scale_out(record: dict, page: Page) -> str:
    run = record["scale_out"]
    return (f"largest weight difference {run['largest_weight_difference']:.1e} after {run['steps']} steps that moved "
            f"weights by up to {run['largest_weight_change']:g} ({run['code']})")


# ---------------------------------------------------------------------------------------------- recipes

def _clip_text(recipe: dict) -> str:
    """A recipe's gradient clip: a fixed norm, a multiple of the running median norm, or off."""
    median = recipe.get("clip_grad_median_multiple")
    clips = ([f"norm {recipe['clip_grad_norm']:g}"] if recipe.get("clip_grad_norm") else []) + \
        ([f"{median:g}x running median"] if median else [])
    return ", ".join(clips) or "off"


def recipes_table(recipes: dict, page: Page) -> str:
    from certify_zoo.conversion import MIN_STEPS
    from certify_zoo.recipes import FALLBACK

    rows = []
    for name, r in recipes.items():
        chosen = ", ".join(f"`{pattern}`" for pattern in r.get("architectures", [])[:4])
        chosen = (chosen + ", ..." if len(r.get("architectures", [])) > 4 else chosen) or (
            "any model no other recipe matches" if name == FALLBACK else "only by `--recipe`")
        if r.get("model_types"):
            chosen += "; transformers " + ", ".join(f"`{t}`" for t in r["model_types"])
        rows.append([f"`{name}`", chosen, f"{r.get('optimizer', 'sgd').upper()} {r['lr']:g} -> {r['lr_min']:g} @ "
                     f"{r.get('reference_batch', r['batch_size'])} ({r.get('lr_scaling', 'none')})",
                     r["batch_size"], r["sigma"],
                     f"auto, from {r['gamma_start']:g} effective" if r["gamma"] == "auto" else r["gamma"],
                     f"{r['estimator']}"
                     + (f" ({r.get('probes', 1)} {r.get('probe_distribution', 'gaussian')} probe)"
                        if r["estimator"] == "jl" else f" ({r['reps']} reps)"),
                     f"{100 * r['warmup']:g}%", _clip_text(r), r.get("bn_mode"),
                     f"{r['epochs']}, at least {r.get('min_steps', MIN_STEPS)} steps"])
    return markdown_table(["recipe", "chosen for", "optimiser, lr @ global batch (scaling)", "batch / device",
                           "sigma", "gamma", "estimator", "warm-up", "gradient clip", "BatchNorm", "epochs"], rows)


def penalty_evidence(record: dict) -> str:
    """The tables `certify-zoo recipes show` prints under each recipe: the same function renders both."""
    from certify_zoo.recipes.evidence import evidence_text

    return evidence_text(record)


VIEWS: dict[str, dict[str, Callable[[Any, Page], str]]] = {
    "demo": {"output": demo_output, "table": demo_table, "summary": demo_summary, "duration": demo_duration,
             "agreement": demo_agreement, "reach": demo_radius_reach, "card_metric": demo_card_metric},
    "benchmarks": {"tables": benchmark_tables, "step_costs": benchmark_step_costs,
                   "certification": benchmark_certification, "stack": benchmark_stack,
                   "imagenet_estimate": imagenet_estimate},
    "estimator_study": {"summary": estimator_summary, "per_seed": estimator_per_seed, "code": estimator_code,
                        "verdict": estimator_verdict, "collapse": estimator_collapse, "gradient_norms": gradient_norms},
    "soundness_grid": {"table": grid_table, "warmup_spread": grid_warmup_spread},
    "gamma_study": {"summary": gamma_summary, "trajectories": gamma_trajectories, "headline": gamma_headline,
                    "flips": gamma_flip_ratios, "check_data": gamma_check_data, "step_limits": gamma_step_limits,
                    "near_ties": gamma_near_ties, "recipes": gamma_recipes, "rho_penalty": gamma_rho_penalty,
                    "fidelity_target": gamma_fidelity_target,
                    "demo_spread": gamma_demo_spread},
    "conversion_safety": {"efficientnet": efficientnet_safety, "bn_modes": efficientnet_bn_modes,
                          "swin": swin_penalty},  # benchmarks/gamma_study.py --record docs/records/gamma_study.json
    "gpu": {"tables": gpu_tables, "step_costs": gpu_step_costs, "findings": gpu_findings, "demo": gpu_demo,
            "efficientnet": gpu_efficientnet},
    "reliability": {"resume": reliability_resume, "two_processes": reliability_two_processes,
                    "signal_exit": reliability_signal_exit, "scale_out": reliability_scale_out},
    "recipes": {"table": recipes_table},
    # the record ships inside the package (certify_zoo/recipes/, for `recipes show`); docs/records links to it
    "penalty_cost_study": {"evidence": lambda record, page: penalty_evidence(record)},
    "penalty_noise": {"table": penalty_noise_table},  # benchmarks/penalty_noise.py
    "noise_capacity": {"table": noise_capacity_table},  # benchmarks/noise_capacity.py
}


def render_view(name: str, view: str, page: Page) -> str:
    record = load_record(name)
    registered = VIEWS.get(name, {}).get(view)
    return registered(record, page) if registered else generic_view(view, record, page, name)


# ---------------------------------------------------------------------------------------------- regions

@dataclass(frozen=True)
class Region:
    page: Path
    name: str
    view: str
    current: str
    rendered: str

    @property
    def stale(self) -> bool:
        return self.current != self.rendered


def render_text(text: str, page: Page) -> tuple[str, list[Region]]:
    """The page with every region rendered from its record, and the regions (current vs rendered).

    Markers inside a fenced code block outside any region are examples, not regions."""
    regions, pieces, done = [], [], 0
    for match in REGION.finditer(text):
        if len(FENCE.findall(text, done, match.start())) % 2:  # an odd number of fences since the last region
            continue
        name, view, body = match["name"], match["view"], match["body"]
        rendered = render_view(name, view, page)
        rendered_body = f"\n{rendered}\n" if body.startswith("\n") else rendered  # a block or a value in a line
        regions.append(Region(page.path, name, view, body, rendered_body))
        pieces += [text[done:match.start()], f"<!-- record:{name} {view} -->{rendered_body}<!-- /record -->"]
        done = match.end()
    return "".join(pieces) + text[done:], regions


def render_page(path: Path, write: bool) -> list[Region]:
    text = path.read_text()
    rendered, regions = render_text(text, Page(path))
    if write and rendered != text:
        path.write_text(rendered)
    return regions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a region differs")
    args = parser.parse_args(argv)
    stale = [region for path in pages() for region in render_page(path, write=not args.check) if region.stale]
    for region in stale:
        verb = "differs from" if args.check else "rewritten from"
        print(f"{region.page.relative_to(REPO)}: region {region.name} {region.view} {verb} its record")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
