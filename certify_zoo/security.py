"""Security at the edges: no token in any message or record, no path that escapes its folder, no foreign pickle.

- ``redact`` / ``scrub``: every error line and every json record passes through them, so a Hugging Face token
  (from the environment, the token file, or pasted into a URL) is replaced by ``***`` before it is shown or written.
- ``contained_path``: the one place a relative path from outside (a Hub repo's file list) becomes a local path;
  absolute paths, ``..``, drive letters and symlinks that point outside the folder are refused.
- ``sign`` / ``verify``: an HMAC with a per-user secret key, so a checkpoint is only ever unpickled (accelerate's
  optimizer and RNG state) when certify-zoo itself wrote it on this account.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import CertifyZooError, disk_errors

TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN")
MASK = "***"
# hf_ user/org tokens, "Bearer <x>" headers, user:password@ in URLs, token=/api_key= query parameters
_TOKEN_PATTERNS = (
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_" + MASK),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._\-]{8,}"), r"\1" + MASK),
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), r"\1" + MASK + "@"),
    (re.compile(r"(?i)\b((?:access_)?token|api_key|apikey|password)=([^&\s\"']+)"), r"\1=" + MASK),
)
KEY_FILE = "checkpoint.key"


def _known_tokens() -> list[str]:
    tokens = [os.environ[name] for name in TOKEN_ENV_VARS if os.environ.get(name)]
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    token_file = Path(os.environ.get("HF_TOKEN_PATH", home / "token"))
    try:
        tokens.append(token_file.read_text().strip())
    except OSError:
        pass
    return [token for token in tokens if len(token) >= 4]


def redact(text: str) -> str:
    """The text with every token we know of or recognise replaced by ***."""
    for token in _known_tokens():
        text = text.replace(token, MASK)
    for pattern, replacement in _TOKEN_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def scrub(record: Any) -> Any:
    """A json-like record with every string redacted (keys included); other values unchanged."""
    if isinstance(record, str):
        return redact(record)
    if isinstance(record, dict):
        return {scrub(key): scrub(value) for key, value in record.items()}
    if isinstance(record, (list, tuple)):
        return [scrub(value) for value in record]
    return record


def contained_path(root: Path, relative: str, source: str = "the Hub") -> Path:
    """root / relative, refusing any path from `source` that would land outside root."""
    root = Path(root)
    problem = None
    if not relative or "\x00" in relative:
        problem = "is empty or contains a NUL byte"
    else:
        posix = PurePosixPath(relative.replace("\\", "/"))
        if posix.is_absolute() or PureWindowsPath(relative).drive:
            problem = "is absolute"
        elif any(part == ".." for part in posix.parts):
            problem = "contains '..'"
    if problem is None:
        target = root / posix
        resolved_root = root.resolve()
        if not target.resolve().is_relative_to(resolved_root):
            problem = "leads outside the folder through a symbolic link"
    if problem is not None:
        raise CertifyZooError(f"refusing file path {relative!r} from {source}: it {problem} and would escape "
                              f"{root}; the repository is malformed or malicious")
    return target


# ---------------------------------------------------------------- checkpoint signatures

CACHE_VARIABLE = "CERTIFY_ZOO_CACHE"


def cache_root() -> Path:
    """certify-zoo's own cache (the demo's digits, this key, the folder locks): $CERTIFY_ZOO_CACHE, by default
    ~/.cache/certify-zoo."""
    return Path(os.environ.get(CACHE_VARIABLE, Path.home() / ".cache" / "certify-zoo"))


def key_path() -> Path:
    """This account's signing key: $CERTIFY_ZOO_CACHE/checkpoint.key."""
    return cache_root() / KEY_FILE


def checkpoint_key() -> bytes:
    """This account's secret for signing checkpoints, created on first use (mode 600)."""
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise CertifyZooError(f"{path} is damaged: delete it (checkpoints signed with it can then not be resumed)") \
            from exc
    key = secrets.token_bytes(32)
    with disk_errors(f"the key that signs checkpoints, {path}", f", or set {CACHE_VARIABLE} to a folder that can be "
                                                                 "written"):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race: use its key
            return bytes.fromhex(path.read_text().strip())
        try:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(key.hex())
        except BaseException:  # half a key would be 'damaged' at the next run
            path.unlink(missing_ok=True)
            raise
    return key


def sign(payload: bytes) -> str:
    return hmac.new(checkpoint_key(), payload, hashlib.sha256).hexdigest()


def verify(payload: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(payload), signature)
