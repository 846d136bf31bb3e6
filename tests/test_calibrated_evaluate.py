"""What evaluate, predict and the Python API report for a converted model: radii times its kappa, and no
deterministic number without an audit and a Monte-Carlo cross-check of the same run."""
from __future__ import annotations

import json

import pytest
import torch

from certify_zoo.models import create_timm_model

from conftest import copy_with_kappa, run_cli


@pytest.fixture(scope="module")
def calibrated(short_conversion, tmp_path_factory):
    """The short conversion with a stored kappa of 0.5 (as a conversion that overclaims would get)."""
    return copy_with_kappa(short_conversion, tmp_path_factory.mktemp("calibrated") / "out", 0.5)


def test_plain_evaluate_audits_and_cross_checks_a_subsample(calibrated):
    result = run_cli("evaluate", str(calibrated), "--data", "demo", "--check-images", "40", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "checks on ~40 of 359 images" in result.stderr  # announced (a log line) before the work starts
    assert "Audit of the deterministic radii:" in result.stdout and "Monte-Carlo n=1000" in result.stdout
    record = json.loads((calibrated / "certification.json").read_text())
    assert record["checks"]["images"] == record["certificates"]["monte_carlo"]["images"]
    assert 20 <= record["checks"]["images"] <= 60
    assert record["audit"]["attacked"] <= record["checks"]["images"]
    assert record["certificates"]["deterministic"]["calibration"]["kappa"] == 0.5
    # the Lipschitz radius is calibrated too (kappa x the bound of the tempered softmax), and says so, as the card's
    # model-index reads it from there
    assert record["certificates"]["deterministic_lipschitz"]["calibration"]["kappa"] == 0.5
    from certify_zoo.card import eval_results

    lipschitz = [result.metric_args for result in eval_results(record)
                 if result.metric_args.get("certificate") == "deterministic_lipschitz"]
    assert lipschitz and all(args["kappa"] == 0.5 for args in lipschitz)
    per_image = json.loads((calibrated / "per_image.json").read_text())
    assert per_image["num_images"] == record["num_images"] == len(per_image["radius_raw"])
    raw, reported = torch.tensor(per_image["radius_raw"]), torch.tensor(per_image["radius_calibrated"])
    assert torch.allclose(reported, 0.5 * raw, atol=2e-6) and raw.max() > 0
    assert sum(per_image["checked"]) == record["checks"]["images"]


def test_mc_samples_given_is_what_the_check_draws(calibrated, tmp_path):
    """--mc-samples set by the user is the check's n too (it once stayed at the check's own 1,000 silently)."""
    result = run_cli("evaluate", str(calibrated), "--data", "demo", "--check-images", "10", "--max-images", "60",
                     "--mc-samples", "200", "--out", str(tmp_path / "records"), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "n 200 forwards per image" in result.stderr and "Monte-Carlo n=200" in result.stdout
    record = json.loads((tmp_path / "records" / "certification.json").read_text())
    assert record["checks"]["monte_carlo_n"] == 200 == record["certificates"]["monte_carlo"]["n"]


def test_audit_none_leaves_deterministic_rows_as_claims(calibrated):
    result = run_cli("evaluate", str(calibrated), "--data", "demo", "--audit", "none", "--max-images", "50",
                     env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "det. claim x0.50" in result.stdout and "Monte-Carlo n=" not in result.stdout
    assert "they are claims" in result.stdout + result.stderr


def test_api_and_predict_report_calibrated_radii(calibrated, demo_data):
    import certify_zoo
    from certify_zoo.predict import PredictSettings, predict

    model = certify_zoo.load(calibrated)
    images = torch.rand(4, *model.input_size)
    result = certify_zoo.certify(model, images)
    assert result.kappa == 0.5 and torch.allclose(result.radius, 0.5 * result.radius_raw)
    image = next((demo_data / "test" / "3").glob("*.png"))
    row = predict(PredictSettings(model=str(calibrated), inputs=[str(image)])).rows[0]
    with torch.no_grad():
        logits = model(model.transform()(__import__("PIL.Image").Image.open(image).convert("RGB")).unsqueeze(0))
    from certify_zoo.certificates import certify_deterministic

    assert row["radius"] == pytest.approx(0.5 * float(certify_deterministic(logits, model.sigma).radius[0]), abs=1e-6)
    # PIL images go through the model's own preprocessing: the answers predict gives for the same files
    from PIL import Image

    files = [image, *sorted((demo_data / "test" / "7").glob("*.png"))[:2]]
    rows = predict(PredictSettings(model=str(calibrated), inputs=[str(f) for f in files])).rows
    with Image.open(files[0]) as one:
        single = certify_zoo.certify(model, one)
    pictures = [Image.open(f) for f in files]
    several = certify_zoo.certify(model, pictures)
    assert single.radius.shape == (1,) and float(single.radius[0]) == pytest.approx(row["radius"], abs=1e-6)
    assert [r["class_index"] for r in rows] == several.prediction.tolist()
    assert several.radius.tolist() == pytest.approx([r["radius"] for r in rows], abs=1e-6)
    assert not several.radius.requires_grad and several.radius.grad_fn is None


@pytest.mark.parametrize("kappa, warned", [(0.8, True), (0.02, False)])
def test_audit_compares_broken_claims_with_what_the_calibration_promised(short_conversion, tmp_path, kappa, warned):
    """The 30 gentle steps did not smooth the model (its self-check withdrew the radius): at kappa 0.8 PGD breaks
    far more than the 1 / (m + 1) of claims a calibration promises, and evaluate says so; at kappa 0.02 it breaks
    none and stays quiet. The bound travels into the audit record either way."""
    import io

    from rich.console import Console

    from certify_zoo.evaluation import EvaluateSettings, evaluate

    folder = copy_with_kappa(short_conversion, tmp_path / "out", kappa)
    record = json.loads((folder / "certify_zoo.json").read_text())
    bound = record["calibration"]["broken_share_bound"]
    assert bound == pytest.approx(1 / (record["self_check"]["held_out_images"] + 1), abs=1e-4)
    printed = io.StringIO()
    audit = evaluate(EvaluateSettings(model=str(folder), data="demo", sigma=0.5, method="deterministic", audit="pgd",
                                      max_images=48, write=False),
                     console=Console(file=printed, width=300)).record["audit"]
    assert audit["calibration_broken_share_bound"] == bound
    assert (audit["calibration_bound_p_value"] < 0.05) == warned and (audit["counterexamples"] > 0) == warned
    assert ("more than the" in printed.getvalue() and "the calibration expects" in printed.getvalue()) == warned


def test_one_broken_claim_in_a_small_audit_is_within_the_bound_and_many_are_not():
    from certify_zoo.selfcheck import broken_share_bound, broken_share_p_value

    bound = broken_share_bound(128)
    assert broken_share_p_value(0, 100, bound) == 1.0
    assert broken_share_p_value(1, 100, bound) > 0.4  # expected 0.78 breaks in 100 claims: one is no news
    assert broken_share_p_value(3, 100, bound) < 0.05
    assert broken_share_p_value(3, 168, 1 / 73) > 0.05  # the ConvNeXt at lr 1e-3: 3 of 168 with 72 held out


def test_check_data_calibrates_on_images_the_conversion_never_trains_on(demo_base, demo_data, tmp_path):
    """--check-data: the controller's and self-check's images come from another source (here the digits' test split,
    which the base never saw), drawn by the seed; every conversion image then trains. The record, the card and
    evaluate say where the calibration's images came from."""
    import io
    from pathlib import Path

    from rich.console import Console

    from certify_zoo.card import calibration_text
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.data import list_image_files, unlabelled_images
    from certify_zoo.data_sources import check_images, conversion_loader
    from certify_zoo.evaluation import EvaluateSettings, evaluate
    from certify_zoo.models import load_classifier
    from certify_zoo.recipes import load_recipe

    transform = load_classifier(str(demo_base)).transform()
    check = str(demo_data / "test")
    drawn = check_images(check, transform, 40, seed=3).images
    assert drawn.shape[0] == 40 and torch.equal(drawn, check_images(check, transform, 40, seed=3).images)
    every = unlabelled_images(check, transform)
    stacked = torch.stack([every[i][0] for i in range(len(every))])
    assert all((stacked == image).flatten(1).all(1).any() for image in drawn)  # each is one of the folder's images
    assert not torch.equal(drawn, check_images(check, transform, 40, seed=4).images)
    trained = conversion_loader("demo", transform, 32, seed=3, holdout=0)
    assert trained.holdout is None and trained.num_images == len(list_image_files(demo_data / "train"))

    out = tmp_path / "out"
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                        max_steps=8, gamma=2.0, lr=0.005, check_images=40, check_data=check, seed=3))
    metadata = json.loads((out / "certify_zoo.json").read_text())
    assert metadata["held_out_images"] == 40 and metadata["settings"]["check_data"] == check
    assert metadata["calibration"]["images_from"] == "check data"
    assert "on the --check-data images" in calibration_text(metadata)  # 8 steps: withdrawn, as a rough model is
    shown = {**metadata, "calibration": {**metadata["calibration"], "kappa": 0.5}}  # as a calibrated one reads
    assert "40 --check-data images" in calibration_text(shown) and "--check-data calibrates" not in \
        calibration_text(shown)
    default = {**shown, "calibration": {**shown["calibration"], "images_from": "conversion data"}}
    assert "conversion images held out of training" in calibration_text(default)
    assert "--check-data calibrates on images it never saw" in calibration_text(default)

    # certified on the check data's own source: the 40 calibration images are left out, the rest certified
    drawn = {str((demo_data / "test" / name).resolve()) for name in metadata["check_images_drawn"]["files"]}
    assert len(drawn) == 40 and all(Path(name).is_file() for name in drawn)
    printed = io.StringIO()
    record = evaluate(EvaluateSettings(model=str(out), data=check, method="deterministic", audit="none",
                                       write=False), console=Console(file=printed, width=300)).record
    assert record["left_out_calibration_images"] == 40 and record["num_images"] == len(every) - 40
    assert "left out 40 images" in printed.getvalue()
    elsewhere = evaluate(EvaluateSettings(model=str(out), data="demo", method="deterministic", audit="none",
                                          max_images=16, write=False)).record
    assert elsewhere["left_out_calibration_images"] == 0 and elsewhere["num_images"] == 16


def test_too_few_held_out_images_report_no_deterministic_radius(demo_base, tmp_path):
    """A calibration on m held-out images promises at most 1 / (m + 1) of claims broken: below 19 images it reports
    no deterministic radius, and the self-check and the card say why (a conversion on a dozen photos held out one)."""
    import io

    from rich.console import Console

    from certify_zoo.card import calibration_text
    from certify_zoo.certificate_names import too_few_to_calibrate
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe
    from certify_zoo.selfcheck import MIN_CALIBRATION_IMAGES, final_kappa

    assert final_kappa(0.9, MIN_CALIBRATION_IMAGES) == 0.8 and final_kappa(0.9, MIN_CALIBRATION_IMAGES - 1) == 0.0
    out, printed = tmp_path / "out", io.StringIO()
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                        max_steps=4, gamma=0.0, lr=0.0, check_images=6),
            console=Console(file=printed, width=300))
    assert "convert step" in printed.getvalue()
    before_training = printed.getvalue().split("convert step")[0]
    assert "6 held-out images cannot calibrate" in before_training and "will report no deterministic radius" in \
        before_training  # said before the run, not only after it
    metadata = json.loads((out / "certify_zoo.json").read_text())
    check, calibration = metadata["self_check"], metadata["calibration"]
    assert check["held_out_images"] == 6 and calibration["kappa"] == 0.0
    # measured at T = 1 for the record, no temperature search or refinement that could only end at kappa 0
    assert [c["temperature"] for c in calibration["candidates"]] == [1.0] and calibration["refinement"] == []
    assert calibration["by_refinement"] is None and check["audit"]["attacked"] > 0
    assert "no calibration" in printed.getvalue() and "self-check 1/1: temperature 1:" in printed.getvalue()
    assert calibration["broken_share_bound"] == pytest.approx(1 / 7, abs=1e-4)
    assert any("6 held-out images cannot calibrate" in warning and "--check-data" in warning
               for warning in check["warnings"])
    assert "6 held-out images cannot calibrate a deterministic radius" in calibration_text(metadata)
    assert "at least 19 images" in calibration_text(metadata)
    assert too_few_to_calibrate(1, MIN_CALIBRATION_IMAGES).startswith("1 held-out image cannot")  # a dozen photos


