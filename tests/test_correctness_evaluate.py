"""evaluate's answers and records: the sigma they are stated for, which files one run wrote, and where."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

FAST = ("--data", "demo", "--max-images", "16", "--batch-size", "8", "--method", "deterministic")


def cli(*args):
    from certify_zoo.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def said(result, text: str) -> bool:
    """The console wraps long lines: compare without whitespace."""
    return "".join(text.split()) in "".join(result.output.split())


def copy_of(folder: Path, tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_sigma_other_than_the_conversion_warns_and_records_both(short_conversion, tmp_path):
    model = copy_of(short_conversion, tmp_path)
    converted_at = json.loads((model / "certify_zoo.json").read_text())["sigma"]
    assert converted_at == 0.5
    result = cli("evaluate", model, *FAST, "--sigma", "0.25")
    assert result.exit_code == 0, result.output
    assert said(result, "converted at sigma 0.5 and is certified here at sigma 0.25")
    record = json.loads((model / "certification.json").read_text())
    assert record["sigma"] == 0.25 and record["conversion_sigma"] == 0.5
    # the card and info say so too: a pushed card showed numbers at 0.25 for a model that loads at 0.5
    assert "Measured at sigma 0.25, not at the sigma 0.5 the model was converted for" in \
        " ".join((model / "README.md").read_text().split())
    assert said(cli("info", model), "at sigma 0.25, not its conversion's")

    same = cli("evaluate", model, *FAST)
    assert same.exit_code == 0 and "WARNING" not in same.output
    record = json.loads((model / "certification.json").read_text())
    assert record["sigma"] == record["conversion_sigma"] == 0.5
    assert "Measured at sigma" not in (model / "README.md").read_text()


def test_a_run_without_audit_removes_the_previous_runs_audit(short_conversion, tmp_path):
    from certify_zoo.zoo import model_records

    model = copy_of(short_conversion, tmp_path)
    audited = cli("evaluate", model, *FAST, "--audit", "pgd", "--audit-steps", "5", "--audit-restarts", "1")
    assert audited.exit_code == 0, audited.output
    record = json.loads((model / "certification.json").read_text())
    audit = json.loads((model / "audit.json").read_text())
    assert record["files"] == ["certification.json", "per_image.json", "audit.json"]
    assert audit["run"] == record["run"] == json.loads((model / "per_image.json").read_text())["run"]
    assert model_records(str(model))[2]["run"] == record["run"]

    plain = cli("evaluate", model, *FAST, "--audit", "none")
    assert plain.exit_code == 0, plain.output
    record = json.loads((model / "certification.json").read_text())
    assert record["files"] == ["certification.json", "per_image.json"] and "audit" not in record
    assert not (model / "audit.json").exists()
    assert model_records(str(model))[2] == {}


def test_an_earlier_evaluation_is_kept_beside_not_replaced(short_conversion, tmp_path):
    """A second evaluate of a model folder (an eight-image check, say) replaced the records of the first (hours of
    Monte-Carlo on a real model): the earlier run's files move, unchanged, into evaluations/TIME-RUN/, which push
    does not upload."""
    from certify_zoo.hub import publishable_files

    model = copy_of(short_conversion, tmp_path)
    first = cli("evaluate", model, *FAST, "--audit", "pgd", "--audit-steps", "5", "--audit-restarts", "1")
    assert first.exit_code == 0, first.output
    written = {name: (model / name).read_bytes() for name in ("certification.json", "per_image.json", "audit.json")}
    run = json.loads(written["certification.json"])["run"]
    second = cli("evaluate", model, "--data", "demo", "--max-images", "8", "--method", "deterministic", "--audit",
                 "none")
    assert second.exit_code == 0, second.output
    # (the shared conversion may hold an evaluation of another test, which the first run kept in its turn)
    [kept] = [folder for folder in (model / "evaluations").iterdir() if folder.name.endswith(f"-{run}")]
    assert said(second, f"the earlier evaluation's records are kept in {kept}")
    assert {path.name: path.read_bytes() for path in kept.iterdir()} == written
    assert json.loads((model / "certification.json").read_text())["num_images"] == 8
    assert not (model / "audit.json").exists()  # the second run audited nothing
    assert all(path.parent == model for path in publishable_files(model))
    kept_runs = len(list((model / "evaluations").iterdir()))
    assert said(cli("info", model), f"earlier evaluations: {kept_runs}, their records in {model / 'evaluations'}")


def test_evaluate_names_the_unreadable_images_it_skipped(demo_base, demo_data, tmp_path):
    """evaluate skipped a corrupt image without a word (only the record counted it), and its table said "1 images"."""
    folder = tmp_path / "labelled" / "3"
    folder.mkdir(parents=True)
    shutil.copy(sorted((demo_data / "test" / "3").iterdir())[0], folder / "good.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    result = cli("evaluate", demo_base, "--data", tmp_path / "labelled", "--sigma", "0.5", "--method",
                 "deterministic", "--out", tmp_path / "records")
    assert result.exit_code == 0, result.output
    assert said(result, f"skipped 1 unreadable image: {folder / 'corrupt.png'} (--strict stops at the first)")
    assert said(result, "sigma 0.5; 1 image; abstentions")
    record = json.loads((tmp_path / "records" / "certification.json").read_text())
    assert (record["num_images"], record["skipped_images"]) == (1, 1)


def test_raw_radii_of_a_calibrated_model_reach_its_card_only_as_the_raw_claim(short_conversion, tmp_path):
    """evaluate(calibrated=False), for the studies, wrote raw radii into the model's folder, and the card showed them
    as its deterministic certificate, model-index included, where the model reports kappa x those radii."""
    import io

    from huggingface_hub import metadata_load
    from rich.console import Console

    import certify_zoo

    model = copy_of(short_conversion, tmp_path)
    kappa = json.loads((model / "certify_zoo.json").read_text())["calibration"]["kappa"]
    assert kappa != 1.0
    record = certify_zoo.evaluate(model, data="demo", max_images=16, method="deterministic", audit="none",
                                  calibrated=False, console=Console(file=io.StringIO()))
    assert record["certificates"]["deterministic"]["calibration"]["source"] == "none (raw radius)"
    card = (model / "README.md").read_text()
    rows = [line.split("|")[2].strip() for line in card.splitlines() if line.startswith("| this model |")]
    assert rows == ["deterministic raw claim"]
    names = [metric["name"] for result in metadata_load(model / "README.md")["model-index"][0]["results"]
             for metric in result["metrics"]]
    assert names and not [name for name in names if "deterministic" in name]
    shown = cli("info", model)  # its table too
    assert said(shown, "det. raw claim") and not said(shown, "│ model │ det. │")


def test_out_naming_the_models_own_folder_otherwise_refreshes_its_card(short_conversion, tmp_path, monkeypatch):
    """--out /abs/path/model for MODEL 'model' wrote its records but left its card and plot as they were (the folder
    was compared as spelled); --out is checked as the same folder, so both follow."""
    model = copy_of(short_conversion, tmp_path)
    monkeypatch.chdir(tmp_path)
    result = cli("evaluate", "model", "--data", "demo", "--max-images", "8", "--method", "deterministic", "--out",
                 model.resolve())
    assert result.exit_code == 0, result.output
    assert json.loads((model / "certification.json").read_text())["num_images"] == 8
    assert "(8 images" in (model / "README.md").read_text() and (model / "certified_accuracy.png").is_file()


def test_an_audit_left_by_an_older_version_is_removed_and_never_shown(short_conversion, tmp_path):
    from certify_zoo.zoo import model_records

    model = copy_of(short_conversion, tmp_path)
    (model / "certification.json").write_text(json.dumps({"sigma": 0.5, "certificates": {}}))  # no "files"
    (model / "audit.json").write_text(json.dumps({"counterexamples": 3, "worst": []}))
    assert model_records(str(model))[2] == {}  # the index names no audit: the file is not this record's
    result = cli("evaluate", model, *FAST, "--audit", "none")
    assert result.exit_code == 0, result.output
    assert not (model / "audit.json").exists()


def test_records_go_only_into_certify_zoo_outputs_or_out(demo_base, tmp_path):
    """A folder certify-zoo did not make (a user's checkpoint, a download) is never written to."""
    base = copy_of(demo_base, tmp_path, "users-own-model")
    before = sorted(p.name for p in base.iterdir())
    result = cli("evaluate", base, *FAST, "--sigma", "0.5")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in base.iterdir()) == before
    assert said(result, "records not written") and said(result, "--out DIR")

    out = tmp_path / "records"
    result = cli("evaluate", base, *FAST, "--sigma", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in base.iterdir()) == before
    record = json.loads((out / "certification.json").read_text())
    assert record["files"] == ["certification.json", "per_image.json"] and record["num_images"] == 16


