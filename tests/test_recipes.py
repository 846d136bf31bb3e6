"""Recipes: the choice from an architecture, each family's recipe running a real conversion step, the commands."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from certify_zoo.errors import CertifyZooError
from certify_zoo.models import create_timm_model
from certify_zoo.recipes import (RECIPE_DIR, available_recipes, choose_recipe, load_recipe, recipe_for,
                                 scaled_learning_rate)

# A tiny member of each family, built from config (timm kwargs keep them at 32x32 and a few layers).
FAMILY_MODELS = {
    "resnet": ("resnet10t", {}),
    "convnext": ("test_convnext", {}),
    "vit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)),
    "efficientnet": ("test_efficientnet", {}),
    "regnet": ("regnetx_002", {}),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1),
                                                  num_heads=(1, 1))),
    "generic": ("test_nfnet", {}),
}


@pytest.mark.parametrize("name, expected", [
    ("resnet50", "resnet"), ("timm/resnet50.a1_in1k", "resnet"), ("seresnext50_32x4d", "resnet"),
    ("convnext_base", "convnext"), ("timm/convnext_base.fb_in22k_ft_in1k", "convnext"), ("convnextv2_tiny", "convnext"),
    ("vit_base_patch16_224", "vit"), ("deit_small_patch16_224", "vit"), ("eva02_base_patch14_224", "vit"),
    ("efficientnet_b0", "efficientnet"), ("tf_efficientnet_b3", "efficientnet"),
    ("mobilenetv3_large_100", "efficientnet"),
    ("regnety_040", "regnet"), ("swin_base_patch4_window7_224", "swin"), ("swinv2_tiny_window8_256", "swin"),
    ("efficientvit_b0", "generic"), ("mobilevit_s", "generic"), ("inception_v3", "generic"),
])
def test_recipe_for_timm_architectures(name, expected):
    assert recipe_for(name) == expected


def test_recipe_for_transformers_model_type_wins_over_the_class_name():
    assert recipe_for("ViTForImageClassification", "vit") == "vit"
    assert recipe_for("ResNetForImageClassification", "resnet") == "resnet"
    assert recipe_for("ConvNextForImageClassification", "convnext") == "convnext"
    assert recipe_for("SomethingNew", "levit") == "generic"


def test_every_recipe_says_every_knob_and_supports_three_sigmas():
    knobs = {"sigma", "gamma", "reps", "h", "noise_prob", "estimator", "optimizer", "lr", "lr_min", "momentum",
             "weight_decay", "warmup", "clip_grad_norm", "lr_scaling", "reference_batch", "batch_size", "image_size",
             "epochs", "precision", "bn_mode", "differs_from_paper", "description", "gamma_start"}
    for name in available_recipes():
        recipe = load_recipe(name)
        assert knobs <= recipe.keys(), (name, knobs - recipe.keys())
        assert recipe["precision"] == "no"  # the finite-difference penalty needs fp32
        # no recipe carries a gamma from one model to another, and no recipe moves BatchNorm statistics
        assert recipe["gamma"] == "auto" and recipe["bn_mode"] == "auto", name
        if name != "demo":
            assert recipe["sigma_choices"] == [0.25, 0.5, 1.0] and recipe["sigma"] == 0.25
    resnet = load_recipe("resnet")  # the paper's ImageNet ResNet-50 setting
    assert (resnet["optimizer"], resnet["momentum"], resnet["weight_decay"], resnet["lr"], resnet["lr_min"],
            resnet["image_size"], resnet["reference_batch"]) == ("sgd", 0.9, 1e-4, 0.01, 0.001, 224, 48)


def test_sigma_overrides_apply_only_to_their_sigma():
    from certify_zoo.recipes import apply_sigma_overrides

    recipe = {"sigma": 0.25, "lr": 0.01, "sigma_overrides": {"1.0": {"lr": 0.005}}}
    assert apply_sigma_overrides(recipe, 1.0)["lr"] == 0.005
    assert apply_sigma_overrides(recipe, 0.5)["lr"] == 0.01 and apply_sigma_overrides(recipe, None)["lr"] == 0.01


def test_learning_rate_follows_the_global_batch_by_the_recipe_rule():
    assert scaled_learning_rate(0.01, 384, 48, "linear") == pytest.approx(0.08)  # 8 GPUs x 48
    assert scaled_learning_rate(1e-5, 128, 32, "sqrt") == pytest.approx(2e-5)
    assert scaled_learning_rate(0.01, 384, 48, "none") == 0.01


def save_tiny(architecture: str, kwargs: dict, folder: Path) -> Path:
    from certify_zoo.export import save_timm_model

    torch.manual_seed(0)
    net = create_timm_model(architecture, pretrained=False, num_classes=10, **kwargs,
                            pretrained_cfg_overlay=dict(input_size=(3, 32, 32), crop_pct=1.0, hf_hub_id=None,
                                                        num_classes=10))
    save_timm_model(net.eval(), folder, [str(i) for i in range(10)])
    return folder


@pytest.fixture(scope="module")
def few_images(demo_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("few") / "images"
    folder.mkdir()
    for file in sorted((demo_data / "train").rglob("*.png"))[:8]:
        shutil.copy(file, folder / f"{file.parent.name}_{file.name}")
    return folder


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_each_family_recipe_is_chosen_and_runs_a_conversion_step(family, few_images, tmp_path):
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.models import load_classifier

    architecture, kwargs = FAMILY_MODELS[family]
    model = save_tiny(architecture, kwargs, tmp_path / architecture)
    choice = choose_recipe(str(model))
    assert (choice.name, choice.architecture, choice.automatic) == (family, architecture, True)
    out = tmp_path / "out"
    result = convert(ConvertSettings.from_recipe(load_recipe(choice.name), model=str(model), data=str(few_images),
                                                 out=str(out), batch_size=4, max_steps=1))
    assert result.steps == 1 and result.images_seen == 4
    record = json.loads((out / "certify_zoo.json").read_text())
    recipe = load_recipe(family)
    assert record["settings"]["recipe"] == family and record["settings"]["optimizer"] == recipe["optimizer"]
    assert record["scale_out"]["peak_lr"] == pytest.approx(
        scaled_learning_rate(recipe["lr"], 4, recipe["reference_batch"], recipe["lr_scaling"]))
    # the card names the learning rate the run used, not the recipe's (stated at another batch); it had said
    # "lr 0.005 ... batch 4" for a run at lr 0.0003125
    card = (out / "README.md").read_text()
    from certify_zoo.card import fmt

    assert f"lr {fmt(record['scale_out']['peak_lr'])} -> " in card and "global batch 4 (1 process x 4" in card
    before, after = load_classifier(str(model)), load_classifier(str(out))
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed  # one optimiser step moved the student


runner = CliRunner()


def cli(*args: str):
    from certify_zoo.cli import app

    return runner.invoke(app, list(args))


@pytest.mark.parametrize("name, recipe", [("resnet50", "resnet"), ("timm/convnext_base", "convnext"),
                                          ("vit_base_patch16_224", "vit"), ("efficientnet_b0", "efficientnet")])
def test_convert_on_a_timm_name_prints_its_recipe_first(name, recipe, tmp_path):
    result = cli("convert", name, "--data", "demo", "--out", str(tmp_path / "out"))
    first = result.output.splitlines()[0]  # offline: loading the weights fails after the recipe line
    assert first.startswith(f"recipe {recipe} (chosen for architecture {name.removeprefix('timm/')}"), result.output
    assert result.exit_code != 0 and not (tmp_path / "out" / "model.safetensors").exists()


def test_recipes_command_lists_and_shows(tmp_path):
    listing = cli("recipes")
    assert listing.exit_code == 0
    for name in available_recipes():
        assert name in listing.output
    # `recipes list` (what the help's "list them" and the top-level `list` lead one to type) says the same
    assert cli("recipes", "list").output == listing.output
    assert json.loads(cli("recipes", "list", "--json").output) == json.loads(cli("recipes", "--json").output)
    shown = cli("recipes", "show", "resnet")
    assert shown.exit_code == 0 and 'optimizer = "sgd"' in shown.output and "differs_from_paper" in shown.output
    # the evidence behind the penalty step, rendered from the study record that ships with the recipes
    from certify_zoo.recipes.evidence import evidence_text, load_evidence

    evidence = load_evidence()
    assert evidence is not None and "Why this penalty step" in shown.output
    for line in evidence_text(evidence).splitlines()[:12]:
        assert line in shown.output
    assert evidence["labelled"]["demo"]["paper"]["seeds"] == [0, 1, 2, 3]
    from certify_zoo.recipes.evidence import EVIDENCE_FILE
    from conftest import REPO

    # one record: the docs' copy is a link to the file the package ships
    assert (REPO / "docs" / "records" / "penalty_cost_study.json").resolve() == EVIDENCE_FILE.resolve()
    unknown = cli("recipes", "show", "resnot")
    assert unknown.exit_code != 0 and "unknown recipe 'resnot' (did you mean resnet, regnet?)" in unknown.output
    bad = cli("convert", "resnet50", "--data", "demo", "--out", str(tmp_path / "o"), "--recipe", "resnot")
    assert bad.exit_code != 0 and "unknown recipe" in bad.output


def test_a_recipe_file_may_set_any_conversion_setting_but_not_a_run_one(tmp_path):
    """penalty_share, penalty_every and clip_grad_median_multiple are settings no built-in recipe uses: a recipe of
    one's own may still carry them; what drives one run (out, resume) may not."""
    base = (RECIPE_DIR / "demo.toml").read_text()
    mine = tmp_path / "digits-share.toml"
    mine.write_text("penalty_share = 0.25\npenalty_every = 2\nclip_grad_median_multiple = 3.0\n" + base)
    recipe = load_recipe(mine)
    assert (recipe["penalty_share"], recipe["penalty_every"], recipe["clip_grad_median_multiple"]) == (0.25, 2, 3.0)
    wrong = tmp_path / "digits-out.toml"
    wrong.write_text('out = "elsewhere"\n' + base)
    with pytest.raises(CertifyZooError, match="unknown key"):
        load_recipe(wrong)