def test_no_held_out_images_report_no_deterministic_radius(demo_base, tmp_path):
    """--check-images 0 sets no image aside: no self-check runs, and, as below 19 images, no deterministic radius is
    reported. It had reported the raw radius, which no attack had checked, labelled as calibrated ("det. x1.00")."""
    out = tmp_path / "out"
    converted = run_cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--max-steps", "3",
                        "--check-images", "0", "--workers", "0", env={"COLUMNS": "300"})
    assert converted.returncode == 0, converted.stderr
    assert "no self-check runs, and no deterministic radius will be reported" in converted.stderr
    metadata = json.loads((out / "certify_zoo.json").read_text())
    assert "self_check" not in metadata and metadata["calibration"]["kappa"] == 0.0
    assert metadata["calibration"]["images"] == 0 and metadata["calibration"]["broken_share_bound"] == 1.0
    evaluated = run_cli("evaluate", str(out), "--data", "demo", "--max-images", "40", "--mc-samples", "100",
                        "--workers", "0", env={"COLUMNS": "200"})
    assert evaluated.returncode == 0, evaluated.stderr
    assert "det. withdrawn (kappa 0)" in evaluated.stdout and "x1.00" not in evaluated.stdout
    record = json.loads((out / "certification.json").read_text())
    deterministic = record["certificates"]["deterministic"]
    assert deterministic["calibration"]["kappa"] == 0.0 and deterministic["acr"] == 0.0
    raw = record["certificates"]["deterministic_raw"]
    assert raw["acr"] > 0  # what softmax v(x) claims is still shown, as a claim
    card = (out / "README.md").read_text()
    assert "no deterministic radius is reported (kappa 0): 0 held-out images cannot calibrate" in card

