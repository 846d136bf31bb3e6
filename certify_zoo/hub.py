"""Publishing and fetching certified models on the Hugging Face Hub: push, download, and MODEL specs that name a repo.

The token comes from huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``); certify-zoo never reads,
prints or writes it. Every Hub failure becomes one CertifyZooError line that says what to do, and a failed push
leaves the local folder exactly as it was (the card for the repo is rendered into a staging copy). What is pushed
names no local path: the json records are uploaded as ``public.public_records`` rewrites them.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .card import CARD_NAME, write_card
from .errors import CertifyZooError
from .export import (CHECKPOINTS_DIR, METADATA_NAME, RUN_RECORD, OutputLock, empty_folder, require_writable_folder,
                     write_json_atomic)
from .hub_files import hub_errors, hub_snapshot, not_a_repo_id
from .public import public_records

# What a certified model consists of: weights (safetensors only), configs, records, card, plot.
PUBLISHED_SUFFIXES = (".safetensors", ".json", ".png", ".md", ".txt")
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.png", "*.md", "*.txt"]
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit_url: str
    files: list[str]
    pr_url: str | None = None  # with create_pr: the pull request opened instead of a commit to the branch


def is_hub_repo_spec(spec: str) -> bool:
    """ORG/NAME or hf-hub:ORG/NAME that is not a local path nor a timm registry name (timm/NAME)."""
    if Path(spec).expanduser().exists():
        return False
    name = spec.removeprefix("hf-hub:")
    return bool(REPO_ID.match(name)) and (spec.startswith("hf-hub:") or not name.startswith("timm/"))


def publishable_files(folder: Path) -> list[Path]:
    """The top-level files of an output that belong on the Hub (never checkpoints, caches or pickles)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix in PUBLISHED_SUFFIXES)


def _check_output(folder: Path) -> None:
    if not folder.is_dir():
        raise CertifyZooError(f"{folder} is not a folder: pass a certify-zoo output folder")
    missing = [name for name in ("config.json", METADATA_NAME) if not (folder / name).is_file()]
    if METADATA_NAME in missing and (folder / CHECKPOINTS_DIR / RUN_RECORD).is_file():
        raise CertifyZooError(f"{folder} holds an unfinished conversion (its checkpoints, no converted model yet): "
                              "finish it with the same convert command and --resume, then push")
    if missing or not any(folder.glob("*.safetensors")):
        raise CertifyZooError(f"{folder} is not a complete certify-zoo output (missing "
                              f"{', '.join(missing) or 'safetensors weights'}): run convert first")


def push(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, create_pr: bool = False) -> PushResult:
    """Upload an output folder as one commit (weights, configs, records, plot, and a card written for this repo).

    ``token`` overrides huggingface_hub's own (HF_TOKEN, `hf auth login`); ``create_pr`` opens a pull request
    against main instead of committing to it, as `hf upload --create-pr` does."""
    from huggingface_hub import HfApi

    folder = Path(folder).expanduser()
    _check_output(folder)
    repo_id = repo_id.removeprefix("hf-hub:")
    if not REPO_ID.match(repo_id):
        raise not_a_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise CertifyZooError("a pull request (--create-pr) is opened against main: drop --revision")
    with tempfile.TemporaryDirectory(prefix=".certify-zoo-push-") as staging_root:
        staging = Path(staging_root)
        # The staging copy is taken under the folder's lock: a conversion replacing the folder or an evaluation
        # rewriting its records would otherwise publish half of each. The upload reads only the copy.
        with OutputLock() as folder_lock, hub_errors("push to", repo_id, unchanged=folder, writing=staging):
            folder_lock.acquire(folder)
            files = publishable_files(folder)
            records = public_records(folder, repo_id)  # the json files without this machine's local paths
            for path in files:  # a staging copy: the card names this repo, and the local folder stays untouched
                if path.name in records:
                    write_json_atomic(staging / path.name, records[path.name])
                elif path.name != CARD_NAME:
                    _link_or_copy(path, staging / path.name)
            write_card(folder, repo_id=repo_id, destination=staging / CARD_NAME)
        api = HfApi(token=token)
        with hub_errors("push to", repo_id, unchanged=folder):
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision, create_pr=create_pr,
                                       commit_message=commit_message or f"Upload certified model from {folder.name} "
                                                                        "with certify-zoo")
    url = str(repo_url) if revision in (None, "main") else f"{repo_url}/tree/{revision}"
    return PushResult(repo_id, url, commit.commit_url, sorted({p.name for p in files} | {CARD_NAME}),
                      commit.pr_url if create_pr else None)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # no copy of multi-GB weights; uploads only read
    except OSError:
        shutil.copy2(source, target)


def snapshot(repo_id: str, revision: str | None = None, local_dir: Path | None = None,
             token: str | None = None, with_code: bool = False) -> Path:
    """Download a certified model's files (safetensors, json, card, plot; never pickles) and return the folder.

    ``with_code`` adds the repo's Python files: only when the user passed --trust-remote-code."""
    return hub_snapshot(repo_id, revision, with_code, patterns=DOWNLOAD_PATTERNS, local_dir=local_dir, token=token,
                        action="download")


def download(repo_id: str, out: Path | None = None, revision: str | None = None, token: str | None = None,
             with_code: bool = False) -> Path:
    """``certify-zoo download``: into OUT (new or empty, never overwritten) or the Hugging Face cache."""
    if out is not None:
        out = Path(out).expanduser()
        if os.path.exists(out) and (not os.path.isdir(out) or any(out.iterdir())):  # see check_output_folder
            raise CertifyZooError(f"{out} already exists and is not empty: choose a new or empty --out")
        require_writable_folder(out, str(out), "choose another --out")
        created = not os.path.exists(out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            return snapshot(repo_id, revision, local_dir=out, token=token, with_code=with_code)
        except BaseException:
            # leave nothing half-made behind: the folder if we made it, else only what the download added
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                empty_folder(out, ignore_errors=True)
            raise
    return snapshot(repo_id, revision, token=token, with_code=with_code)


@contextmanager
def evaluation_folder(spec: str, revision: str | None = None, writable: bool = False, trust_remote_code: bool = False):
    """(folder, write records?) for ``evaluate MODEL``.

    A local spec is used as is. A Hub repo is read from the cache and its records are not written there, or, when
    the results must be pushed back (``writable``), evaluated in a temporary downloaded copy removed afterwards.
    Its Python files come along only with ``trust_remote_code`` (a repo whose model class is its own code).
    """
    if not is_hub_repo_spec(spec):
        yield spec, True
    elif not writable:
        yield str(snapshot(spec, revision, with_code=trust_remote_code)), False
    else:
        with tempfile.TemporaryDirectory(prefix="certify-zoo-evaluate-") as root:
            yield str(download(spec, Path(root) / "model", revision, with_code=trust_remote_code)), True
