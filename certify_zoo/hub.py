"""Publishing and fetching certified models on the Hugging Face Hub: push, download, and MODEL specs that name a repo.

The token comes from huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``); certify-zoo never reads,
prints or writes it. Every Hub failure becomes one CertifyZooError line that says what to do, and a failed push
leaves the local folder exactly as it was (the card for the repo is rendered into a staging copy). What is pushed
names no local path: the json records are uploaded as ``public.public_records`` rewrites them.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .card import CARD_NAME, write_card
from .errors import CertifyZooError
from .export import METADATA_NAME, write_json_atomic
from .hub_files import hub_offline
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


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of whichever HTTP client this huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextmanager
def hub_errors(action: str, repo_id: str, unchanged: Path | None = None):
    """Translate huggingface_hub and network failures into one line naming the problem and the fix."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    kept = f"; {unchanged} is unchanged" if unchanged is not None else ""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings would break the one-line error; the outcome is ours
    try:
        yield
    except CertifyZooError:
        raise
    except OfflineModeIsEnabled as exc:
        raise CertifyZooError(f"cannot {action} {repo_id}: HF_HUB_OFFLINE is set (unset it to reach the Hub){kept}") from exc
    except GatedRepoError as exc:
        raise CertifyZooError(f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN{kept}") from exc
    except RevisionNotFoundError as exc:
        raise CertifyZooError(f"{repo_id} has no such revision: check --revision{kept}") from exc
    except RepositoryNotFoundError as exc:
        raise CertifyZooError(f"Hub repo {repo_id} not found, or private and your token cannot read it "
                              f"(check the name; set HF_TOKEN or run `hf auth login`){kept}") from exc
    except LocalEntryNotFoundError as exc:
        if hub_offline():  # huggingface_hub did not try the network: saying it was unreachable would send users after it
            raise CertifyZooError(f"cannot {action} {repo_id}: HF_HUB_OFFLINE is set and the files are not in the "
                                  f"Hugging Face cache (unset it to download them){kept}") from exc
        raise CertifyZooError(f"cannot {action} {repo_id}: the Hub at {_endpoint()} is unreachable and the files are "
                              f"not in the Hugging Face cache (connect, or check HF_ENDPOINT){kept}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise CertifyZooError(f"the Hub rejected your token (401) while trying to {action} {repo_id}: run "
                                  f"`hf auth login` or set HF_TOKEN to a token with write access{kept}") from exc
        if status == 403:
            raise CertifyZooError(f"no permission to {action} {repo_id} (403): use a namespace you can write to "
                                  f"or a token with write access to it{kept}") from exc
        raise CertifyZooError(f"the Hub refused to {action} {repo_id} (HTTP {status}): "
                              f"{_first_line(exc.server_message or str(exc))}{kept}") from exc
    except _transport_errors() as exc:
        raise CertifyZooError(f"cannot reach the Hub at {_endpoint()} to {action} {repo_id} "
                              f"({type(exc).__name__}): check your network or HF_ENDPOINT{kept}") from exc
    finally:
        hub_logger.setLevel(level)


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "no details"


def publishable_files(folder: Path) -> list[Path]:
    """The top-level files of an output that belong on the Hub (never checkpoints, caches or pickles)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix in PUBLISHED_SUFFIXES)


def _check_output(folder: Path) -> None:
    if not folder.is_dir():
        raise CertifyZooError(f"{folder} is not a folder: pass a certify-zoo output folder")
    missing = [name for name in ("config.json", METADATA_NAME) if not (folder / name).is_file()]
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
        raise CertifyZooError(f"{repo_id!r} is not a Hub repo id: use NAMESPACE/NAME")
    if create_pr and revision not in (None, "main"):
        raise CertifyZooError("a pull request (--create-pr) is opened against main: drop --revision")
    files = publishable_files(folder)
    records = public_records(folder, repo_id)  # the json files without this machine's local paths
    with tempfile.TemporaryDirectory(prefix=".certify-zoo-push-") as staging_root:
        staging = Path(staging_root)
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
    from huggingface_hub import snapshot_download

    repo_id = repo_id.removeprefix("hf-hub:")
    patterns = DOWNLOAD_PATTERNS + (["*.py"] if with_code else [])
    with hub_errors("download", repo_id):
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      local_dir=str(local_dir) if local_dir is not None else None, token=token))
    if not any(path.glob("*.safetensors")):
        raise CertifyZooError(f"{repo_id} has no safetensors weights: certify-zoo never loads pickle files")
    return path


def download(repo_id: str, out: Path | None = None, revision: str | None = None, token: str | None = None,
             with_code: bool = False) -> Path:
    """``certify-zoo download``: into OUT (new or empty, never overwritten) or the Hugging Face cache."""
    if out is not None:
        out = Path(out).expanduser()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CertifyZooError(f"{out} already exists and is not empty: choose a new or empty --out")
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            return snapshot(repo_id, revision, local_dir=out, token=token, with_code=with_code)
        except BaseException:
            # leave nothing half-made behind: the folder if we made it, else only what the download added
            for path in ([out] if created else list(out.iterdir())):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
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
