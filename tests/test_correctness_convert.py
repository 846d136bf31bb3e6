"""Conversion paths that must give a right answer or one clear line: precision, out of memory, resume elsewhere."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner


def cli(*args):
    from certify_zoo.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, exit_code: int, *fragments: str) -> str:
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_is_refused_while_the_penalty_is_on(demo_base, tmp_path, precision):
    """A bf16 logit near 10 is rounded by 0.06, the size of the finite difference the penalty divides by h."""
    result = cli("convert", demo_base, "--data", "demo", "--recipe", "demo", "--out", tmp_path / "out",
                 "--precision", precision, "--max-steps", "1", "--batch-size", "8")
    assert_one_line_error(result, 2, f"--precision {precision}", "float32", "--precision no", "--gamma 0")
    assert not (tmp_path / "out").exists()


def test_half_precision_allowed_without_penalty_and_records_say_float32(short_conversion, demo_base):
    from certify_zoo.convert import ConvertSettings
    from certify_zoo.recipes import load_recipe

    ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out="unused",
                                precision="bf16", gamma=0.0).validate()  # no penalty: nothing to refuse
    settings = json.loads((Path(short_conversion) / "certify_zoo.json").read_text())["settings"]
    assert settings["precision"] == "no" and settings["objective"]["penalty_precision"] == "float32"
