"""Conversion paths that must give a right answer or one clear line: precision, out of memory, resume elsewhere."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from certify_zoo.guards import DEVICE_OUT_OF_MEMORY
from conftest import error_line, sigterm_at_call


def cli(*args):
    from certify_zoo.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def random_photos(folder: Path, count: int) -> Path:
    """``count`` 8x8 RGB pictures of uniform noise (seeded) in a new ``folder``: data with no content to learn."""
    from PIL import Image

    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        pixels = (torch.rand(8, 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{index}.png")
    return folder


def assert_one_line_error(result, exit_code: int, *fragments: str) -> str:
    assert result.exit_code == exit_code, result.output
    line = error_line(result.stderr)
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_is_refused_while_the_penalty_is_on(demo_base, tmp_path, precision):
    """A bf16 logit near 10 is rounded by 0.06, the size of the finite difference the penalty divides by h."""
    result = cli("convert", demo_base, "--data", "demo", "--recipe", "demo", "--out", tmp_path / "out",
                 "--precision", precision, "--max-steps", "1", "--batch-size", "8")
    assert_one_line_error(result, 2, f"--precision {precision}", "float32", "--precision no", "--gamma 0")
    assert not (tmp_path / "out").exists()


def test_half_precision_allowed_without_penalty_and_records_say_float32(short_conversion, demo_base):
    from certify_zoo.conversion import ConvertSettings
    from certify_zoo.recipes import load_recipe

    ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out="unused",
                                precision="bf16", gamma=0.0).validate()  # no penalty: nothing to refuse
    settings = json.loads((Path(short_conversion) / "certify_zoo.json").read_text())["settings"]
    assert settings["precision"] == "no" and settings["objective"]["penalty_precision"] == "float32"


def test_resume_in_a_fresh_home_names_the_key_and_works_once_it_is_carried_over(demo_base, demo_data, tmp_path,
                                                                                 monkeypatch):
    """A run interrupted on one machine (its key under CERTIFY_ZOO_CACHE) and resumed where that folder is new."""
    import certify_zoo.conversion as convert_module
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.errors import ConversionInterrupted
    from certify_zoo.recipes import load_recipe

    first_home, fresh_home = tmp_path / "node-a-cache", tmp_path / "node-b-cache"
    out, digits = tmp_path / "out", demo_data / "train"  # a folder: nothing needed from the cache
    monkeypatch.setenv("CERTIFY_ZOO_CACHE", str(first_home))
    real = convert_module.boot_camp_step
    monkeypatch.setattr(convert_module, "boot_camp_step", sigterm_at_call(real, 2))
    with pytest.raises(ConversionInterrupted):
        convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data=str(digits), out=str(out),
                                            max_steps=4, batch_size=16, reps=1, checkpoint_minutes=0))
    monkeypatch.setattr(convert_module, "boot_camp_step", real)

    monkeypatch.setenv("CERTIFY_ZOO_CACHE", str(fresh_home))
    resume = ("convert", demo_base, "--data", digits, "--recipe", "demo", "--out", out, "--max-steps", "4",
              "--batch-size", "16", "--reps", "1", "--checkpoint-minutes", "0", "--resume")
    line = assert_one_line_error(cli(*resume), 2, "CERTIFY_ZOO_CACHE", "checkpoint.key", "this home had none",
                                 str(fresh_home))
    assert "--overwrite" in line
    (fresh_home / "checkpoint.key").write_bytes((first_home / "checkpoint.key").read_bytes())  # carried over
    resumed = cli(*resume)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "certify_zoo.json").read_text())["steps"] == 4


def _allocate_a_petabyte(*args, **kwargs):
    return torch.empty(1 << 50, dtype=torch.uint8)  # the CPU allocator refuses (it raises, nothing is killed)


def test_out_of_memory_in_conversion_names_the_settings_to_change(demo_base, tmp_path, monkeypatch):
    import certify_zoo.conversion as convert_module

    monkeypatch.setattr(convert_module, "boot_camp_step", _allocate_a_petabyte)
    result = cli("convert", demo_base, "--data", "demo", "--recipe", "demo", "--out", tmp_path / "out",
                 "--max-steps", "1", "--batch-size", "8")
    assert_one_line_error(result, 2, "out of memory", "1125899906842624 bytes", "--batch-size", "--grad-accum",
                          "--estimator jl")


def test_out_of_memory_on_the_device_in_evaluation_names_the_settings_to_change(short_conversion, monkeypatch):
    import certify_zoo.evaluation as evaluate_module

    def device_out_of_memory(*args, **kwargs):
        raise DEVICE_OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(evaluate_module, "certify_deterministic", device_out_of_memory)
    result = cli("evaluate", short_conversion, "--data", "demo", "--max-images", "8", "--batch-size", "8")
    assert_one_line_error(result, 2, "out of memory", "Tried to allocate 2.00 GiB", "--batch-size", "--mc-batch-size")


def test_collapse_guard_warns_early_in_a_short_run_and_not_in_a_gentle_one(demo_base, short_conversion, tmp_path):
    """A penalty weight no model can take, at a high lr, drives the student away from the base within a few of
    20 steps: the guard must say so while the run still has steps left (its window is a fifth of a short run, not
    20 steps that only fill at the end), and the record keeps it. The gentle 30-step fixture is never flagged."""
    import io
    import re

    from rich.console import Console

    from certify_zoo.conversion import ConvertSettings, collapse_window, convert
    from certify_zoo.recipes import load_recipe

    out, printed = tmp_path / "collapsed", io.StringIO()
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                        max_steps=20, gamma=1e5, lr=0.5, warmup=0.0, check_images=0),
            console=Console(file=printed, width=400), log_interval=5)
    warned = re.search(r"WARNING: the student agrees with the base on only (\d+)% of clean images at step (\d+)",
                       printed.getvalue())
    assert warned, printed.getvalue()
    assert int(warned.group(1)) < 50 and int(warned.group(2)) <= 12
    record = json.loads((out / "certify_zoo.json").read_text())
    assert record["collapse_warning"] is True and record["final_agreement_with_base"] < 0.5
    gentle = json.loads((short_conversion / "certify_zoo.json").read_text())
    assert gentle["collapse_warning"] is False and gentle["final_agreement_with_base"] > 0.8
    assert [collapse_window(steps) for steps in (2, 20, 30, 100, 10_000)] == [3, 4, 6, 20, 20]


def test_max_steps_sets_the_number_of_steps_even_beyond_one_pass(demo_base, tmp_path):
    """--max-steps is what a run takes, as Accelerate's --max_train_steps: on 11 images at batch 4 (batches of 4, 4
    and 3 a pass) a 7-step run repeats the data over 3 passes; before, it stopped silently after the 3 steps of one."""
    from certify_zoo.conversion import MIN_STEPS, ConvertSettings, convert, planned_steps, short_run_warning
    from certify_zoo.recipes import load_recipe

    assert planned_steps(2, 1, 5) == (5, 3)
    assert planned_steps(2, 3, None) == (6, 3)
    assert planned_steps(10, 1, 4) == (4, 1)
    assert planned_steps(0, 1, 2) == (2, 2)
    # a folder of 3,000 images at batch 48 is 62 steps an epoch: said before the run, with the --epochs that is enough
    assert short_run_warning(62, 62, 1, None).startswith("62 steps (1 pass over the data)")
    assert "--epochs 14 gives 868 steps" in short_run_warning(62, 62, 1, None) and MIN_STEPS == 840
    assert short_run_warning(62, 62, 1, 62) is None and short_run_warning(26_690, 26_690, 1, None) is None
    folder = random_photos(tmp_path / "photos", 11)
    out = tmp_path / "out"
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data=str(folder), out=str(out),
                                        max_steps=7, batch_size=4, check_images=0, reps=1))
    record = json.loads((out / "certify_zoo.json").read_text())
    assert (record["steps"], record["epochs_run"], record["images_seen"]) == (7, 3, 26)


def test_a_recipes_passes_over_small_data_are_raised_to_the_fewest_steps_that_held(demo_base, tmp_path):
    """One epoch of a small folder is a few dozen steps, and the gamma study's BatchNorm networks kept their base's
    accuracy only after 840 (30 of their epochs; after 280 they had lost 4-7 points): the recipe's passes are raised
    until a run has --min-steps steps, and said so. An ImageNet epoch is longer already; --epochs given on the
    command line and --max-steps are taken as given."""
    from certify_zoo.conversion import MIN_STEPS, ConvertSettings, planned_steps, raised_passes_note
    from certify_zoo.recipes import load_recipe

    assert planned_steps(28, 1, None, MIN_STEPS) == (840, 30)  # the study's CNN folder: 28 steps of 48 a pass
    assert planned_steps(21, 1, None, MIN_STEPS) == (840, 40)
    assert planned_steps(26_690, 1, None, MIN_STEPS) == (26_690, 1)  # ImageNet-1k at batch 48
    assert planned_steps(28, 1, 20, MIN_STEPS) == (20, 1) and planned_steps(28, 2, None, 0) == (56, 2)
    recipe = load_recipe("resnet")
    chosen = [ConvertSettings.from_recipe(recipe, model="m", data="d", out="o", **overrides).min_steps
              for overrides in ({}, {"epochs": 2}, {"epochs": 2, "min_steps": 50}, {"min_steps": 0})]
    assert chosen == [MIN_STEPS, 0, 50, 0]
    assert raised_passes_note(1, 1, 28, MIN_STEPS) is None
    assert raised_passes_note(1, 30, 28, MIN_STEPS) == ("the recipe's 1 pass over this data would be 28 steps, fewer "
                                                       "than --min-steps 840: 30 passes, 840 steps (--epochs takes "
                                                       "passes as given)")
    assert "would be 1 step, fewer" in raised_passes_note(1, 840, 1, MIN_STEPS)  # 11 photos in batches of 64
    folder = random_photos(tmp_path / "photos", 11)
    common = (demo_base, "--data", folder, "--recipe", "generic", "--batch-size", 4, "--check-images", 0,
              "--reps", 1)
    raised = cli("convert", *common, "--min-steps", 7, "--out", tmp_path / "raised")  # 3 steps a pass
    assert raised.exit_code == 0, raised.output
    assert "1 pass over this data would be 3 steps, fewer than --min-steps 7: 3 passes, 9 steps" in raised.stderr
    record = json.loads((tmp_path / "raised" / "certify_zoo.json").read_text())
    assert (record["steps"], record["epochs_run"], record["settings"]["min_steps"]) == (9, 3, 7)
    given = cli("convert", *common, "--epochs", 1, "--out", tmp_path / "given")
    assert given.exit_code == 0, given.output
    assert "would be fewer" not in given.stderr and "--epochs 280 gives 840 steps" in given.stderr
    assert json.loads((tmp_path / "given" / "certify_zoo.json").read_text())["steps"] == 3


def test_the_plan_scales_the_lr_with_the_global_batch_and_steers_gamma_only_with_held_out_images():
    """plan_conversion: the global batch over processes and accumulation, the recipe's lr scaled to it, passes raised
    to reach min_steps, gamma's start stated at 1000 classes from its effective weight; no held-out image, no
    controller (the start stays)."""
    from certify_zoo.conversion import ConvertSettings, plan_conversion
    from certify_zoo.objective import ObjectiveSettings

    settings = ConvertSettings(model="m", data="d", out="o", batch_size=16, grad_accum=2, lr=0.01, reference_batch=64,
                               lr_scaling="linear", epochs=1, min_steps=30, gamma_start=0.0005)
    plan = plan_conversion(settings, batches_per_epoch=20, processes=4, num_classes=10, held_out=True)
    assert (plan.global_batch, plan.lr_factor, plan.peak_lr) == (128, 2.0, 0.02)
    assert (plan.steps_per_epoch, plan.epochs, plan.total_steps) == (10, 3, 30)
    assert plan.auto_gamma and plan.gamma_start == pytest.approx(0.05)  # 0.0005 effective at 10 classes
    assert plan_conversion(settings, 20, 4, 1000, held_out=True).gamma_start == pytest.approx(0.0005)
    assert not plan_conversion(settings, 20, 4, 10, held_out=False).auto_gamma
    fixed = ConvertSettings(model="m", data="d", out="o", objective=ObjectiveSettings(gamma=0.2), min_steps=0)
    fixed_plan = plan_conversion(fixed, 7, 1, 10, held_out=True)
    assert not fixed_plan.auto_gamma and fixed_plan.gamma_start == 0.2 and fixed_plan.total_steps == 7
