"""Bad input ends in one line on stderr, a non-zero exit, no traceback, and nothing changed on disk."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import error_line, run_cli


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    line = error_line(result.stderr)
    for needle in needles:
        assert needle in line


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_unknown_model_name_suggests_close_matches(tmp_path, demo_data):
    result = run_cli("convert", "resnet5O", "--data", "demo", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "unknown model", "resnet50")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make_data", ["missing", "empty", "no-images"])
def test_missing_or_empty_data_folder(tmp_path, demo_base, make_data):
    data = tmp_path / "data"
    if make_data != "missing":
        data.mkdir()
    if make_data == "no-images":
        (data / "notes.txt").write_text("not an image")
    result = run_cli("convert", str(demo_base), "--data", str(data), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, str(data))


@pytest.mark.parametrize("make_data", ["missing", "no-images"])
def test_missing_check_data(tmp_path, demo_base, make_data):
    check = tmp_path / "check"
    if make_data == "no-images":
        check.mkdir()
        (check / "notes.txt").write_text("not an image")
    result = run_cli("convert", str(demo_base), "--data", "demo", "--check-data", str(check), "--out",
                     str(tmp_path / "o"))
    assert_one_line_error(result, str(check))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sigma", ["0", "-0.5", "2.5"])
def test_sigma_out_of_range(tmp_path, demo_base, sigma):
    result = run_cli("convert", str(demo_base), "--data", "demo", "--out", str(tmp_path / "o"), "--sigma", sigma)
    assert_one_line_error(result, "--sigma")


@pytest.mark.parametrize("option, value, message", [
    ("--agreement-floor", "-0.1", "--agreement-floor must be in [0, 1]"),
    ("--agreement-floor", "1.5", "--agreement-floor must be in [0, 1]"),
                                                     ("--max-lr-scale", "0.5", "--max-lr-scale must be at least 1")])
def test_controller_setting_out_of_range(tmp_path, demo_base, option, value, message):
    result = run_cli("convert", str(demo_base), "--data", "demo", "--out", str(tmp_path / "o"), option, value)
    assert_one_line_error(result, message, value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["agreement_floor", "max_lr_scale"])
def test_controller_help_states_the_default_the_conversion_uses(name):
    import typer

    from certify_zoo.cli import app
    from certify_zoo.conversion import ConvertSettings

    convert = typer.main.get_command(app).commands["convert"]
    (option,) = [param for param in convert.params if param.name == name]
    assert option.help.endswith(f"Default: {getattr(ConvertSettings, name):g}.")


def test_existing_output_folder_is_left_untouched(tmp_path, demo_base):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = snapshot(out)
    result = run_cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--max-steps", "1")
    assert_one_line_error(result, "already exists", "--overwrite")
    assert snapshot(out) == before


def test_evaluate_bad_radii_and_model_without_sigma(demo_base):
    assert_one_line_error(run_cli("evaluate", str(demo_base), "--data", "demo", "--radii", "0.5,0.25"), "--radii")
    assert_one_line_error(run_cli("evaluate", str(demo_base), "--data", "demo", "--radii", "-1,0"), "--radii")
    assert_one_line_error(run_cli("evaluate", str(demo_base), "--data", "demo"), "--sigma")
