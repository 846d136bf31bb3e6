"""Files from the Hugging Face Hub: a model's config and safetensors weights, a repo's snapshot; never pickles.

huggingface_hub does the work, so HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE, HF_TOKEN and ``revision`` are
honoured exactly as in timm and transformers. Every failure becomes a one-line CertifyZooError (``hub_errors``,
which push and download in hub.py use as well).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import CertifyZooError, disk_error_reason, disk_remedy, is_main_process

CONFIG_NAME = "config.json"
# What we download beside the config: json (configs, processor, shard index) and safetensors weights only.
SAFE_PATTERNS = ["*.json", "*.safetensors"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: huggingface_hub reads only its cache and never tries the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


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


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class HubUnreachable(Exception):
    """The Hub's endpoint cannot answer, for a reason no retry fixes (raised before a download; ``hub_errors`` words
    it with ``reason``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


CONNECT_SECONDS = 2.0  # the probe's wait for a connection; a slower endpoint is left to huggingface_hub's retries


def why_unreachable() -> str | None:
    """Why the Hub's endpoint cannot answer, asked before a download; None where it may (the request decides).

    huggingface_hub retries a file missing from its cache for ~23 s on any connection error, also on a host name no
    DNS knows or a port where nothing listens, which no retry fixes: asked first, an offline machine or a dead
    endpoint (a local mirror not started) answers at once. A timeout is left to the retries. A proxy connects for
    us, so behind one the answer is left to the request."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    parts = urlsplit(_endpoint())
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.getaddrinfo(host, port)
    except (socket.gaierror, UnicodeError):
        return "its host name does not resolve"
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except ConnectionRefusedError:
        return f"nothing accepts connections at {host}:{port}"
    except OSError:  # a timeout, no route: what the retries may see through
        pass
    return None


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "no details"


class RetryStatus(logging.Handler):
    """Takes huggingface_hub's warnings while it retries a request (1 + 2 + 4 + 8 + 8 s when the Hub does not
    answer) and prints none of them: the outcome is one line. On a terminal the first retry starts a spinner that
    says what is awaited, erased when the call ends, instead of half a minute of silence; a log file keeps the one
    line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reason: str | None = None  # the failure before the retry
        self.status = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not message.startswith(("Retrying in", "Rate limited")):
            self.reason = message.split(" thrown while requesting")[0].strip("'")  # the request's URL is long
            return
        if self.status is None and sys.stderr.isatty() and is_main_process():
            from rich.console import Console
            from rich.markup import escape

            from .security import redact

            why = f" ({escape(redact(self.reason))})" if self.reason else ""
            self.status = Console(stderr=True, emoji=False).status(
                f"the Hub at {escape(_endpoint())} does not answer{why}: huggingface_hub retries for up to half a "
                "minute")
            self.status.start()

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def not_a_repo_id(repo_id: str, kept: str = "") -> CertifyZooError:
    """The one line for a repo id the Hub refuses (push checks it itself; huggingface_hub before any request)."""
    return CertifyZooError(f"{repo_id!r} is not a Hub repo id (NAMESPACE/NAME of letters, digits, '-', '_' and "
                           f"'.'){kept}")