def test_predict_says_how_its_radii_are_calibrated(short_conversion, demo_data, tmp_path):
    """The table's caption names the calibration its radii carry, and a withdrawn radius (kappa 0) is explained
    instead of printed as a column of zeros without a word."""
    image = next((demo_data / "test" / "3").glob("*.png"))
    for kappa, expected in ((0.5, "calibration x0.50"), (0.0, "calibration withdrawn (kappa 0)")):
        folder = copy_with_kappa(short_conversion, tmp_path / f"kappa{kappa}", kappa)
        result = run_cli("predict", str(folder), str(image), env={"COLUMNS": "250"})
        assert result.returncode == 0, result.stderr
        said = " ".join((result.stdout + result.stderr).split())  # rich may wrap the caption
        assert expected in said
        assert ("This model's conversion withdrew its deterministic radius (kappa 0" in said) == (kappa == 0.0)


def test_evaluate_names_a_withdrawn_radius_and_does_not_call_an_empty_audit_clean(short_conversion, tmp_path):
    """kappa 0 (the self-check withdrew the radius): every reported radius is 0, PGD has nothing to attack, and
    that is said as such, not as 'no counterexample found by PGD (0 points)' beside a 'claim x0.00' row."""
    folder = copy_with_kappa(short_conversion, tmp_path / "out", 0.0)
    result = run_cli("evaluate", str(folder), "--data", "demo", "--max-images", "30", "--check-images", "10",
                     "--n", "100", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())
    # said before the work starts, in the words of the card, predict and certify_zoo.load (card.withdrawal_text)
    from certify_zoo.card import withdrawal_text

    sentence = withdrawal_text(json.loads((folder / "certify_zoo.json").read_text()), f"certify-zoo evaluate {folder} "
                               "--method monte-carlo")
    assert sentence.split(": every")[0] in " ".join(result.stderr.split())
    assert "no self-check record says why" in withdrawal_text({"calibration": {"kappa": 0.0}})  # a cut record
    assert "det. withdrawn (kappa 0)" in said and "x0.00" not in said and "claim withdrawn" not in said
    assert "nothing to attack: no image has a reported radius above 0" in said and "0 points" not in said
    record = json.loads((folder / "certification.json").read_text())
    assert record["audit"]["attacked"] == 0
    from certify_zoo.card import eval_results, render_card

    assert {result.metric_args.get("certificate") for result in eval_results(record)} == {None, "monte_carlo"}
    card = " ".join(str(render_card(folder)).split())  # the card claims no deterministic number, and says why
    assert "| deterministic withdrawn (kappa 0) |" in card and "withdrew its deterministic radius" in card
    kept = copy_with_kappa(short_conversion, tmp_path / "kept", 0.5)
    assert "withdrew its deterministic radius" not in str(render_card(kept))
    import warnings

    import certify_zoo

    with pytest.warns(UserWarning, match="withdrew its deterministic radius.*certify_monte_carlo"):  # the API too
        model = certify_zoo.load(folder)
    assert float(certify_zoo.certify(model, torch.rand(2, *model.input_size)).radius.max()) == 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        certify_zoo.load(kept)  # a radius that stands: no such warning
    assert not any("withdrew" in str(warning.message) for warning in caught)


