"""Quality per compute of the penalty estimators: which step becomes every recipe's default.

    # labelled models: gamma_study.py runs one tag per step configuration (same seeds, same bases), e.g.
    PYTHONPATH=. python benchmarks/gamma_study.py --work W --record demo.json --models demo --n 2000 \
        --overrides '{"estimator": "jl", "probes": 1, "probe_distribution": "rademacher", "penalty_every": 16}' \
        --tag "jl k=16"
    # the real EfficientNet-Lite2 (label-free), then the summary record the docs and `recipes show` render:
    PYTHONPATH=. python benchmarks/penalty_cost_study.py --work W --effnet effnet.json
    PYTHONPATH=. python benchmarks/penalty_cost_study.py --labelled demo.json cnn.json --effnet effnet.json \
        --benchmark bench.json --record docs/records/penalty_cost_study.json
    # rows measured later join the record beside its rows (gamma_study.py records), or replace its EfficientNet rows:
    PYTHONPATH=. python benchmarks/penalty_cost_study.py --insert cnn16.json \
        --record certify_zoo/recipes/penalty_cost_study.json
    PYTHONPATH=. python benchmarks/penalty_cost_study.py --replace-effnet --effnet effnet.json \
        --record certify_zoo/recipes/penalty_cost_study.json [--keep-replaced-as ", earlier"]
    # equal wall-clock budget: the steps each configuration gets (then gamma_study.py with max_steps, tag NAME + suffix)
    PYTHONPATH=. python benchmarks/penalty_cost_study.py --effnet effnet.json --benchmark bench.json --plan-budget 840

The labelled rows compare, per model and step configuration, means over seeds (t intervals over seeds) of
clean accuracy, Monte-Carlo certified accuracy, kappa and the PGD counterexamples inside the raw (uncalibrated)
radius. On EfficientNet-Lite2 (ImageNet-1k weights, 20 steps at batch 4 on the shipped photos, sigma 0.25) the
label-free measures over every photo: top-1 agreement with the base, agreement of the smoothed prediction
(Monte-Carlo, small n) with the base's top-1, and rho (90th percentile, share above 1) at the photos, a neighbour
of each and the points along each claim. The compute column is each step's cost in plain cross-entropy steps,
read from a ``benchmarks/run.py --json`` record.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from certify_zoo.conversion import ConvertSettings, convert  # noqa: E402
from certify_zoo.models import load_classifier  # noqa: E402
from certify_zoo.recipes import choose_recipe, load_recipe  # noqa: E402
from certify_zoo.smoothness import rho_at_probe_points  # noqa: E402
from real_model import efficientnet_lite2_folder, load_photos, photo_folder  # noqa: E402
from benchmarks.seeds import t_interval  # noqa: E402

JL = {"estimator": "jl", "probes": 1, "probe_distribution": "rademacher"}
JL6 = {"estimator": "jl", "probes": 6, "probe_distribution": "gaussian"}  # the paper's terms, one graph at a time
EFFNET_STEPS, EFFNET_BATCH, EFFNET_SIGMA, SMOOTHED_N = 20, 4, 0.25, 64
# EfficientNet-Lite2 configurations: the paper's estimator against the candidate defaults
EFFNET_CONFIGS = {"paper": {"estimator": "paper", "penalty_every": 1},
                  "jl k=1": {**JL, "penalty_every": 1},
                  "jl share 1/16": {**JL, "penalty_every": 1, "penalty_share": 1 / 16},
                  "jl k=4 share 1/4": {**JL, "penalty_every": 4, "penalty_share": 1 / 4},
                  "jl k=8": {**JL, "penalty_every": 8}, "jl k=16": {**JL, "penalty_every": 16},
                  "jl k=1, median clip 2": {**JL, "penalty_every": 1, "clip_grad_median_multiple": 2.0},
                  "jl 6 Gaussian probes": JL6,
                  "jl 6 Gaussian probes k=4": {**JL6, "penalty_every": 4}}
# lazy demo runs measured before convert clipped a lazy penalty step at k x --clip-grad-norm: the demo's fixed clip
# (1) cut those steps' k weighting, so they measured a weaker penalty; kept, under this tag, beside the fixed runs
LAZY_CLIPPED = "jl k={k}, its k weighting clipped"
# measured after a breach of the agreement floor went back to the last good state (earlier rows: gamma only halved)
RESTORING = "jl k=4, restoring on a breach"
# equal wall-clock budget: each configuration gets the steps that cost what the performance target allows a conversion
# of the recipe's length (BUDGET x its steps of plain cross-entropy), at its time per step (the mean over the
# benchmark models of its ratio to a plain step, to 2 decimals); the rows are tagged NAME + BUDGET_SUFFIX
BUDGET, BUDGET_SUFFIX = 1.5, " at the 1.5x budget"
BUDGET_CONFIGS = {"paper": {"estimator": "paper"}, "jl k=1": {**JL, "penalty_every": 1},
                  "jl k=4": {**JL, "penalty_every": 4}, "jl k=8": {**JL, "penalty_every": 8},
                  "jl k=16": {**JL, "penalty_every": 16}, "fidelity only": {"gamma": 0.0}}
# benchmark row that costs each labelled tag's step (benchmarks/run.py STEPS), in the tables' order
COST_ROWS = {"paper": "paper (6 reps)", "jl 6 Gaussian probes": "jl (6 Gaussian probes)",
             "jl 6 Gaussian probes k=4": "jl 6 Gaussian lazy k=4", "jl k=1": "jl (1 probe)",
             "jl k=1, median clip 2": "jl (1 probe)", RESTORING: "jl lazy k=4", "jl share 1/16": "jl share 1/16",
             "jl k=4 share 1/4": "jl k=4 share 1/4", "jl k=4": "jl lazy k=4", "jl k=8": "jl lazy k=8",
             "jl k=16": "jl lazy k=16", LAZY_CLIPPED.format(k=8): "jl lazy k=8",
             LAZY_CLIPPED.format(k=16): "jl lazy k=16", "paper, 1/4 of the steps": "paper (6 reps)",
             "fidelity only": "fidelity only"}
COST_ROWS.update({name + BUDGET_SUFFIX: COST_ROWS[name] for name in BUDGET_CONFIGS})
# cnn16 at the length convert now runs on its folder (--min-steps 840), side by side on a lent GPU
# (benchmarks/gpu_study.sh): the earlier cnn16 rows ran the recipe's 10 passes, 280 steps
AT_MIN_STEPS = ", 840 steps (GPU)"
COST_ROWS.update({name + AT_MIN_STEPS: COST_ROWS[name] for name in ("paper", "jl k=1", "jl k=4", "jl k=8")})
# per paper row, the rows measured at its steps that the performance issue compares with it (the lazy rows whose
# k weighting the demo's fixed clip cut measured a weaker penalty, and are left out)
EQUAL_STEPS = {"paper": ["jl 6 Gaussian probes", "jl 6 Gaussian probes k=4", "jl k=1", "jl k=1, median clip 2",
                         RESTORING, "jl share 1/16", "jl k=4 share 1/4", "jl k=4", "jl k=8", "jl k=16"],
               "paper" + AT_MIN_STEPS: [name + AT_MIN_STEPS for name in ("jl k=1", "jl k=4", "jl k=8")]}


def budget_steps(recipe_steps: int, time_vs_plain: float, budget: float = BUDGET) -> int:
    """Steps of a configuration whose step costs ``time_vs_plain`` plain steps, within ``budget`` x the plain cost of
    ``recipe_steps`` steps."""
    return round(budget * recipe_steps / time_vs_plain)


def budget_plan(benchmark: dict, recipe_steps: int) -> dict[str, dict]:
    """Per configuration: the mean time ratio (2 decimals) over the benchmark models and its steps at the budget."""
    costs = step_costs(benchmark)
    plan = {}
    for name, config in BUDGET_CONFIGS.items():
        ratio = round(statistics.fmean(c[COST_ROWS[name]]["time_vs_plain"] for c in costs.values()), 2)
        plan[name + BUDGET_SUFFIX] = {"time_vs_plain": ratio, "steps": budget_steps(recipe_steps, ratio),
                                      "overrides": config}
    return plan


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "interval": t_interval(values), "per_seed": values}


def effnet_run(base: Path, photos: Path, out: Path, config: dict, seed: int) -> dict:
    """Convert EfficientNet-Lite2 on the photos with its recipe and ``config``; label-free measures on every photo."""
    settings = ConvertSettings.from_recipe(load_recipe(choose_recipe(str(base)).name, EFFNET_SIGMA), model=str(base),
                                           data=str(photos), out=str(out), max_steps=EFFNET_STEPS,
                                           batch_size=EFFNET_BATCH, sigma=EFFNET_SIGMA, seed=seed, overwrite=True,
                                           **config)
    convert(settings)
    base_model, student = load_classifier(str(base)), load_classifier(str(out))
    names, images = load_photos(base_model, photos)
    with torch.no_grad():
        base_top = base_model(images).argmax(-1)
        student_top = student(images).argmax(-1)
    generator = torch.Generator().manual_seed(seed)
    votes = torch.stack([torch.bincount(image_votes).argmax()
                         for image_votes in _noisy_votes(student, images, EFFNET_SIGMA, SMOOTHED_N, generator)])
    values = rho_at_probe_points(student, images, EFFNET_SIGMA, generator)
    metadata = json.loads((out / "certify_zoo.json").read_text())
    return {"seed": seed, "photos": len(names), "steps": metadata["steps"], "batch_size": EFFNET_BATCH,
            "top1_agreement": float((student_top == base_top).float().mean()),
            "smoothed_agreement": float((votes == base_top).float().mean()), "smoothed_n": SMOOTHED_N,
            "rho_p90": float(values.quantile(0.9)), "rho_share_above_1": float((values > 1).float().mean()),
            "rho_points": int(values.numel()), "gamma_final_effective": metadata["effective_gamma"],
            "kappa": metadata.get("calibration", {}).get("kappa")}


def _noisy_votes(model, images: torch.Tensor, sigma: float, n: int, generator: torch.Generator):
    """Per image, the student's top-1 class on n noisy copies (the Monte-Carlo smoothed prediction's votes)."""
    with torch.no_grad():
        for image in images:
            noisy = image.unsqueeze(0) + sigma * torch.randn((n, *image.shape), generator=generator)
            yield model(noisy).argmax(-1)


def effnet_study(work: Path, record: Path, seeds: list[int], configs: list[str]) -> None:
    base = work / "efficientnet_lite2"
    if not (base / "config.json").is_file():
        efficientnet_lite2_folder(base)
    photos = photo_folder(work / "photos")
    result = json.loads(record.read_text()) if record.is_file() else {"runs": []}
    done = {(r["config"], r["seed"]) for r in result["runs"]}
    for name in configs:
        config = EFFNET_CONFIGS[name]
        for seed in seeds:
            if (name, seed) in done:
                continue
            run = {"config": name, **effnet_run(base, photos, work / f"{name}-seed{seed}", config, seed)}
            result["runs"].append(run)
            record.write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(run), flush=True)


def labelled_summary(runs: list[dict]) -> dict:
    """model -> tag -> means over seeds of what the acceptance compares."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["model"], run["tag"]), []).append(run)
    table: dict[str, dict] = {}
    order = list(COST_ROWS)
    for (model, tag), group in sorted(groups.items(), key=lambda item: (item[0][0], order.index(item[0][1])
                                                                         if item[0][1] in order else len(order))):
        group.sort(key=lambda r: r["seed"])
        table.setdefault(model, {})[tag] = {
            "seeds": [r["seed"] for r in group], "steps": group[0]["steps"], "mc_n": group[0].get("n"),
            "clean": summary([r["clean"] for r in group]),
            "mc_0.25": summary([r["mc"]["0.25"] for r in group]), "mc_0.5": summary([r["mc"]["0.5"] for r in group]),
            "kappa": summary([r["kappa"] for r in group]),
            "pgd_raw_counterexamples": sum(r["pgd_raw"]["counterexamples"] for r in group),
            "pgd_raw_attacked": sum(r["pgd_raw"]["attacked"] for r in group),
            "pgd_calibrated_counterexamples": sum(r["pgd_calibrated"]["counterexamples"] for r in group),
            "pgd_calibrated_attacked": sum(r["pgd_calibrated"]["attacked"] for r in group),
            "convert_seconds": summary([r["convert_seconds"] for r in group])}
    return table