def test_monte_carlo_on_a_cpu_forwards_the_noisy_batch_of_the_cpu_rule(short_conversion, tmp_path, monkeypatch):
    """On a CPU the noisy batch fits the CPU's input budget (benchmarks/noisy_batch.py), not a GPU's 224 px memory."""
    from certify_zoo.certificates import Smooth, noisy_batch_size
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    chunks, sample_noise = [], Smooth.sample_noise

    def recording(self, images, num, batch_size, *args, **kwargs):
        chunks.append(batch_size)
        return sample_noise(self, images, num, batch_size, *args, **kwargs)

    monkeypatch.setattr(Smooth, "sample_noise", recording)
    model = copy_of(short_conversion, tmp_path)
    evaluate(EvaluateSettings(model=str(model), data="demo", method="monte-carlo", n=16, n0=4, max_images=8,
                              batch_size=8))
    cpu, gpu = noisy_batch_size(8, (3, 8, 8), "cpu"), noisy_batch_size(8, (3, 8, 8), "cuda")
    assert cpu != gpu and chunks and set(chunks) == {cpu}


def test_the_deterministic_forward_in_pieces_gives_the_whole_batchs_radii(short_conversion, tmp_path, monkeypatch):
    """On a CPU the one-pass certificate forwards a batch in pieces of the CPU's size: the same radii as one forward."""
    import torch

    import certify_zoo.evaluation as evaluate_module
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    model = copy_of(short_conversion, tmp_path)
    settings = EvaluateSettings(model=str(model), data="demo", method="deterministic", max_images=24, batch_size=12,
                                write=False)
    whole = evaluate(settings).per_image
    monkeypatch.setattr(evaluate_module, "noisy_batch_size", lambda *_: 5)  # 12 images: pieces of 5, 5 and 2
    pieces = evaluate(settings).per_image
    assert len(whole["radius"]) == 24 and torch.equal(pieces["prediction"], whole["prediction"])
    torch.testing.assert_close(pieces["radius"], whole["radius"], rtol=1e-5, atol=1e-6)  # kernels may block otherwise


