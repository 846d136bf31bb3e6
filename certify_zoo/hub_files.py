"""Fetching model files from the Hugging Face Hub: config first, then safetensors weights, never pickles.

huggingface_hub does the work, so HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE, HF_TOKEN and ``revision`` are
honoured exactly as in timm and transformers. Every failure becomes a one-line CertifyZooError.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CertifyZooError

CONFIG_NAME = "config.json"
# What we download beside the config: json (configs, processor, shard index) and safetensors weights only.
SAFE_PATTERNS = ["*.json", "*.safetensors"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: huggingface_hub reads only its cache and never tries the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_errors(repo_id: str, filename: str):
    """Map huggingface_hub's exceptions to one-line messages naming the fix."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    def translate(exc: Exception) -> CertifyZooError:
        if isinstance(exc, GatedRepoError):
            return CertifyZooError(f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN")
        if isinstance(exc, RepositoryNotFoundError):
            return CertifyZooError(f"Hub repo {repo_id} not found (or private: set HF_TOKEN)")
        if isinstance(exc, RevisionNotFoundError):
            return CertifyZooError(f"{repo_id} has no such revision: check --revision")
        if isinstance(exc, LocalEntryNotFoundError):  # a subclass of EntryNotFoundError: test it first
            return CertifyZooError(f"cannot get {repo_id}/{filename}: offline (HF_HUB_OFFLINE or no network) and not "
                                   "in the Hugging Face cache: connect, or pass a local model folder")
        if isinstance(exc, EntryNotFoundError):
            return CertifyZooError(f"{repo_id} has no {filename}")
        return CertifyZooError(f"cannot download {repo_id}/{filename}: {exc.__class__.__name__}")

    return translate


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file of a Hub repo, from the cache or the network."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except (OSError, ValueError) as exc:  # huggingface_hub's errors derive from OSError / HTTP errors
        raise _hub_errors(repo_id, filename)(exc) from exc


def hub_config(repo_id: str, revision: str | None = None) -> dict:
    """The repo's config.json, which says whether it is a timm or a transformers model."""
    path = hub_file(repo_id, CONFIG_NAME, revision)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CertifyZooError(f"{repo_id}/{CONFIG_NAME} is not valid json") from exc


def _remote_files(repo_id: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi

    try:
        return HfApi().list_repo_files(repo_id, revision=revision)
    except Exception:  # listing is only for a better message; the download error stands otherwise
        return []


def hub_snapshot(repo_id: str, revision: str | None = None, with_code: bool = False) -> Path:
    """A local folder with the repo's json files and safetensors weights; a repo with only pickles is refused.

    ``with_code`` adds the repo's Python files, needed only when the user passed --trust-remote-code.
    """
    from huggingface_hub import snapshot_download

    patterns = SAFE_PATTERNS + (["*.py"] if with_code else [])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (OSError, ValueError) as exc:
        raise _hub_errors(repo_id, "(snapshot)")(exc) from exc
    if any(folder.glob("*.safetensors")):
        return folder
    # Offline the snapshot folder is all we know; online the repo listing says what else is there.
    names = [p.name for p in folder.iterdir()] + ([] if hub_offline() else _remote_files(repo_id, revision))
    pickles = sorted({n for n in names if n.endswith(PICKLE_SUFFIXES)})
    if pickles:
        raise refuse_pickles(repo_id, pickles)
    raise CertifyZooError(f"{repo_id} has no safetensors weights: certify-zoo reads model.safetensors only")


def refuse_pickles(where: str, pickles: list[str]) -> CertifyZooError:
    return CertifyZooError(f"{where} has only pickle weights ({', '.join(pickles[:3])}): certify-zoo never unpickles "
                           "(unpickling can run arbitrary code); convert them to safetensors first")