def equal_steps(labelled: dict) -> dict:
    """model -> paper row -> each row of EQUAL_STEPS that model has (at the paper row's steps) -> its difference to
    the paper row in clean and Monte-Carlo accuracy: seed by seed where both ran the same seeds (the same draws
    start both), so the interval is that of the paired difference; else the difference of the means alone. (Kappa
    is compared by its means, which the rows hold.)"""
    pairs: dict[str, dict] = {}
    for model, tags in labelled.items():
        for paper, others in EQUAL_STEPS.items():
            for tag in (tag for tag in others if tag in tags and paper in tags):
                row, reference = tags[tag], tags[paper]
                if row["steps"] != reference["steps"]:
                    raise ValueError(f"{model}: {tag!r} did not run {paper!r}'s steps")
                paired = row["seeds"] == reference["seeds"]
                pairs.setdefault(model, {}).setdefault(paper, {})[tag] = {
                    key: summary([a - b for a, b in zip(row[key]["per_seed"], reference[key]["per_seed"])])
                    if paired else {"mean": row[key]["mean"] - reference[key]["mean"]}
                    for key in ("clean", "mc_0.25", "mc_0.5")}
    return pairs


def insert_labelled(record: dict, runs: list[dict]) -> dict:
    """``record`` with the labelled summary of ``runs`` (gamma_study.py runs, tags of COST_ROWS) added beside its
    rows (a tag it already has is replaced); the comparisons at equal steps recomputed."""
    unknown = sorted({run["tag"] for run in runs} - set(COST_ROWS))
    if unknown:
        raise ValueError(f"tags {unknown} have no benchmark row in COST_ROWS")
    labelled = {model: dict(tags) for model, tags in record["labelled"].items()}
    for model, tags in labelled_summary(runs).items():
        labelled.setdefault(model, {}).update(tags)
    return {**record, "cost_rows": COST_ROWS, "labelled": labelled, "equal_steps": equal_steps(labelled)}


