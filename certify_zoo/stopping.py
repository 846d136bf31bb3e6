"""Ctrl-C, SIGTERM and SIGHUP during a conversion: finish the current step, save a checkpoint, exit with code 3.

A handler only records the request; the loop acts on it at the next step boundary, where the state is
consistent. A second signal while the first is being handled falls back to the default behaviour, so a
user who insists can still stop at once (the previous checkpoint stays valid: checkpoints are atomic).
After the last step there is no boundary left (``StopSignals.raise_at_once``): a signal then raises at once.
"""
from __future__ import annotations

import multiprocessing.context
import os
import signal
import stat
import threading

# SIGHUP: the terminal or ssh session closed, which ended a conversion at once, losing the steps since its last
# checkpoint (torchrun passes it on to its workers). A signal the process was started ignoring stays ignored: nohup
# ignores SIGHUP, and a shell ignores SIGINT for a background job, so that they run on.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopSignals:
    """Context manager: while active, SIGINT, SIGTERM and SIGHUP set ``requested`` instead of ending the process
    (each that the process does not ignore)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        self._error = None  # set by raise_at_once: what a signal raises at once

    def raise_at_once(self, error) -> None:
        """From now on a signal raises ``error(signal name)`` where the main thread is, instead of waiting for a step
        boundary (after the last step there is none: the self-check and the save run for minutes); a signal that
        came before raises now."""
        self._error = error
        if self.requested is not None:
            raise error(self.requested)

    def _handle(self, signum, frame) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            leave_the_closed_terminal()
        if self._error is not None:
            self.requested = signal.Signals(signum).name
            raise self._error(self.requested)
        if self.requested is not None:  # second signal: stop now, the way the signal normally would
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) != signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def leave_the_closed_terminal() -> None:
    """After SIGHUP the terminal is gone, and a write to it fails (EIO): the next progress line or the final message
    ended the run with exit 1 instead of 3 (measured on a closed pty), and could have ended it before its checkpoint.
    What would go to the terminal now goes nowhere, as under nohup; output sent to a file still goes there. (A
    terminal is known by being a character device: isatty says no once it has hung up.)"""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for descriptor in (1, 2):
            try:
                a_terminal = stat.S_ISCHR(os.fstat(descriptor).st_mode)
            except OSError:  # closed
                continue
            if a_terminal:
                os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group, but only the main process may
    decide to stop (a worker killed by SIGINT would crash the loader before the checkpoint is written).
    Workers still exit when the main process ends. A worker started by ``SpawnWithStopSignalsBlocked`` had them
    blocked until now: ignored from here on, what came meanwhile is dropped."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # not on Windows
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class _ProcessStartedWithStopSignalsBlocked(multiprocessing.context.SpawnProcess):
    def start(self) -> None:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # what came meanwhile reaches this process now


class SpawnWithStopSignalsBlocked(multiprocessing.context.SpawnContext):
    """Spawn, with Ctrl-C and SIGTERM blocked in each new process (a blocked signal stays blocked across exec)
    until ``ignore_stop_signals`` ignores them: a spawned worker needs seconds to import torch before its
    ``worker_init_fn`` runs, and a stop signal in that time killed it and crashed the loader ("DataLoader worker
    exited unexpectedly") where the main process would have stopped cleanly."""

    Process = _ProcessStartedWithStopSignalsBlocked
