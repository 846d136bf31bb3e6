"""The honest surface on real digits: evaluate --audit pgd, the agreement report, unconverted models, predict."""
from __future__ import annotations

import json
import shutil

from conftest import copy_with_kappa, run_cli


def test_evaluate_audit_and_agreement_records(short_conversion, tmp_path):
    short_conversion = copy_with_kappa(short_conversion, tmp_path / "model", 0.5)  # a copy with claims to audit
    result = run_cli("evaluate", str(short_conversion), "--data", "demo", "--method", "all", "--n", "100",
                     "--subsample", "3", "--max-images", "24", "--audit", "pgd", "--audit-steps", "50",
                     "--audit-restarts", "2", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    record = json.loads((short_conversion / "certification.json").read_text())
    assert record["num_images"] == 24 and record["subsample"] == 3
    audit = json.loads((short_conversion / "audit.json").read_text())
    assert audit["steps"] == 50 and audit["restarts"] == 2 and record["audit"]["attacked"] == audit["attacked"] > 0
    assert record["certificates"]["deterministic"]["audit"] == audit["statement"] == record["audit"]["statement"]
    assert "sound" not in audit["statement"] and "proven" not in audit["statement"]
    assert audit["statement"] in result.stdout
    for row in audit["worst"]:
        assert row["index"] % 3 == 0 and 0 < row["flip_distance"] <= row["claimed_radius"] * (1 + 1e-5)
        assert row["file"].endswith(".png")
    agreement = record["agreement"]
    deterministic = [row["accuracy"] for row in record["certificates"]["deterministic"]["certified_accuracy"]]
    assert [row["deterministic"] for row in agreement["certified_accuracy"]] == deterministic
    gap = agreement["gap_to_gaussian_average"]
    assert 0 < gap["median_max_abs"] <= 1 and gap["mean_max_abs"] <= gap["mean_l1"] <= 2
    assert "PGD" in result.stdout and "checked by" in result.stdout


def test_unconverted_model_defaults_to_monte_carlo_and_says_so(demo_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(demo_base, base)
    result = run_cli("evaluate", str(base), "--data", "demo", "--sigma", "0.5", "--n", "50", "--max-images", "8",
                     "--out", str(base), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "not certificates" in result.stderr  # the warning, logged before the table
    assert "det.*" in result.stdout and "* = model not converted by certify-zoo" in result.stdout  # rows + caption
    record = json.loads((base / "certification.json").read_text())
    assert not record["converted_by_certify_zoo"] and "monte_carlo" in record["certificates"]


def test_predict_prints_one_row_per_image_and_json_parses(short_conversion, demo_data):
    folder = demo_data / "test" / "7"
    files = sorted(folder.glob("*.png"))
    table = run_cli("predict", str(short_conversion), str(folder), "--top-k", "3", env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if ".png" in line]
    assert len(rows) == len(files) and all(f.name in table.stdout for f in files)
    lines = run_cli("predict", str(short_conversion), str(folder), str(files[0]), "--json", "--top-k", "3")
    assert lines.returncode == 0, lines.stderr
    parsed = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(parsed) == len(files) + 1
    for row in parsed:
        assert len(row["top_k"]) == 3 and row["top_k"][0]["class"] == row["class"] and row["radius"] >= 0
        assert abs(sum(item["probability"] for item in row["top_k"]) - 1) < 1 and row["sigma"] == 0.5
    assert sum(row["class"] == "7" for row in parsed) > len(parsed) / 2
    other = run_cli("predict", str(short_conversion), str(files[0]), "--sigma", "0.25", env={"COLUMNS": "200"})
    assert other.returncode == 0 and "converted (and its radius calibrated) at sigma 0.5" in " ".join(
        (other.stdout + other.stderr).split())  # a radius at another sigma than the conversion's is named so
    missing = run_cli("predict", str(short_conversion), str(folder / "nope.png"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr and "does not exist" in missing.stderr