def test_the_plan_checks_every_deterministic_number_by_default_and_certifies_other_models_by_monte_carlo():
    """A converted model: deterministic radii on every image, PGD and a quick Monte-Carlo (n CHECK_N) on ~100 of
    them, its stored calibration applied; --method or --audit override; a model certify-zoo did not convert:
    Monte-Carlo (n FULL_N) on every image, no audit."""
    from certify_zoo.certificates import Calibration
    from certify_zoo.evaluation import CHECK_N, FULL_N, EvaluateSettings, plan_evaluation

    converted = {"sigma": 0.25, "calibration": {"kappa": 0.5, "temperature": 1.0, "images": 50}}
    default = plan_evaluation(EvaluateSettings("m", "demo"), converted, 1000)
    assert (default.method, default.sampled_audit, default.checks, default.want_mc) == ("deterministic", True,
                                                                                       True, True)
    assert default.mc_n == CHECK_N and default.check_fraction == 0.1 and default.pgd is not None
    assert default.calibration.kappa == 0.5
    assert plan_evaluation(EvaluateSettings("m", "demo"), converted, 40).check_fraction == 1.0
    raw = plan_evaluation(EvaluateSettings("m", "demo", calibrated=False), converted, 1000)
    assert raw.calibration == Calibration()
    full = plan_evaluation(EvaluateSettings("m", "demo", method="all", n=500), converted, 1000)
    assert (full.checks, full.want_mc, full.mc_n, full.sampled_audit) == (False, True, 500, True)
    unaudited = plan_evaluation(EvaluateSettings("m", "demo", audit="none"), converted, 1000)
    assert (unaudited.sampled_audit, unaudited.checks, unaudited.want_mc, unaudited.pgd) == (False, False, False,
                                                                                             None)
    foreign = plan_evaluation(EvaluateSettings("m", "demo"), {}, 1000)
    assert (foreign.method, foreign.want_mc, foreign.mc_n, foreign.pgd, foreign.check_fraction) == (
        "monte-carlo", True, FULL_N, None, 1.0)