@contextmanager
def hub_errors(action: str, repo_id: str, unchanged: Path | None = None, filename: str | None = None,
               writing: Path | None = None):
    """Translate huggingface_hub and network failures into one line naming the problem and the fix.

    ``filename``: the one file being fetched (a model's config or weights), named in the message;
    ``unchanged``: a local folder the failure left as it was (a failed push), said so; ``writing``: the folder a
    download writes (named when its disk is full)."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    kept = f"; {unchanged} is unchanged" if unchanged is not None else ""
    target = f"{repo_id}/{filename}" if filename else repo_id
    absent = "it is not" if filename else "the files are not"
    local = ", or pass a local folder" if action == "get" else ""  # loading a model: a folder of it would do
    access = "write" if action.startswith("push") else "read"
    hub_logger = logging.getLogger("huggingface_hub")
    saved = hub_logger.level, hub_logger.handlers, hub_logger.propagate
    retries = RetryStatus()  # its retry warnings would break the one-line error; the outcome is ours
    hub_logger.handlers, hub_logger.propagate = [retries], False
    hub_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # one UserWarning per file, with its source line, before the write fails: the one line below says it
            warnings.filterwarnings("ignore", message="Not enough free disk space", category=UserWarning)
            yield
    except CertifyZooError:
        raise
    except HFValidationError as exc:  # checked before any request: its own words name the rule broken
        raise not_a_repo_id(repo_id, kept) from exc
    except OfflineModeIsEnabled as exc:
        raise CertifyZooError(f"cannot {action} {target}: HF_HUB_OFFLINE is set (unset it to reach the Hub)"
                              f"{kept}") from exc
    except GatedRepoError as exc:
        raise CertifyZooError(f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN{kept}") from exc
    except RevisionNotFoundError as exc:
        raise CertifyZooError(f"{repo_id} has no such revision: check --revision{kept}") from exc
    except RepositoryNotFoundError as exc:
        raise CertifyZooError(f"Hub repo {repo_id} not found, or private and your token cannot read it "
                              f"(check the name; set HF_TOKEN or run `hf auth login`){kept}") from exc
    except (LocalEntryNotFoundError, HubUnreachable) as exc:  # the first: a subclass of EntryNotFoundError
        # huggingface_hub did not try the network: saying it was unreachable would send users after it
        if hub_offline():
            raise CertifyZooError(f"cannot {action} {target}: HF_HUB_OFFLINE is set and {absent} in the "
                                  f"Hugging Face cache (unset it to download{local}){kept}") from exc
        why = f" ({exc.reason})" if isinstance(exc, HubUnreachable) else ""
        raise CertifyZooError(f"cannot {action} {target}: the Hub at {_endpoint()} is unreachable{why} and {absent} "
                              f"in the Hugging Face cache (connect, or check HF_ENDPOINT{local}){kept}") from exc
    except EntryNotFoundError as exc:
        raise CertifyZooError(f"{repo_id} has no {filename or 'such file'}{kept}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise CertifyZooError(f"the Hub rejected your token (401) while trying to {action} {target}: run "
                                  f"`hf auth login` or set HF_TOKEN to a token with {access} access{kept}") from exc
        if status == 403:
            fix = "use a namespace you can write to or a token with write access to it" if access == "write" else \
                "ask for access to the repo or use a token that can read it"
            raise CertifyZooError(f"no permission to {action} {target} (403): {fix}{kept}") from exc
        raise CertifyZooError(f"the Hub refused to {action} {target} (HTTP {status}): "
                              f"{_first_line(exc.server_message or str(exc))}{kept}") from exc
    except _transport_errors() as exc:
        raise CertifyZooError(f"cannot reach the Hub at {_endpoint()} to {action} {target} "
                              f"({type(exc).__name__}): check your network or HF_ENDPOINT{kept}") from exc
    except OSError as exc:  # the download's disk (the cache, --out) or a push's staging copy: full, read-only
        reason = disk_error_reason(exc)
        if reason is None:
            raise
        written = writing or (Path(exc.filename).parent if exc.filename else None)
        where = f" in {written}" if written is not None else ""
        elsewhere = {"push to": " (TMPDIR moves push's staging copy)",
                     "download": " (download --out DIR, or HF_HOME for the Hugging Face cache)"}.get(
            action, " (HF_HOME or HF_HUB_CACHE moves the Hugging Face cache)")
        raise CertifyZooError(f"cannot {action} {target}: {reason}{where}: {disk_remedy(reason)}, or write "
                              f"elsewhere{elsewhere}{kept}") from exc
    finally:
        retries.stop()
        hub_logger.handlers, hub_logger.propagate = saved[1], saved[2]
        hub_logger.setLevel(saved[0])


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file of a Hub repo, from the cache or the network."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    with hub_errors("get", repo_id, filename=filename):
        if not (hub_offline() or isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)):
            reason = why_unreachable()
            if reason is not None:
                raise HubUnreachable(reason)
        return Path(hf_hub_download(repo_id, filename, revision=revision))


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


def hub_snapshot(repo_id: str, revision: str | None = None, with_code: bool = False,
                 patterns: list[str] = SAFE_PATTERNS, local_dir: Path | None = None, token: str | None = None,
                 action: str = "get") -> Path:
    """A local folder with the repo's files that match ``patterns`` (never pickles); a repo without safetensors
    weights is refused, naming its pickles if it has some.

    ``with_code`` adds the repo's Python files, needed only when the user passed --trust-remote-code;
    ``local_dir``: download there instead of the Hugging Face cache.
    """
    from huggingface_hub import constants, snapshot_download

    repo_id = repo_id.removeprefix("hf-hub:")
    with hub_errors(action, repo_id, writing=local_dir if local_dir is not None else Path(constants.HF_HUB_CACHE)):
        folder = Path(snapshot_download(repo_id, revision=revision, token=token,
                                        allow_patterns=patterns + (["*.py"] if with_code else []),
                                        local_dir=str(local_dir) if local_dir is not None else None))
    # Offline the snapshot folder is all we know; online the repo listing says what else is there.
    require_safetensors(folder, repo_id, listed=lambda: [] if hub_offline() else _remote_files(repo_id, revision))
    return folder


def require_safetensors(folder: Path, where: str, listed: Callable[[], list[str]] = list) -> None:
    """Refuse a model without safetensors weights in one line, naming its pickle files when it has some: certify-zoo
    never unpickles. ``listed``: more file names to look at (a Hub repo's listing), asked only when needed."""
    if any(folder.glob("*.safetensors")):
        return
    names = [p.name for p in folder.iterdir()] + listed()
    pickles = sorted({n for n in names if n.endswith(PICKLE_SUFFIXES)})
    if pickles:
        raise CertifyZooError(f"{where} has only pickle weights ({', '.join(pickles[:3])}): certify-zoo never "
                              "unpickles (unpickling can run arbitrary code); convert them to safetensors first")
    raise CertifyZooError(f"{where} has no safetensors weights: certify-zoo reads safetensors weights only")
