"""Checks that stop a run before it produces garbage, each with a one-line error naming the fix."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import traceback
from typing import Iterable, Iterator

import torch

from .errors import CertifyZooError

# readable images seen before we give up on a data source that yields nothing but unreadable files
UNREADABLE_BEFORE_GIVING_UP = 256


def require_finite_loss(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise CertifyZooError(f"loss is {loss.item()} at step {step}: lower --lr or --gamma and start again with "
                              "--overwrite (no weights were written; earlier checkpoints are kept)")


def require_finite_parameters(parameters: Iterable[torch.Tensor], step: int) -> None:
    """Before a checkpoint: never save a model that has already diverged as 'the last good one'."""
    for parameter in parameters:
        if not torch.isfinite(parameter).all():
            raise CertifyZooError(f"the weights became non-finite at step {step}: lower --lr or --gamma and start "
                                  "again with --overwrite (no weights were written; earlier checkpoints are kept)")


def require_readable_images(images_seen: int, unreadable: int, data: str, finished: bool) -> None:
    """All-corrupt data would 'convert' nothing and save the base unchanged: stop instead."""
    if images_seen == 0 and (finished or unreadable >= UNREADABLE_BEFORE_GIVING_UP) and unreadable > 0:
        raise CertifyZooError(f"none of the {unreadable} images read so far from {data} could be decoded (corrupt or "
                              "unsupported files): check the data")


# What to change when the allocator refuses memory, per command (one line each).
CONVERT_MEMORY_ADVICE = ("lower --batch-size (raising --grad-accum keeps the global batch), or use --estimator jl "
                         "(one graph at a time: ~1.3x a plain step's memory); a checkpoint, if any, is kept")
EVALUATE_MEMORY_ADVICE = "lower --batch-size, or --mc-batch-size (noisy images per Monte-Carlo forward)"


# the device allocator's error: torch.OutOfMemoryError from torch 2.5 on, the same class under torch.cuda before
DEVICE_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def is_out_of_memory(exc: BaseException) -> bool:
    """The allocator refused: torch's OutOfMemoryError (CUDA, XPU), or the CPU / MPS allocator's RuntimeError."""
    text = str(exc)
    return isinstance(exc, DEVICE_OUT_OF_MEMORY) or (isinstance(exc, RuntimeError) and (
        "DefaultCPUAllocator: can't allocate memory" in text or "MPS backend out of memory" in text))


@contextlib.contextmanager
def out_of_memory(advice: str) -> Iterator[None]:
    """Turn an allocation the allocator refused into one line with the setting to change (exit 2).

    Only an allocation that raises can be caught: when the operating system's OOM killer ends the process instead
    (SIGKILL, exit 137, common on Linux with overcommit), nothing runs: a conversion's last checkpoint stays, and
    --resume continues it (with --estimator jl if the paper estimator's graphs were the peak)."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        needed = next((part for part in str(exc).replace(". ", ".\n").splitlines() if "allocate" in part), "")
        raise CertifyZooError(f"out of memory{f' ({needed.strip()[:120]})' if needed else ''}: {advice}") from exc


# What to change when a DataLoader worker died, per command (one line each).
CONVERT_WORKER_ADVICE = "its last checkpoint, if any, is kept: --resume continues it"
EVALUATE_WORKER_ADVICE = "the results kept so far (every 10 minutes) stay: --resume continues them"
# torch's words for a worker that died: killed by a signal (its C++ SIGCHLD check), or found dead (the loader's)
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) "
                          r"(?:is killed by signal: ([^.]+)|exited unexpectedly)")
LESS_MEMORY = "fewer --workers, or 0, and a smaller --batch-size need less memory"
# why a signal, as Linux and Docker users meet it, and what to change
_WORKER_SIGNALS = {
    "Killed": f"SIGKILL: on Linux usually the out-of-memory killer; {LESS_MEMORY}",
    "Bus error": "SIGBUS: usually shared memory (/dev/shm) full, as in a Docker container's default 64 MB: raise it "
                 "(docker run --shm-size 8g, or --ipc host), or --workers 0 (no shared memory)",
}
# where torch does not say the signal
DIED_SOMEHOW = (f"died: killed (on Linux often by the out-of-memory killer: {LESS_MEMORY}) or crashed (--workers 0 "
                "decodes in this process and shows the error)")
# where the main process takes a batch's tensors over from a worker, through a connection to it
_HANDOVER_FILES = ("multiprocessing/resource_sharer.py", "torch/multiprocessing/reductions.py")