def test_the_calibration_chooses_among_temperatures_whose_kappa_can_stand():
    """The refinement only shrinks kappa, and a kappa below WITHDRAW_BELOW ends withdrawn: taking the largest mean
    radius over every temperature chose a sharper softmax whose kappa was doomed over one whose radius would stand."""
    from certify_zoo.selfcheck import WITHDRAW_BELOW, best_surviving

    def trial(mean_radius, temperature, kappa):
        return (mean_radius, temperature, kappa, {}, None, 0, 0)

    paper, sharp = trial(0.10, 1.0, 0.5), trial(0.15, 0.5, WITHDRAW_BELOW - 0.01)
    assert best_surviving([paper, trial(0.12, 0.7, 0.4), sharp])[1] == 0.7
    assert best_surviving([paper, sharp]) is paper
    assert best_surviving([trial(0.1, 1.0, 0.2), sharp]) is None
    assert best_surviving([trial(0.1, 1.0, 0.5), trial(0.1, 0.7, 0.5)])[1] == 1.0  # ties: the higher temperature


def test_an_unsmoothed_student_is_withdrawn_without_attacking_its_calibrated_radii(demo_base, demo_data, tmp_path):
    """A student that is its base (lr 0) overclaims at every temperature. The self-check chose the sharpest one and
    attacked its calibrated radii, 100 steps x 4 restarts a round, for a kappa that could only end at 0: on a real
    EfficientNet-Lite2 after 20 steps that was 565 of the self-check's 967 s. It now stops there, with the paper's
    radius (T = 1) on record."""
    import io

    from rich.console import Console

    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe
    from certify_zoo.selfcheck import WITHDRAW_BELOW

    out, printed = tmp_path / "out", io.StringIO()
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                        max_steps=2, gamma=0.0, lr=0.0, check_data=str(demo_data / "test"),
                                        check_images=24), console=Console(file=printed, width=300))
    calibration = json.loads((out / "certify_zoo.json").read_text())["calibration"]
    assert [c["temperature"] for c in calibration["candidates"]] == [1.0, 0.7, 0.5]
    assert all(c["kappa"] < WITHDRAW_BELOW for c in calibration["candidates"]), calibration["candidates"]
    # the flips found at T = 1 already rule the sharper temperatures out: they are not attacked
    assert [c["attacked"] for c in calibration["candidates"]] == [True, False, False], calibration["candidates"]
    assert calibration["kappa"] == 0.0 and calibration["refinement"] == [] and calibration["by_refinement"] is None
    # the witnesses on record are the paper's radius's (T = 1)
    assert calibration["temperature"] == 1.0 and calibration["candidates"][0]["kappa"] == pytest.approx(
        min(1.0, calibration["by_pgd"], calibration["by_rho"]), abs=1e-4)
    assert f"no temperature's kappa reaches {WITHDRAW_BELOW:g}" in printed.getvalue()
    assert "chosen; PGD inside its calibrated radii" not in printed.getvalue()


