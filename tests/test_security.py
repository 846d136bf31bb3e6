"""Tokens never shown or written, Hub paths contained, checkpoints only unpickled when we signed them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from certify_zoo.cli import app
from certify_zoo.errors import CertifyZooError
from certify_zoo.export import write_json_atomic
from certify_zoo.security import contained_path, redact

TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
PACKAGE = Path(__file__).resolve().parents[1] / "certify_zoo"


def test_redact_known_and_recognisable_tokens(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-value-not-hf-shaped")
    text = (f"401 for https://user:{TOKEN}@huggingface.co/x?token=abc123 with Authorization: Bearer eyJhbGciOi.abc "
            "and s3cr3t-value-not-hf-shaped")
    clean = redact(text)
    for secret in (TOKEN, "abc123", "eyJhbGciOi", "s3cr3t-value-not-hf-shaped"):
        assert secret not in clean
    assert "huggingface.co/x" in clean and "hf_hub_download" == redact("hf_hub_download")


def test_cli_error_never_prints_the_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = CliRunner().invoke(app, ["convert", f"./{TOKEN}", "--data", "demo", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert TOKEN not in result.stderr + result.stdout


def test_records_never_contain_the_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    write_json_atomic(tmp_path / "certify_zoo.json", {"data": f"https://me:{TOKEN}@host/set", "notes": [TOKEN]})
    text = (tmp_path / "certify_zoo.json").read_text()
    assert TOKEN not in text and json.loads(text)["data"] == "https://***@host/set"


@pytest.mark.parametrize("bad", ["../evil.py", "a/../../evil", "/etc/passwd", "C:\\evil.dll", "..\\evil", "",
                                 "ok\x00.safetensors"])
def test_hub_paths_cannot_escape_the_output_folder(tmp_path, bad):
    with pytest.raises(CertifyZooError, match="would escape"):
        contained_path(tmp_path, bad)


def test_hub_paths_through_symlinks_are_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    with pytest.raises(CertifyZooError, match="symbolic link"):
        contained_path(tmp_path / "out", "link/evil.py")
    assert contained_path(tmp_path / "out", "sub/model.safetensors") == tmp_path / "out" / "sub" / "model.safetensors"


def test_foreign_checkpoint_is_refused_before_unpickling(tmp_path, monkeypatch):
    """A checkpoint whose manifest another key signed (copied from elsewhere, or forged) is never loaded."""
    from certify_zoo.checkpoints import checkpoint_problem, write_manifest

    checkpoint = tmp_path / "step-00000004"
    checkpoint.mkdir()
    (checkpoint / "optimizer.bin").write_bytes(b"pretend pickle")
    monkeypatch.setenv("CERTIFY_ZOO_CACHE", str(tmp_path / "someone-else"))
    write_manifest(checkpoint, 4)
    monkeypatch.setenv("CERTIFY_ZOO_CACHE", str(tmp_path / "me"))
    with pytest.raises(CertifyZooError, match="not written by certify-zoo on this account"):
        checkpoint_problem(checkpoint)
    assert oct((tmp_path / "me" / "checkpoint.key").stat().st_mode & 0o777) == "0o600"


def test_sources_never_unpickle_or_trust_remote_code():
    """Guard for every module, including ones added later: no bare torch.load/pickle, no remote code by default."""
    offences = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        for line_number, line in enumerate(source.splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"torch\.load\(", code) and "weights_only=True" not in code:
                offences.append(f"{path.name}:{line_number} torch.load without weights_only=True")
            if re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(", code):
                offences.append(f"{path.name}:{line_number} unpickles")
            if re.search(r"trust_remote_code\s*=\s*True", code):
                offences.append(f"{path.name}:{line_number} trust_remote_code=True")
    assert not offences, offences
