"""convert and evaluate --deterministic: only deterministic kernels, one line for an op without one, the caller's
state restored."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from certify_zoo.errors import CertifyZooError
from certify_zoo.guards import deterministic_algorithms
from conftest import REPO


def _put_without_accumulate() -> None:
    # an op torch has no deterministic kernel for, on the CPU too: what a model with such an op meets
    torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]), accumulate=False)


def test_the_switch_holds_inside_names_the_op_and_is_restored_after():
    assert not torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark == benchmark
    with pytest.raises(CertifyZooError) as caught, deterministic_algorithms(True):
        _put_without_accumulate()
    message = str(caught.value)
    assert message.startswith("--deterministic: put_ does not have a deterministic implementation")
    assert "\n" not in message and "without --deterministic" in message
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the error too
    with pytest.raises(RuntimeError, match="unrelated"), deterministic_algorithms(True):
        raise RuntimeError("unrelated")  # other errors pass through as they are
    with pytest.raises(CertifyZooError, match="set CUBLAS_WORKSPACE_CONFIG=:4096:8 before Python starts"), \
            deterministic_algorithms(True):  # torch's refusal of a cuBLAS started too early (CUDA only), as worded
        raise RuntimeError("Deterministic behavior was enabled with either `torch.use_deterministic_algorithms(True)` "
                           "or `at::Context::setDeterministicAlgorithms(true)`, but this operation is not "
                           "deterministic because it uses CuBLAS and you have CUDA >= 10.2. To enable deterministic "
                           "behavior in this case, you must set an environment variable before running your PyTorch "
                           "application: CUBLAS_WORKSPACE_CONFIG=:4096:8 or CUBLAS_WORKSPACE_CONFIG=:16:8.")
    with deterministic_algorithms(False):
        _put_without_accumulate()  # off: nothing changes
    with pytest.raises(CertifyZooError, match=r"\): evaluate without --deterministic"), \
            deterministic_algorithms(True, "evaluate"):
        _put_without_accumulate()


def test_a_deterministic_evaluation_records_the_setting_and_certifies_as_the_default_on_the_cpu(demo_base, tmp_path):
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    run = dict(model=str(demo_base), data="demo", sigma=0.5, method="all", n=100, n0=10, max_images=32,
               batch_size=16, audit="pgd", audit_steps=5, audit_restarts=1)
    default = evaluate(EvaluateSettings(**run, out=str(tmp_path / "default")))
    pinned = evaluate(EvaluateSettings(**run, out=str(tmp_path / "pinned"), deterministic=True))
    assert not torch.are_deterministic_algorithms_enabled()
    assert default.record["deterministic_algorithms"] is False and pinned.record["deterministic_algorithms"] is True
    assert pinned.record["certificates"] == default.record["certificates"]
    assert all(torch.equal(pinned.per_image[key].nan_to_num(-1), value.nan_to_num(-1))
               for key, value in default.per_image.items())


def test_a_deterministic_conversion_records_the_setting_and_leaves_the_process_as_found(demo_base, tmp_path):
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    out = tmp_path / "out"
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                        max_steps=2, deterministic=True))
    metadata = json.loads((out / "certify_zoo.json").read_text())
    assert metadata["settings"]["deterministic"] is True
    assert metadata["self_check_seconds"] > 0 and metadata["held_out_images"] > 0  # timed apart from the steps
    assert "deterministic" in (out / "README.md").read_text()
    assert not torch.are_deterministic_algorithms_enabled()


def test_twin_conversions_through_the_command_line_are_identical_on_the_cpu_with_and_without(tmp_path):
    """benchmarks/determinism.py --dry-run: the real CLI four times; the CPU's kernels are deterministic either way
    (what --help says), so both pairs of twins agree exactly; on a GPU only the --deterministic pair does."""
    out = tmp_path / "determinism.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "determinism.py"), "--dry-run", "--models",
                           "vit_tiny_patch16_224", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    model, = json.loads(out.read_text())["models"]
    assert [run["deterministic"] for run in model["runs"]] == [True, False, False, True]
    assert all("error" not in run and run["seconds"] > 0 for run in model["runs"])
    assert model["deterministic"]["max_abs_weight_difference"] == 0 == model["default"]["max_abs_weight_difference"]
    assert json.loads(out.read_text())["table"]["rows"] == [["vit_tiny_patch16_224", "0 (identical)",
                                                            "0 (identical)", f"{model['seconds_ratio']:.2f}x"]]


def test_twin_evaluations_of_the_benchmark_agree_exactly_on_the_cpu_with_and_without(tmp_path):
    """benchmarks/determinism.py --evaluate --dry-run: four evaluations with Monte-Carlo and a PGD audit of every
    image (filed under the class the model predicts); on the CPU every twin's per-image rows are equal."""
    out = tmp_path / "determinism.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "determinism.py"), "--dry-run", "--evaluate",
                           "--models", "vit_tiny_patch16_224", "--json", str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    model, = json.loads(out.read_text())["evaluations"]
    assert [run["deterministic"] for run in model["runs"]] == [True, False, False, True]
    assert all(run["attacked"] == 8 for run in model["runs"])  # every image's gradients taken by the audit
    for setting in ("default", "deterministic"):
        assert model[setting]["differing_images"] == 0 == model[setting]["max_radius_difference"]
        assert model[setting]["images"] == 8
    assert json.loads(out.read_text())["evaluate_table"]["rows"][0][:3] == [
        "vit_tiny_patch16_224", "0 (identical)", "0 (identical)"]