def worker_death(exc: BaseException) -> str | None:
    """What ``exc`` says of a DataLoader worker that died, as the start of one line ("a DataLoader worker ...
    died ..."); None where it is not a worker's death. torch's RuntimeError names the signal where its SIGCHLD check
    saw the death first; where the worker died while the main process took a batch over from it, the connection to
    it was reset (a frame in multiprocessing's resource sharer; elsewhere, a download say, a reset is not a
    worker's)."""
    if isinstance(exc, RuntimeError):
        died = _WORKER_DIED.search(str(exc))
        if died is None:
            return None
        pids, signal_name = died.group(1), died.group(2)
        how = (f"was killed by signal {signal_name} ({_WORKER_SIGNALS.get(signal_name, 'a crash')})" if signal_name
               else DIED_SOMEHOW)
        return f"a DataLoader worker (pid {pids}), which decodes images, {how}"
    if isinstance(exc, (ConnectionError, EOFError)):
        files = (frame.f_code.co_filename.replace("\\", "/") for frame, _ in traceback.walk_tb(exc.__traceback__))
        if any(file.endswith(_HANDOVER_FILES) for file in files):
            return (f"a DataLoader worker, which decodes images, {DIED_SOMEHOW} while it handed a batch over "
                    f"({type(exc).__name__})")
    return None


def quiet_worker_death_checks() -> None:
    """Stop torch's SIGCHLD check, once a run ends for a dead worker: the check raises its RuntimeError at whatever
    the main process runs next, and did, over the one line that says what happened (seen once in a full suite).
    Later loaders of this process still find dead workers, by their own check."""
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def said_worker_death(exc: BaseException) -> str | None:
    """``worker_death``, and torch's SIGCHLD check quieted where it is one: the run ends with that line."""
    said = worker_death(exc)
    if said is not None:
        quiet_worker_death_checks()
    return said


@contextlib.contextmanager
def dataloader_workers_died(advice: str) -> Iterator[None]:
    """Turn a DataLoader worker that died (killed by the OOM killer, a bus error in shared memory, a crash in a
    decoder) into one line saying how and what to change (exit 2), instead of the error the CLI took for a bug
    (``worker_death``)."""
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as exc:
        error, said = exc, None
        for _ in range(8):  # one more try per SIGCHLD that comes meanwhile
            try:
                said = said_worker_death(error)
                break
            except RuntimeError as late:  # torch's SIGCHLD check, raising just now: it says what happened
                error = late
        if said is None:
            raise
        raise CertifyZooError(f"{said}; {advice}") from exc


# cuBLAS is deterministic only with a fixed workspace, read when its first handle is made (torch reproducibility notes)
CUBLAS_WORKSPACE = ":4096:8"
# what torch's refusals say: an op without a deterministic kernel, and cuBLAS without that workspace
NONDETERMINISTIC_MARKERS = ("does not have a deterministic implementation", "CUBLAS_WORKSPACE_CONFIG")


@contextlib.contextmanager
def deterministic_algorithms(on: bool, command: str = "convert") -> Iterator[None]:
    """Within: only deterministic kernels (``--deterministic``), so that one seed gives the same weights (``command``
    convert) or the same certificates and audit (evaluate) on a GPU.

    The CPU's kernels already are; on CUDA some backward kernels sum in the order their threads finish. An op with
    no deterministic kernel (torch raises) becomes one line naming it. torch's switch is global to the process: the
    previous state comes back on exit, so that a conversion run from Python leaves the caller's settings as found.
    Not accelerate's ``set_seed(deterministic=True)``: it sets the switch for good and leaves cuBLAS's workspace."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    was_on, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False  # autotuning may pick another kernel per run
    try:
        yield
    except RuntimeError as exc:
        if not any(marker in str(exc) for marker in NONDETERMINISTIC_MARKERS):
            raise
        if "CUBLAS_WORKSPACE_CONFIG" in str(exc):  # CUDA's cuBLAS started in this process before the flag set it
            raise CertifyZooError(f"--deterministic: cuBLAS was started before CUBLAS_WORKSPACE_CONFIG was set: set "
                                  f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} before Python starts") from exc
        reason = str(exc).strip().splitlines()[0][:160]
        raise CertifyZooError(f"--deterministic: {reason} (torch {torch.__version__}): {command} without "
                              "--deterministic, where runs of one seed on a GPU differ slightly") from exc
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.backends.cudnn.benchmark = benchmark
