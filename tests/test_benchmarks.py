"""Smoke test of benchmarks/run.py: it runs and reports every section in its documented format (no timing asserts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from certify_zoo.recipes import load_recipe
from conftest import REPO


def test_quick_benchmark_prints_ratio_tables_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--models", "vit",
                           "--image-size", "32", "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    for heading in ("**1. Certification**", "**2. Conversion step**", "**3. Data pipeline vs model**", "Machine:"):
        assert heading in done.stdout
    result = json.loads(out.read_text())
    vit = result["models"]["vit"]
    certification = vit["certification"]
    for key in ("deterministic_vs_plain", "mc_noisy_vs_plain", "deterministic_speedup_vs_mc_n100000"):
        assert certification[key] > 0
    # the n = 100,000 figure is the n = 1,000 one scaled by the sample count, as documented
    ratio = certification["mc_seconds_per_image_n100000"] / certification["mc_seconds_per_image_n1000"]
    assert abs(ratio - 100_100 / 1_100) < 1e-6
    steps = vit["conversion"]["steps"]
    assert set(steps) == {"plain cross-entropy", "fidelity only", "jl (1 probe)", "jl lazy k=4", "paper (6 reps)",
                          "default"}  # --quick's subset
    assert steps["plain cross-entropy"]["time_vs_plain"] == 1.0
    assert all(s["seconds"] > 0 and s["peak_bytes"] > 0 and s["rss_peak_bytes"] >= 0 for s in steps.values())
    # counted tensors, not the allocator: a step holds its plain counterpart's graph and more, never less
    assert 1.0 <= steps["fidelity only"]["memory_vs_plain"] <= steps["paper (6 reps)"]["memory_vs_plain"]
    assert steps["jl lazy k=4"]["penalty_every"] == 4 and steps["jl (1 probe)"]["penalty_every"] == 1
    # the "default" row is the generic recipe's step, whatever the recipe says
    generic = load_recipe("generic")
    assert result["default_estimator"] == "default"
    assert result["default_step"]["estimator"] == generic["estimator"]
    assert steps["default"]["penalty_every"] == generic.get("penalty_every", 1)
    assert vit["conversion"]["settings"]["default"] == result["default_step"]
    # the default row pays for the gamma controller's rho checks, spread over an ImageNet-1k epoch
    controller = vit["conversion"]["gamma_controller"]
    assert controller["check_seconds"] > 0 and controller["check_every_steps"] == 1_281_167 // 4 // 20
    assert controller["seconds_per_step"] == controller["check_seconds"] / controller["check_every_steps"]
    assert "includes the gamma controller" in done.stdout
    assert "| vit | 4 | default |" in done.stdout
    assert all(v > 0 for v in result["data"]["images_per_s"].values())
    row = next(line for line in done.stdout.splitlines() if line.startswith("| vit (vit_tiny_patch16_224)"))
    assert row.count("|") == 11 and "x |" in row


def test_gpu_study_runs_every_setting_and_seed_at_once_and_joins_their_records(tmp_path):
    """gpu_study.sh: one gamma-study run per (setting, seed), a tag holding '=' and ', ' kept whole, their records
    joined into the one file a lent machine sends back."""
    out, work = tmp_path / "out", tmp_path / "work"
    settings = ['quick::{"max_steps": 2}', 'lazy k=2, quick::{"max_steps": 2, "penalty_every": 2}']
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_study.sh"), str(out), str(work), "demo", "0", *settings],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "N": "20", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = json.loads((out / "study.json").read_text())["runs"]
    assert sorted((run["tag"], run["seed"], run["steps"], run["n"]) for run in runs) == [
        ("lazy k=2, quick", 0, 2, 20), ("quick", 0, 2, 20)]
    assert next(run for run in runs if run["tag"] == "lazy k=2, quick")["overrides"]["penalty_every"] == 2


def test_gpu_check_dry_run_runs_without_datasets_and_writes_a_record_the_tables_render(tmp_path, render):
    """The GPU machine has no `datasets`: a stand-in that refuses to import proves nothing of it is needed."""
    blocker = tmp_path / "blocked" / "datasets"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('datasets is not installed on the GPU machine')\n")
    out = tmp_path / "record" / "gpu_check.json"
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(blocker.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and set(result["models"]) == {"cnn", "convnext", "vit"}
    for row in result["models"].values():
        steps = row["conversion"]["steps"]
        assert {"plain cross-entropy", "plain cross-entropy, bf16 autocast", "fidelity only", "paper (6 reps)",
                "default"} <= set(steps)
        assert row["conversion"]["base_forward"] == "bf16 autocast"
        bf16 = row["certification"]["bf16"]
        assert bf16["deterministic_max_radius_difference"] >= 0
        assert bf16["acceptable"] == (max(bf16["deterministic_max_radius_difference"],
                                          bf16["mc_max_radius_difference"]) < bf16["radius_tolerance"])
    assert set(result["jpeg_decode"]["images_per_s"]) == {"pil_cpu", "torchvision_cpu"}  # no GPU here
    assert all(rate > 0 for rate in result["jpeg_decode"]["images_per_s"].values())
    assert "| vit | 2 | default |" in done.stdout and "**JPEG decode**" in done.stdout
    rendered = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--tables-from", str(out)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "bf16 autocast certification" in rendered.stdout
    # gathered with what the session's other two scripts write (here: the committed CPU records in their layout),
    # the record renders into every view of the docs' GPU section
    (out.parent / "gpu_demo.json").write_text((REPO / "docs" / "records" / "demo.json").read_text())
    safety = json.loads((REPO / "docs" / "records" / "conversion_safety.json").read_text())["efficientnet_lite2"][:2]
    (out.parent / "gpu_conversion_safety.json").write_text(json.dumps({"efficientnet_lite2": safety}))
    gathered = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_record.py"), "--from", str(out.parent),
                               "--code", "a test", "--date", "today", "--out", str(tmp_path / "gpu.json")],
                              capture_output=True, text=True, timeout=120)
    assert gathered.returncode == 0, gathered.stderr
    record = json.loads((tmp_path / "gpu.json").read_text())
    assert record["check"] == result and len(record["efficientnet_lite2"]) == 2
    views = {name: view(record, None) for name, view in render.VIEWS["gpu"].items()}
    assert "| vit | 2 | default |" in views["tables"] and "`jl lazy k=4`" in views["step_costs"]
    assert "`evaluate` keeps fp32" in views["findings"] and "Monte-Carlo" in views["demo"]
    assert views["efficientnet"].count("| GPU |") == 2 and views["efficientnet"].count("| CPU |") == 2


def test_peak_tensor_memory_counts_the_storages_alive_at_once_and_nothing_made_before():
    from benchmarks.tensor_memory import PeakTensorMemory

    weights = torch.zeros(10_000)  # made before the block: updated in place inside it, never counted
    with PeakTensorMemory() as counter:
        a = torch.ones(1000)  # 4,000 bytes
        b = torch.ones(2000)  # 8,000
        view, doubled = b[:100], b.mul_(2)  # a view and an in-place result allocate nothing
        weights.add_(1.0)
        del a
        c = torch.ones(500)  # 2,000: the peak stays at a + b
        assert counter.live_bytes == 10_000
        del b, view, doubled, c
    assert counter.peak_bytes == 12_000 and counter.live_bytes == 0


def test_peak_tensor_memory_sees_a_backward_pass_hold_the_graph():
    """A backward pass peaks above the no-grad forward: the first layer's weight gradient (1 MiB) is made while the
    gradient of the hidden activation it comes from is alive; everything made in the block is freed after it."""
    from benchmarks.tensor_memory import PeakTensorMemory

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    x = torch.rand(64, 256)
    with PeakTensorMemory() as inference, torch.no_grad():
        model(x)
    with PeakTensorMemory() as training:
        model(x).square().sum().backward()
        for p in model.parameters():
            p.grad = None
    hidden = 64 * 1024 * 4  # one activation of the hidden layer, in bytes
    assert hidden <= inference.peak_bytes < training.peak_bytes and training.peak_bytes >= 256 * 1024 * 4 + hidden
    assert training.live_bytes == 0


def test_soft_vs_hard_reads_each_certificate_from_its_own_probabilities():
    """Two images, both labelled 0. The first: v(x) sure of class 0, its soft average split 0.6 / 0.4, every noisy
    copy voting 0. The second: everything wrong. Radii at sigma 0.5: v(x) 0.25 (PhiInv(0.9) - PhiInv(0.1)) = 0.64,
    soft average 0.25 (PhiInv(0.6) - PhiInv(0.4)) = 0.13, hard vote 0.5 PhiInv(1 - 1/100) = 1.16."""
    from benchmarks.soft_vs_hard import RADII, certified_accuracies

    probabilities = {"clean": torch.tensor([[0.9, 0.1], [0.1, 0.9]]),
                     "soft": torch.tensor([[0.6, 0.4], [0.3, 0.7]]),
                     "votes": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    result = certified_accuracies(probabilities, torch.tensor([0, 0]), n=100)
    assert RADII == (0.0, 0.25, 0.5, 0.75)
    assert result["soft average"] == [50.0, 0.0, 0.0, 0.0]
    assert result["hard vote"] == [50.0, 50.0, 50.0, 50.0]
    assert result["v(x)"] == [50.0, 50.0, 50.0, 0.0]
    # every radius scales with sigma: at half the sigma, the same multiples of it give the same accuracies
    assert certified_accuracies(probabilities, torch.tensor([0, 0]), 100, 0.25, tuple(r / 2 for r in RADII)) == result


def test_equal_budget_steps_come_from_each_step_cost_and_render_in_their_own_table():
    """At the 1.5x budget a step costing 10x a plain one gets 1.5 / 10 of the recipe's steps, one costing 1.5x all of
    them; the record's budget rows render apart from the equal-steps rows, the recipe's length named."""
    from benchmarks.penalty_cost_study import BUDGET_SUFFIX, budget_plan, budget_steps
    from certify_zoo.recipes.evidence import evidence_text

    assert (budget_steps(840, 10.0), budget_steps(840, 1.5), budget_steps(280, 2.84)) == (126, 840, 148)
    costs = {"time_vs_plain": 1.0, "memory_vs_plain": 1.0}
    benchmark = {"models": {name: {"conversion": {"steps": {
        "fidelity only": {**costs, "time_vs_plain": 1.3 + shift}, "paper (6 reps)": {**costs, "time_vs_plain": 10.0},
        "jl (1 probe)": {**costs, "time_vs_plain": 3.0}, "jl lazy k=4": {**costs, "time_vs_plain": 1.7},
        "jl lazy k=8": {**costs, "time_vs_plain": 1.5}, "jl lazy k=16": {**costs, "time_vs_plain": 1.4}}}}
        for name, shift in (("cnn", 0.0), ("vit", 0.02))}}
    plan = budget_plan(benchmark, 840)
    assert plan["paper" + BUDGET_SUFFIX]["steps"] == 126 and plan["jl k=8" + BUDGET_SUFFIX]["steps"] == 840
    assert plan["fidelity only" + BUDGET_SUFFIX] == {"time_vs_plain": 1.31, "steps": 962, "overrides": {"gamma": 0.0}}

    cell = {"mean": 0.5, "interval": [0.4, 0.6], "per_seed": [0.5, 0.4, 0.6, 0.5]}
    row = {"seeds": [0, 1, 2, 3], "clean": cell, "mc_0.25": cell, "mc_0.5": cell, "kappa": cell,
           "pgd_raw_counterexamples": 1, "pgd_raw_attacked": 9}
    record = {"labelled": {"demo": {"paper": {**row, "steps": 840}, "paper" + BUDGET_SUFFIX: {**row, "steps": 126}}},
              "equal_budget": {"budget": 1.5, "suffix": BUDGET_SUFFIX, "recipe_steps": {"demo": 840}}}
    lines = evidence_text(record).splitlines()
    budget_heading = next(i for i, line in enumerate(lines) if line.startswith("At an equal wall-clock budget"))
    assert "(840 on demo)" in lines[budget_heading]
    assert any(line.startswith("| demo | paper | 840 |") for line in lines[:budget_heading])
    assert [line for line in lines[budget_heading:] if line.startswith("| demo")] == [
        f"| demo | paper{BUDGET_SUFFIX} | 126 | 4 | - | 50.0 [40.0, 60.0] | 50.0 [40.0, 60.0] | 50.0 [40.0, 60.0] | "
        "0.50 [0.40, 0.60] | 1 of 9 | - | - |"]


def test_rows_inserted_later_are_compared_with_the_paper_row_at_their_steps():
    """Runs of a gamma_study record join the summary beside its rows; each is set against the paper row of its
    steps seed by seed, in points (mean [95% t interval of the paired difference]), and the table names the part of
    the bar it misses (Monte-Carlo more than 2 points below at a radius, kappa smaller, more PGD counterexamples
    inside the raw radius)."""
    from benchmarks.penalty_cost_study import AT_MIN_STEPS, insert_labelled
    from certify_zoo.recipes.evidence import evidence_text

    def run(tag, seed, mc_25, mc_5, kappa, broken, steps=840):
        return {"model": "cnn16", "tag": tag, "seed": seed, "steps": steps, "n": 10000, "clean": 0.9,
                "mc": {"0.25": mc_25, "0.5": mc_5}, "kappa": kappa, "convert_seconds": 1.0,
                "pgd_raw": {"counterexamples": broken, "attacked": 100},
                "pgd_calibrated": {"counterexamples": 0, "attacked": 100}}

    paper, close, lazy = "paper" + AT_MIN_STEPS, "jl k=1" + AT_MIN_STEPS, "jl k=4" + AT_MIN_STEPS
    runs = [run(paper, seed, 0.80, 0.60, 0.70, 1) for seed in (0, 1, 2)]
    runs += [run(close, seed, 0.79, 0.585, 0.71, 0) for seed in (0, 1, 2)]  # 1 and 1.5 points below: within the bar
    # 10, 4 and 7 points below at r = 0.5: mean -7, standard deviation 3, t(0.975, 2) = 4.303 -> +-7.45
    runs += [run(lazy, seed, 0.80, mc_5, 0.60, 3) for seed, mc_5 in ((0, 0.50), (1, 0.56), (2, 0.53))]
    record = insert_labelled({"labelled": {"demo": {"paper": {}}}, "provenance": {}}, runs)
    assert set(record["labelled"]) == {"demo", "cnn16"} and list(record["equal_steps"]) == ["cnn16"]
    assert list(record["equal_steps"]["cnn16"][paper]) == [close, lazy]
    lines = evidence_text({**record, "labelled": {"cnn16": record["labelled"]["cnn16"]}}).splitlines()
    assert (f"| cnn16 | {close} | {paper} | 840 | +0.0 [+0.0, +0.0] | -1.0 [-1.0, -1.0] | -1.5 [-1.5, -1.5] | "
            "0.71 (0.70) | 0 (3) | none |") in lines
    assert (f"| cnn16 | {lazy} | {paper} | 840 | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] | -7.0 [-14.5, +0.5] | "
            "0.60 (0.70) | 9 (3) | MC@0.5, kappa, PGD |") in lines
    with pytest.raises(ValueError, match="did not run"):  # a comparison at other steps is not at equal steps
        insert_labelled(record, [run(lazy, 3, 0.8, 0.6, 0.7, 0, steps=280)])
    with pytest.raises(ValueError, match="no benchmark row"):
        insert_labelled(record, [run("jl k=3", 0, 0.8, 0.6, 0.7, 0)])


def test_the_cli_replaces_the_efficientnet_rows_and_keeps_the_rest(tmp_path):
    """--replace-effnet: the record's EfficientNet-Lite2 rows become the summary of the new runs (the replaced ones
    kept after them, renamed, with --keep-replaced-as); its labelled rows, provenance fields not given and
    everything else stay as they were."""
    cell = {"mean": 0.5, "interval": [0.5, 0.5], "per_seed": [0.5]}
    record = {"title": "t", "provenance": {"code": "old", "date": "then"}, "labelled": {"demo": {"paper": cell}},
              "efficientnet_lite2": {"paper": {"seeds": [0], "photos": 12}}}
    runs = [{"config": "paper", "seed": seed, "photos": 12, "top1_agreement": top1, "smoothed_agreement": 0.5,
             "rho_p90": 2.0, "rho_share_above_1": 0.75} for seed, top1 in ((0, 1.0), (1, 0.75), (2, 0.5), (3, 0.75))]
    (tmp_path / "record.json").write_text(json.dumps(record))
    (tmp_path / "effnet.json").write_text(json.dumps({"runs": runs}))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "penalty_cost_study.py"), "--replace-effnet",
                           "--effnet", str(tmp_path / "effnet.json"), "--record", str(tmp_path / "record.json"),
                           "--provenance", '{"code": "new"}', "--keep-replaced-as", ", before"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    updated = json.loads((tmp_path / "record.json").read_text())
    assert updated["provenance"] == {"code": "new", "date": "then"} and updated["labelled"] == record["labelled"]
    paper = updated["efficientnet_lite2"]["paper"]
    assert paper["seeds"] == [0, 1, 2, 3] and paper["top1_agreement"]["mean"] == 0.75
    assert paper["top1_agreement"]["per_seed"] == [1.0, 0.75, 0.5, 0.75]
    assert list(updated["efficientnet_lite2"]) == ["paper", "paper, before"]  # the replaced row kept, renamed
    assert updated["efficientnet_lite2"]["paper, before"] == record["efficientnet_lite2"]["paper"]


def test_penalty_noise_is_zero_where_every_draw_of_w_gives_the_same_gradient():
    """logits = (a . x) e_1 (one learnable direction a, the logits moving along the first class only): a draw w
    contributes (w_1)^2 ||a||^2 to the penalty, whose gradient is 2 (w_1)^2 a. Every draw points along a (cosine 1);
    a Rademacher probe has (w_1)^2 = 1/C on every draw (no noise at all), Gaussian terms do not."""
    from benchmarks.penalty_noise import gradient_noise

    class OneDirection(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(48) * 0.1)
            self.register_buffer("direction", torch.tensor([1.0, 0.0, 0.0]))

        def forward(self, x):
            return (x.flatten(1) @ self.a)[:, None] * self.direction

    torch.manual_seed(0)
    student = OneDirection()
    base = OneDirection()
    images = torch.rand(8, 3, 4, 4)
    result = gradient_noise(student, base, images, sigma=0.5, seed=0)
    one_probe, paper = result["jl, 1 Rademacher probe"], result["paper (6 Gaussian terms)"]
    assert one_probe["cosine"] > 1 - 1e-5 and one_probe["noise_to_signal"] < 1e-8
    assert paper["cosine"] > 1 - 1e-5 and paper["noise_to_signal"] > 1e-3


def quick_record(script: str, tmp_path, *arguments: str) -> dict:
    """The record that ``benchmarks/SCRIPT --quick ARGUMENTS --record R`` writes (the run must succeed)."""
    out = tmp_path / "record.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", *arguments, "--record",
                           str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_noisy_batch_benchmark_times_each_rule_and_writes_a_table_the_docs_render(tmp_path, render):
    from certify_zoo.certificates import noisy_batch_size

    record = quick_record("noisy_batch.py", tmp_path, "--models", "cnn16")
    (row,) = record["models"]
    rules = row["rules"]
    shipped = next(rule for rule in rules if "(shipped)" in rule)
    assert rules[shipped]["chunk"] == noisy_batch_size(64, (3, 16, 16), "cpu")
    assert rules["memory-matched (GPU rule)"]["chunk"] == noisy_batch_size(64, (3, 16, 16), "cuda")
    assert rules["memory-matched (GPU rule)"]["vs_memory_matched"] == 1.0
    for rule in rules.values():
        assert 0 < rule["forward_batch"] <= rule["chunk"] and rule["noisy_per_s"] > 0
    rendered = render.generic_view("table:table", record, None, "noisy_batch")  # as docs/benchmarks.md renders it
    assert rendered.count("\n") == 2 and rendered.splitlines()[2].startswith("| cnn16 | 16 px | ")
    assert record["summary"].startswith("on 1 model (16 px) the shipped CPU rule certified")


def test_audit_batch_benchmark_times_each_piece_rule_and_writes_a_table_the_docs_render(tmp_path, render):
    from certify_zoo.certificates import forward_piece

    record = quick_record("audit_batch.py", tmp_path)
    (row,) = record["models"]
    rules = row["rules"]
    shipped = next(rule for rule in rules if "(shipped)" in rule)
    assert rules[shipped]["piece"] == forward_piece(4, (3, 256, 256), "cpu")
    assert rules["whole batch (before)"] == {**rules["whole batch (before)"], "piece": 4, "vs_whole_batch": 1.0}
    assert min(rule["piece"] for rule in rules.values()) < 4  # the smallest budget cuts the batch into pieces
    assert row["flipped"] == 0 and all(rule["image_steps_per_s"] > 0 for rule in rules.values())
    rendered = render.generic_view("table:table", record, None, "audit_batch")  # as docs/benchmarks.md renders it
    assert rendered.count("\n") == 2 and rendered.splitlines()[2].startswith("| test_resnet | 256 px | 4 | ")
    assert record["summary"].startswith("on 1 model at 256 px the shipped CPU pieces ran ")
    assert record["summary"].endswith(" at a batch of 4 as many PGD image-steps per second as the whole batch")


def test_check_shards_benchmark_runs_both_ways_on_two_processes_and_writes_a_table_the_docs_render(tmp_path, render):
    record = quick_record("check_shards.py", tmp_path)
    (row,) = record["models"]
    assert row["chunks"] >= 3  # several chunks, so that both processes measured a part
    assert row["same_values"] is True and row["whole_s"] > 0 and row["shared_s"] > 0
    rendered = render.generic_view("table:table", record, None, "check_shards")  # as docs/benchmarks.md renders it
    assert rendered.count("\n") == 2 and rendered.splitlines()[2].startswith("| test_resnet | 256 px | 8 (32) | ")
    assert record["summary"].startswith("on 2 CPU processes, one gamma-controller check of 8 held-out images ran ")
    assert record["summary"].endswith("with the same values bit for bit")


def test_fork_deadlock_benchmark_counts_stuck_children_and_orphans_and_times_three_starts_in_tables_the_docs_render(
        tmp_path, render):
    record = quick_record("fork_deadlock.py", tmp_path)
    from certify_zoo.data import fork_can_deadlock

    ((python, forks, stuck, predicted),) = record["deadlocks"]["rows"]
    assert python == ".".join(map(str, sys.version_info[:3])) and forks == 500 and 0 <= stuck <= forks
    assert predicted is fork_can_deadlock() and (stuck == 0 or predicted)  # children stuck only where predicted
    assert set(record["first_batch_seconds"]) == {"fork", "forkserver", "spawn"}
    assert all(seconds > 0 for seconds in record["first_batch_seconds"].values())
    rendered = render.generic_view("table:deadlocks", record, None, "fork_deadlock")  # as docs/reliability.md does
    assert rendered.splitlines()[2].startswith(f"| {python} | 500 | {stuck} | ")
    orphans = render.generic_view("table:orphans", record, None, "fork_deadlock").splitlines()
    assert orphans[0] == ("| workers started by | runs | workers | still running 8 s after SIGKILL "
                          "| slowest to end (s) |")
    assert orphans[2].startswith("| certify-zoo | 1 | 1 | 0 | ")  # its one worker ended: the time it took
    assert orphans[3] == "| plain forkserver | 1 | 1 | 1 | did not end |"
