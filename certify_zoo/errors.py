"""The one exception a user can cause: the CLI prints its message on one line and exits non-zero."""


class CertifyZooError(Exception):
    """A problem with the user's input or environment; the message names it and what to do."""

    exit_code = 2


class ConversionInterrupted(CertifyZooError):
    """A conversion stopped by a signal after saving a checkpoint (resume with --resume)."""

    exit_code = 3