def test_a_temperature_the_flips_already_found_rule_out_is_not_attacked():
    """A flip is a point of another class whatever temperature the radius was read at. On a steep linear model every
    claim at T = 1 is broken far inside its radius, and the sharper temperatures, whose radii are larger, were
    attacked anyway for a kappa that could only end below WITHDRAW_BELOW: two thirds of the self-check of an
    unsmoothed EfficientNet-Lite2. Now the flips found bound their kappa and they are not attacked; an attack of
    T = 0.7 rules it out as well, and the known flips bound it no more loosely than that attack measures."""
    from certify_zoo.certificates import certify_deterministic
    from certify_zoo.selfcheck import (SELF_CHECK_PGD, WITHDRAW_BELOW, BaseAnswers, _audit, bound_by_known_flips,
                                       flip_ratios, self_check)
    from certify_zoo.smoothness import calibration_factor

    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with torch.no_grad():
        linear[1].weight.mul_(40.0)  # confident far beyond what its flips allow: raw radii overclaim
    images = 0.4 + 0.2 * torch.rand(24, 1, 4, 4)
    with torch.no_grad():
        logits = linear(images)
    lines = []
    check = self_check(linear, BaseAnswers.of(logits), images, sigma=0.5, seed=0, report=lines.append)
    candidates = check.calibration()["candidates"]
    assert [c["temperature"] for c in candidates] == [1.0, 0.7, 0.5]
    assert candidates[0]["attacked"] and candidates[0]["counterexamples_within_claim"] == 24
    assert [c["attacked"] for c in candidates[1:]] == [False, False]
    assert all(c["kappa"] < WITHDRAW_BELOW for c in candidates) and check.kappa == 0.0
    assert sum("not attacked, the flips found already put its kappa at most" in line for line in lines) == 2
    # what the skipped attack would have measured
    claim = certify_deterministic(logits, 0.5, 0.7)
    distances, attacked, broken = _audit(linear, images, claim, SELF_CHECK_PGD, 1, 24)
    measured, _ = calibration_factor(flip_ratios(distances, claim.radius), torch.zeros(0))
    assert attacked == broken == 24 and measured < WITHDRAW_BELOW
    assert candidates[1]["kappa"] <= measured + 1e-3
    assert bound_by_known_flips(torch.full((3,), float("inf")), torch.ones(3)) == 1.0  # nothing found: no bound
    assert bound_by_known_flips(torch.tensor([float("inf"), 0.1, 0.05]), torch.tensor([1.0, 0.5, 0.0])) == \
        pytest.approx(0.8 * 0.2)  # an image without a claim bounds nothing


