"""The plot draws certificates only, as step curves that agree with the records at every measured radius."""
from __future__ import annotations

import json
import shutil

import pytest
import torch


def test_steps_from_radii_equal_certified_accuracy_at_every_radius():
    from certify_zoo.certificates import certified_accuracy
    from certify_zoo.plot import accuracy_at, steps_from_radii

    generator = torch.Generator().manual_seed(0)
    radii = torch.rand(500, generator=generator) * 1.2
    radii[:40] = 0.0  # correct with radius 0 counts at r = 0 only
    correct = torch.rand(500, generator=generator) < 0.8
    corners, accuracy = steps_from_radii(radii.tolist(), correct.tolist(), 500)
    assert corners == sorted(corners) and accuracy == sorted(accuracy, reverse=True)  # a falling step function
    probes = sorted(set(radii.tolist()) | {0.0, 0.1, 0.5, 1.19, 1.3})
    expected = certified_accuracy(radii, correct, probes)
    for radius, value in zip(probes, expected):
        assert accuracy_at(corners, accuracy, radius) == pytest.approx(100 * value, abs=1e-9)


@pytest.fixture(scope="module")
def evaluated_pair(short_conversion, demo_base, tmp_path_factory):
    """Base (not converted) and converted, certified alike (evaluate writes per_image.json beside the record)."""
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    root = tmp_path_factory.mktemp("plot")
    base, converted = root / "base", root / "converted"
    shutil.copytree(demo_base, base)
    shutil.copytree(short_conversion, converted)
    metadata = json.loads((converted / "certify_zoo.json").read_text())
    (converted / "certify_zoo.json").write_text(json.dumps({**metadata, "base_model": str(base)}))
    for folder in (base, converted):
        evaluate(EvaluateSettings(model=str(folder), data="demo", sigma=0.5, method="all", n=100, max_images=60,
                                  audit="pgd", audit_steps=5, audit_restarts=1, out=str(folder)))
    assert (converted / "per_image.json").is_file()
    return base, converted


def test_unconverted_deterministic_radii_are_not_drawn_and_a_note_says_why(evaluated_pair):
    from certify_zoo.plot import read_per_image, record_curves

    base, converted = evaluated_pair
    record = json.loads((base / "certification.json").read_text())
    assert record["converted_by_certify_zoo"] is False and "deterministic" in record["certificates"]
    curves, notes = record_curves("base", record, read_per_image(base), secondary=True)
    assert [curve.certificate for curve in curves] == ["monte_carlo"]
    # sigma 0.5 and n = 100 draws certify no radius above 0.75; the record asks up to 1
    reach = "Monte-Carlo n=100 certifies no radius above 0.75 (all n draws one class)."
    assert len(notes) == 2 and notes[0] == f"base: {reach}" and "not certificates" in notes[1]
    assert f"PGD broke {record['audit']['counterexamples']} of {record['audit']['attacked']}" in notes[1]

    converted_record = json.loads((converted / "certification.json").read_text())
    curves, notes = record_curves("converted", converted_record, read_per_image(converted))
    assert [c.certificate for c in curves] == ["monte_carlo", "deterministic"]  # Lipschitz: tables only
    assert notes == [f"converted: {reach}"]
    assert all(curve.exact for curve in curves)  # per-image radii that reproduce the record: exact steps
    # what stands behind the deterministic curve: the audit of this run, or (a radius its conversion withdrew,
    # kappa 0, as a short conversion's) that there was nothing to attack
    audited = converted_record["audit"]["attacked"] > 0
    assert ("PGD broke" if audited else "no radius > 0 to attack") in curves[1].label
    assert "provable w.p. >= 0.999" in curves[0].label


def test_without_matching_per_image_radii_the_curve_is_a_lower_bound_through_the_record(evaluated_pair, tmp_path):
    from certify_zoo.plot import accuracy_at, read_per_image, record_curves

    _, converted = evaluated_pair
    record = json.loads((converted / "certification.json").read_text())
    stale = read_per_image(converted)
    stale = {key: values[:-1] for key, values in stale.items()}  # one image short: another evaluation's file
    for per_image in (None, stale):
        curves, _ = record_curves("converted", record, per_image)
        for curve in curves:
            rows = record["certificates"][curve.certificate]["certified_accuracy"]
            assert not curve.exact and list(curve.radii) == [row["radius"] for row in rows]
            between = (rows[1]["radius"] + rows[2]["radius"]) / 2  # held at the next measured value: a lower bound
            assert accuracy_at(curve.radii, curve.accuracy, between) == pytest.approx(100 * rows[2]["accuracy"])


def test_card_of_an_output_shows_the_base_by_its_certificates_only(evaluated_pair):
    from certify_zoo.card import PLOT_NAME, refresh_outputs

    _, converted = evaluated_pair
    (converted / PLOT_NAME).unlink(missing_ok=True)
    refresh_outputs(converted)
    assert (converted / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (converted / "README.md").read_text()
    assert "base (unconverted)" in card and "not certificates and are not shown" in card
    base_rows = [line for line in card.splitlines() if line.startswith("| base (unconverted)")]
    assert base_rows and all("Monte-Carlo" in line for line in base_rows)  # no deterministic row for the base


def test_monte_carlo_on_the_check_subsample_is_drawn_from_those_images(short_conversion, tmp_path):
    """evaluate's default on a converted model: Monte-Carlo on a subsample only; its exact steps use that subsample."""
    from certify_zoo.evaluation import EvaluateSettings, evaluate
    from certify_zoo.plot import read_per_image, record_curves

    folder = tmp_path / "converted"
    shutil.copytree(short_conversion, folder)
    record = evaluate(EvaluateSettings(model=str(folder), data="demo", max_images=60, check_images=20, n=100,
                                       audit_steps=3, audit_restarts=1)).record
    block = record["certificates"]["monte_carlo"]
    assert block["images"] < record["num_images"]
    curves, _ = record_curves("converted", record, read_per_image(folder))
    monte_carlo = next(curve for curve in curves if curve.certificate == "monte_carlo")
    assert monte_carlo.exact and f"on {block['images']} of {record['num_images']} images" in monte_carlo.label


def test_a_withdrawn_radius_is_labelled_as_such_not_as_an_audit_of_nothing():
    from certify_zoo.plot import legend_label

    block = {"certified_accuracy": [], "acr": 0.0, "calibration": {"kappa": 0.0, "temperature": 1.0}}
    record = {"certificates": {"deterministic": block}, "audit": {"attacked": 0, "counterexamples": 0}}
    label = legend_label("out", "deterministic", record)
    assert "calibration withdrawn (kappa 0)" in label and "no radius > 0 to attack" in label and "0/0" not in label
    record["audit"] = {"attacked": 40, "counterexamples": 1}
    block["calibration"]["kappa"] = 0.7
    assert "calibration x0.70, PGD broke 1/40" in legend_label("out", "deterministic", record)
