"""The one exception a user can cause: the CLI prints its message on one line and exits non-zero."""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterable, Iterator

# what a write the file system refused means, for the one line that says so (disk_error_reason)
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EFBIG: "file too large for the file system"}
# how torch.save (RuntimeError) and safetensors (SafetensorError) word the errno they wrap: safetensors 0.6+ "(os
# error 27)", 0.4 Rust's debug form 'IoError(Os { code: 27, kind: FileTooLarge, ...'. On a full disk torch's zip
# writer often finds the short write itself, at the end of the file, with no errno ("[enforce fail at
# inline_container.cc:672] . unexpected pos 563072 vs 562964", measured on a full 1 MB tmpfs)
_WRAPPED_DISK_ERRORS = {"no space left": _DISK_ERRNOS[errno.ENOSPC], "errno 28": _DISK_ERRNOS[errno.ENOSPC],
                        "os error 28": _DISK_ERRNOS[errno.ENOSPC], "code: 28,": _DISK_ERRNOS[errno.ENOSPC],
                        "os error 27": _DISK_ERRNOS[errno.EFBIG], "code: 27,": _DISK_ERRNOS[errno.EFBIG],
                        "os error 122": _DISK_ERRNOS[errno.EDQUOT], "code: 122,": _DISK_ERRNOS[errno.EDQUOT],
                        "file write failed": "the file system took only part of a write (a full disk?)",
                        "unexpected pos": "the file system took only part of a write (a full disk?)"}


_NOT_WRITABLE = {_DISK_ERRNOS[errno.EROFS], _DISK_ERRNOS[errno.EACCES]}


def disk_remedy(reason: str) -> str:
    """The first thing to do about a write the file system refused for ``reason`` (disk_error_reason): room for a
    full disk, the right to write for a read-only or forbidden folder (a disk remounted read-only mid-run was told
    to free some space)."""
    return "make it writable" if reason in _NOT_WRITABLE else "free some space"


def disk_error_reason(exc: BaseException) -> str | None:
    """'no space left on the device' (and the like) when ``exc`` is a write the file system refused, else None."""
    if isinstance(exc, OSError):
        return _DISK_ERRNOS.get(exc.errno)
    text = str(exc).lower() if isinstance(exc, Exception) else ""
    return next((reason for marker, reason in _WRAPPED_DISK_ERRORS.items() if marker in text), None)


def os_error_line(exc: OSError) -> str | None:
    """What an OSError that no command caught means and what to do, by its errno, on one line (the CLI's last net:
    permissions, names too long, a full or read-only disk reach every command's files); None for others."""
    name = os.fsdecode(exc.filename) if exc.filename is not None else ""
    name = name if len(name) <= 160 else f"{name[:80]}...{name[-60:]}"  # a 300-character name hid what to do
    where = f" on {name}" if name else ""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}: change its permissions (or its folder's), or use another path"
    if exc.errno == errno.ENAMETOOLONG:
        return f"file name too long for the file system{where}: choose a shorter path (most take 255 bytes a name)"
    reason = disk_error_reason(exc)
    return f"cannot write{where.replace(' on ', ' ', 1)}: {reason}: {disk_remedy(reason)}" if reason else None


class CertifyZooError(Exception):
    """A problem with the user's input or environment; the message names it and what to do."""

    exit_code = 2
    raised_by_every_process = False  # set by alike_on_every_process()


class Interrupted(CertifyZooError):
    """A run stopped by a signal after keeping what it had done (continue it with --resume)."""

    exit_code = 3
    # Every process stops alike, so the main process alone says it: at a step or batch boundary they decide
    # together, and after a conversion's last step torchrun passes its signal to each (a signal that reached one
    # other process alone ends it, and torchrun then signals the main process, which says so).
    raised_by_every_process = True


class ConversionInterrupted(Interrupted):
    """A conversion stopped by a signal after saving a checkpoint (resume with --resume)."""


class RecordsNotWritten(CertifyZooError):
    """An evaluation that ran to the end but could not write its records (a full disk): ``record`` holds its numbers,
    which the CLI prints before the error, so that hours of certification are not lost with the files."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


class StoppedWithNothingKept(CertifyZooError):
    """A run stopped by a signal where nothing could be kept to resume from (exit 130, as Ctrl-C)."""

    exit_code = 130
    raised_by_every_process = True  # as Interrupted


@contextlib.contextmanager
def alike_on_every_process() -> Iterator[None]:
    """Mark a CertifyZooError raised inside as one every process of a multi-process run raises alike (it follows
    from the arguments and the shared files alone): the CLI prints it on the main process only, one line instead
    of one per process. An error only some processes meet (their shard's images, their memory) stays unmarked and
    is printed where it happens, since the main process may know nothing of it."""
    try:
        yield
    except CertifyZooError as exc:
        exc.raised_by_every_process = True
        raise


def is_main_process() -> bool:
    """Whether this process prints: rank 0 under torchrun / accelerate launch, read from the environment they set
    (before Accelerate itself is started), or a process started alone."""
    return os.environ.get("RANK", "0") == "0"


def require_known_settings(command: str, given: Iterable[str], names: Iterable[str]) -> None:
    """A keyword the Python API's ``command`` does not take is refused, with the nearest names: a settings class
    built from a dict ignores what it has no field for."""
    names = list(names)
    for name in given:
        if name not in names:
            raise CertifyZooError(f"{command} has no setting {name!r}{did_you_mean(name, names)}")


def did_you_mean(word: str, choices) -> str:
    """The hint ' (did you mean X, Y?)' naming the choices closest to a mistyped ``word`` (difflib, as click
    suggests options), or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def require_at_least_one(*options: tuple[str, int | None]) -> None:
    """One line naming the first (option, value) below 1 and its value; None: not given."""
    for option, value in options:
        if value is not None and value < 1:
            raise CertifyZooError(f"{option} must be at least 1, got {value}")


def require_workers(workers: int | None) -> None:
    """--workers: a count of decoding processes, 0 or more; None: the default (data.dataloader_workers)."""
    if workers is not None and workers < 0:
        raise CertifyZooError(f"--workers must be >= 0, got {workers}")


def require_sigma(sigma: float | None, name: str = "--sigma") -> None:
    """The noise level: in (0, 2], pixel L2 noise on [0,1] images (nan fails too); None: not given."""
    if sigma is not None and not 0 < sigma <= 2:
        raise CertifyZooError(f"{name} must be in (0, 2] (pixel L2 noise on [0,1] images), got {sigma}")


def require_failure_probability(alpha: float, name: str = "--alpha") -> None:
    """Monte-Carlo's alpha: a probability strictly between 0 and 1 (``name``: as the caller spells it)."""
    if not 0 < alpha < 1:
        raise CertifyZooError(f"{name} must be in (0, 1), got {alpha} (the Monte-Carlo failure probability)")


@contextlib.contextmanager
def disk_errors(what: str, advice: str) -> Iterator[None]:
    """Turn a full disk (or a read-only / forbidden folder) while writing `what` into one line: the reason, what to
    do about it (disk_remedy), then `advice` (', then rerun ...')."""
    try:
        yield
    except CertifyZooError:  # said already, and said better
        raise
    except Exception as exc:
        reason = disk_error_reason(exc)
        if reason is None:
            raise
        raise CertifyZooError(f"cannot write {what}: {reason}: {disk_remedy(reason)}{advice}") from exc
