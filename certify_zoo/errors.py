"""The one exception a user can cause: the CLI prints its message on one line and exits non-zero."""
from __future__ import annotations

import contextlib
from typing import Iterator


class CertifyZooError(Exception):
    """A problem with the user's input or environment; the message names it and what to do."""

    exit_code = 2
    raised_by_every_process = False  # set by alike_on_every_process()


class ConversionInterrupted(CertifyZooError):
    """A conversion stopped by a signal after saving a checkpoint (resume with --resume)."""

    exit_code = 3


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
