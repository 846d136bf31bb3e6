"""The demo's output folder and Hub repos that need their own code: replaced or refused, never half-done."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import error_line


def cli(*args, env: dict | None = None):
    from certify_zoo.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def test_demo_replaces_its_own_earlier_output_and_refuses_any_other_folder_even_with_overwrite(tmp_path):
    from certify_zoo.demo import DEMO_MARKER, prepare_demo_folder
    from certify_zoo.errors import CertifyZooError

    out = prepare_demo_folder(tmp_path / "certify-zoo-demo")  # what a first `certify-zoo demo` starts with
    assert json.loads((out / DEMO_MARKER).read_text())["made_by"] == "certify-zoo demo"
    (out / "base").mkdir()
    (out / "base" / "model.safetensors").write_bytes(b"weights of the first demo")
    again = prepare_demo_folder(out)  # the second demo into the same folder: no --overwrite needed
    assert sorted(p.name for p in again.iterdir()) == [DEMO_MARKER]

    mine = tmp_path / "my-experiments"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CertifyZooError, match="--overwrite"):
        prepare_demo_folder(mine)
    (mine / DEMO_MARKER).write_text("not json")  # a file of that name is not the marker
    with pytest.raises(CertifyZooError, match="--overwrite"):
        prepare_demo_folder(mine)
    (mine / DEMO_MARKER).unlink()
    with pytest.raises(CertifyZooError, match="not made by certify-zoo"):  # --overwrite deletes none of your files
        prepare_demo_folder(mine, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_demo_command_refuses_a_folder_it_did_not_make_in_one_line(tmp_path):
    mine = tmp_path / "my-experiments"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = cli("demo", "--out", mine)
    assert result.exit_code == 2, result.output
    assert "--overwrite" in error_line(result.stderr)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_stopped_demo_says_to_run_it_again_not_to_resume(demo_base, tmp_path, monkeypatch):
    """SIGTERM or Ctrl-C during the demo's conversion said 'rerun the same command with --resume', an option the
    demo does not have (the next demo into the folder replaces it)."""
    import shutil

    import certify_zoo.conversion as convert_module
    import certify_zoo.demo as demo_module
    from conftest import sigterm_at_call

    monkeypatch.setattr(demo_module, "train_demo_base", lambda folder, seed: shutil.copytree(demo_base, folder))
    monkeypatch.setattr(convert_module, "boot_camp_step", sigterm_at_call(convert_module.boot_camp_step, 2))
    result = cli("demo", "--out", tmp_path / "d")
    assert result.exit_code == 130, result.output
    line = error_line(result.stderr)
    assert line.startswith("Error: stopped by SIGTERM at step 2 of ") and line.endswith(
        ", in the demo: run it again (it starts over; the demo has no --resume)"), line


MODELING_FANCY = '''
from transformers import ViTConfig, ViTForImageClassification


class FancyConfig(ViTConfig):
    model_type = "fancy"


class FancyForImageClassification(ViTForImageClassification):
    config_class = FancyConfig
'''

UPLOAD = '''
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(sys.argv[1], exist_ok=True)
api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2])
'''


@pytest.fixture(scope="module")
def hub():
    from hub_server import TestHub

    server = TestHub({"hf_testtoken_alice_9f8e7d6c5b4a": "alice"})
    yield server
    server.close()


def hub_env(hub, tmp_path) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_testtoken_alice_9f8e7d6c5b4a",
            "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"}


def test_hub_repo_with_its_own_code_is_evaluated_with_trust_remote_code(hub, tmp_path):
    """The repo's model class lives in the repo (auto_map): refused without the flag, evaluated with it."""
    import subprocess
    import sys

    from conftest import REPO, run_cli
    from tiny_sources import save_transformers

    repo = save_transformers(tmp_path / "fancy", "hf-vit")
    config = json.loads((repo / "config.json").read_text())
    config.update(model_type="fancy", architectures=["FancyForImageClassification"],
                  auto_map={"AutoConfig": "modeling_fancy.FancyConfig",
                            "AutoModelForImageClassification": "modeling_fancy.FancyForImageClassification"})
    (repo / "config.json").write_text(json.dumps(config))
    (repo / "modeling_fancy.py").write_text(MODELING_FANCY)
    env = hub_env(hub, tmp_path)
    import os

    uploaded = subprocess.run([sys.executable, "-c", UPLOAD, "alice/fancy", str(repo)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=300)
    assert uploaded.returncode == 0, uploaded.stderr

    args = ("evaluate", "alice/fancy", "--data", "demo", "--sigma", "0.5", "--max-images", "8", "--batch-size", "8",
            "--method", "deterministic")
    refused = run_cli(*args, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "--trust-remote-code" in error_line(refused.stderr)

    out = tmp_path / "records"
    trusted = run_cli(*args, "--trust-remote-code", "--out", str(out), env=env)
    assert trusted.returncode == 0, trusted.stderr
    record = json.loads((out / "certification.json").read_text())
    assert record["num_images"] == 8 and record["space"] == "[0,1] pixels at 3x32x32"