def test_recipe_from_a_toml_file_is_named_by_its_stem_and_checked_like_the_built_ins(demo_base, tmp_path):
    mine = tmp_path / "digits-gentle.toml"
    mine.write_text(re.sub(r"(?m)^gamma = .*$", "gamma = 2.0", (RECIPE_DIR / "demo.toml").read_text()))
    choice = choose_recipe(str(demo_base), str(mine))
    assert (choice.name, choice.spec, choice.automatic) == ("digits-gentle", str(mine), False)
    assert load_recipe(mine)["gamma"] == 2.0 and "recipes show" in choice.describe()
    out = tmp_path / "out"
    result = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--recipe", str(mine),
                 "--max-steps", "1", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "certify_zoo.json").read_text())
    assert record["settings"]["recipe"] == "digits-gentle" and record["settings"]["objective"]["gamma"] == 2.0

    typo = tmp_path / "typo.toml"
    typo.write_text((RECIPE_DIR / "demo.toml").read_text() + "learning_rate = 0.1\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = \n")
    misspelt = tmp_path / "misspelt.toml"
    misspelt.write_text("batchsize = 8\n")
    # values of the wrong type had ended in TypeError ('<' between str and int) or DataLoader's ValueError
    wordy, fractional, flag = (tmp_path / f"{name}.toml" for name in ("wordy", "fractional", "flag"))
    wordy.write_text('lr = "fast"\n')
    fractional.write_text("batch_size = 2.5\n")
    flag.write_text("epochs = true\n")
    for path, needle in ((typo, "unknown key learning_rate"), (misspelt, "batchsize (did you mean batch_size?)"),
                         (broken, "is not valid TOML"),
                         (tmp_path / "missing.toml", "does not exist"), (wordy, "lr must be a number, got 'fast'"),
                         (fractional, "batch_size must be an integer, got 2.5"),
                         (flag, "epochs must be an integer, got True")):
        bad = cli("convert", str(demo_base), "--data", "demo", "--out", str(tmp_path / "never"), "--recipe", str(path))
        lines = bad.stderr.strip().splitlines()
        assert bad.exit_code == 2 and len(lines) == 1 and needle in lines[0], bad.output
    assert not (tmp_path / "never").exists()


def test_the_generic_recipe_clips_at_twice_the_running_median_and_a_flag_turns_it_off(demo_base, tmp_path):
    """An architecture of no known family gets the generic recipe, whose penalty steps are clipped at twice their
    running median norm (a MobileViT collapsed without it: gamma study, mvit32); the clip reaches the loop."""
    runs = {}
    for name, extra in (("generic", ()), ("unclipped", ("--clip-grad-median-multiple", "0"))):
        out = tmp_path / name
        result = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--recipe", "generic",
                     "--sigma", "0.5", "--max-steps", "14", "--batch-size", "16", *extra)
        assert result.exit_code == 0, result.output
        runs[name] = json.loads((out / "certify_zoo.json").read_text())
    clipping = runs["generic"]["clipping"]
    assert (clipping["rule"], clipping["multiple"], clipping["steps"]["penalty"]) == ("median", 2.0, 14)
    assert clipping["median_norm"]["penalty"] > 0 and "clipping" not in runs["unclipped"]