def test_a_flip_found_at_any_temperature_bounds_the_kappa_of_every_temperature():
    """The attack of a sharper temperature reaches further out than that of T = 1, and a flip it finds inside
    T = 1's radii held T = 1's kappa above what that flip allows until the refinement happened to find it again."""
    from certify_zoo.selfcheck import bounded_by_flips

    trial = (0.35, 1.0, 0.7, {"by_pgd": 0.7}, None, 2, 0)
    radius = torch.tensor([1.0, 0.5, 0.0])
    lowered = bounded_by_flips(trial, torch.tensor([float("inf"), 0.15, 0.01]), radius)
    assert lowered[2] == pytest.approx(0.8 * 0.15 / 0.5) and lowered[3]["by_known_flips"] == pytest.approx(0.24)
    assert lowered[0] == pytest.approx(0.24 * 0.5) and lowered[1] == 1.0 and lowered[4:] == trial[4:]
    assert lowered[3]["by_pgd"] == 0.7  # the attack's own witness stays on record
    assert bounded_by_flips(trial, torch.tensor([float("inf"), 0.6, 0.01]), radius) is trial  # 0.96 allows 0.7


def test_refinement_shrinks_kappa_below_the_flips_of_a_linear_model_until_none_is_found():
    """On a linear two-class model the shortest flip of each image is its margin over ||w1 - w2|| (inside the [0,1]
    box here): claims of twice that are broken, and the refined kappa leaves every image's calibrated radius short
    of its flip, after which an attack finds nothing."""
    from dataclasses import replace

    from certify_zoo.certificates import certify_deterministic
    from certify_zoo.selfcheck import refine

    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    images = 0.4 + 0.2 * torch.rand(12, 1, 4, 4)
    with torch.no_grad():
        logits = linear(images)
    weights = linear[1].weight
    flip = ((logits[:, 0] - logits[:, 1]).abs() / (weights[0] - weights[1]).norm()).detach()
    claim = replace(certify_deterministic(logits, 0.5), radius=2 * flip)
    kappa, history = refine(linear, images, claim, 1.0, 0.8, 0, batch_size=12)
    assert history[0]["broken"] == 12 and history[-1]["broken"] == 0 and len(history) >= 2
    assert kappa == pytest.approx(history[-1]["kappa"], abs=1e-4)
    assert 2 * kappa < 1.0  # every calibrated radius, kappa x 2 x flip, falls short of its flip