def effnet_summary(runs: list[dict]) -> dict:
    table: dict[str, dict] = {}
    for name in [name for name in EFFNET_CONFIGS if any(r["config"] == name for r in runs)]:
        group = [r for r in runs if r["config"] == name]
        table[name] = {"seeds": [r["seed"] for r in group], "photos": group[0]["photos"],
                       **{key: summary([r[key] for r in group]) for key in
                          ("top1_agreement", "smoothed_agreement", "rho_p90", "rho_share_above_1")}}
    return table


def step_costs(benchmark: dict) -> dict:
    """Per benchmark model: each step row's time and memory against a plain cross-entropy step."""
    return {key: {name: {"time_vs_plain": s["time_vs_plain"], "memory_vs_plain": s["memory_vs_plain"],
                         "penalty_every": s.get("penalty_every", 1)}
                  for name, s in row["conversion"]["steps"].items()}
            for key, row in benchmark["models"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="run the EfficientNet-Lite2 conversions here")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--configs", default=",".join(EFFNET_CONFIGS),
                        help="EfficientNet-Lite2 configurations to run (comma-separated; default: all)")
    parser.add_argument("--effnet", type=Path, default=None, help="EfficientNet-Lite2 runs (written with --work)")
    parser.add_argument("--labelled", nargs="*", type=Path, default=[], help="gamma_study.py records, one tag each")
    parser.add_argument("--benchmark", type=Path, default=None, help="benchmarks/run.py --json record")
    parser.add_argument("--record", type=Path, default=None, help="write the summary record here")
    parser.add_argument("--provenance", default="{}", help="JSON: command, code, date, machine")
    parser.add_argument("--insert", nargs="*", type=Path, default=[],
                        help="only add these gamma_study.py records' rows to the existing --record")
    parser.add_argument("--replace-effnet", action="store_true",
                        help="only replace the existing --record's EfficientNet-Lite2 rows with those of --effnet")
    parser.add_argument("--keep-replaced-as", default=None, metavar="SUFFIX",
                        help="with --replace-effnet: keep the replaced rows after the new ones, each name + SUFFIX")
    parser.add_argument("--plan-budget", type=int, default=None, metavar="STEPS",
                        help="print, for a recipe of STEPS steps, each configuration's steps at the equal budget "
                             "(needs --benchmark; gamma_study.py runs them with max_steps), and stop")
    args = parser.parse_args()
    if args.plan_budget is not None:
        print(json.dumps(budget_plan(json.loads(args.benchmark.read_text()), args.plan_budget), indent=1))
        return
    if args.insert or args.replace_effnet:
        record = json.loads(args.record.read_text())
        if args.insert:
            runs = [run for path in args.insert for run in json.loads(path.read_text())["runs"]]
            record = insert_labelled(record, runs)
        if args.replace_effnet:
            earlier = {name + args.keep_replaced_as: row for name, row in record["efficientnet_lite2"].items()
                       } if args.keep_replaced_as else {}
            record["efficientnet_lite2"] = {**effnet_summary(json.loads(args.effnet.read_text())["runs"]), **earlier}
        args.record.write_text(json.dumps({**record, "provenance": {**record["provenance"],
                                                                    **json.loads(args.provenance)}}, indent=1) + "\n")
        return
    if args.effnet is None:
        parser.error("--effnet is required")
    if args.work is not None:
        configs = args.configs.split(",")
        unknown = sorted(set(configs) - set(EFFNET_CONFIGS))
        if unknown:
            parser.error(f"unknown configurations {unknown}; known: {list(EFFNET_CONFIGS)}")
        effnet_study(args.work, args.effnet, [int(s) for s in args.seeds.split(",")], configs)
    if args.record is None:
        return
    runs = [run for path in args.labelled for run in json.loads(path.read_text())["runs"]]
    benchmark = json.loads(args.benchmark.read_text()) if args.benchmark else None
    labelled = labelled_summary(runs)
    record = {"title": "Quality per compute of the penalty estimators", "provenance": json.loads(args.provenance),
              "cost_rows": COST_ROWS, "labelled": labelled, "equal_steps": equal_steps(labelled),
              "efficientnet_lite2": effnet_summary(json.loads(args.effnet.read_text())["runs"]),
              "step_costs": step_costs(benchmark) if benchmark else None,
              "equal_budget": {"budget": BUDGET, "suffix": BUDGET_SUFFIX,  # the recipe's length: the paper rows'
                               "recipe_steps": {model: tags["paper"]["steps"] for model, tags in labelled.items()}},
              "default_step": benchmark.get("default_step") if benchmark else None}
    args.record.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