def test_the_self_checks_attack_shared_out_over_processes_and_summed_is_what_one_process_finds():
    """Under N processes each attacks every N-th piece of the held-out images, with random starts keyed on the piece,
    and an all-reduce adds the parts (the others' pieces are 0 in each): bit for bit the flip distances and counts
    that one process finds, each part attacking only its own pieces."""
    from dataclasses import replace

    from certify_zoo.audit import PGDSettings
    from certify_zoo.certificates import certify_deterministic
    from certify_zoo.selfcheck import _audit
    from certify_zoo.smoothness import ALONE, Shard

    torch.manual_seed(0)
    net = create_timm_model("resnet10t", num_classes=10, stem_width=8, channels=(8, 16, 16, 16)).eval()
    images = torch.rand(21, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = net(images)
    # radii of a random network are ~1e-3: 100x of them is broken on some images and not on others
    claim = certify_deterministic(logits, 0.5)
    claim = replace(claim, radius=claim.radius * 100 * (torch.arange(21) != 6))  # and one image without a claim
    calls = []
    model = lambda x: (calls.append(x.shape[0]), net(x))[1]  # noqa: E731
    settings = PGDSettings(steps=10, restarts=2)
    distances, attacked, broken = _audit(model, images, claim, settings, 3, batch_size=4, shard=ALONE)
    assert attacked == 20 and 0 < broken < 20
    assert torch.isfinite(distances).sum() == broken and distances[6] == float("inf")
    alone_calls, calls[:] = sum(calls), []
    for count in (2, 3):
        parts = []
        for index in range(count):  # the processes one after another, each joining nothing
            parts.append((*_audit(model, images, claim, settings, 3, batch_size=4, shard=Shard(index, count)),
                          sum(calls)))
            calls[:] = []
        assert torch.equal(torch.stack([part[0] for part in parts]).sum(0), distances)
        assert sum(part[1] for part in parts) == attacked and sum(part[2] for part in parts) == broken
        assert all(0 < part[3] < alone_calls * 0.75 for part in parts)  # each attacked a share of the images
