"""Data parallelism helpers on top of Accelerate: the same code on one process and under ``accelerate launch``.

- ``lockstep`` walks a prepared loader on every process together: each step every process learns where its
  images sit in the global batch (for ``draws.keyed_draws``), how many were unreadable, and the loop stops
  as soon as any process runs out (a streamed dataset split across processes rarely splits evenly, and a
  process that leaves the loop early would leave the others waiting in the gradient all-reduce forever).
- streamed (iterable) datasets are split across processes in ``data_sources`` (``split_dataset_by_node``: each
  process reads only its own shards); map-style datasets are sharded by Accelerate's sampler.
- ``gather_seen`` brings every process's list of trained image indices to the main process (audit of sharding);
  ``gather_rows_into`` brings every process's per-image results of an evaluation step, however many each has.
- ``main_process_alone`` runs what only the main process does (a conversion's save) while the others wait for it
  without the default group's deadline; ``sum_waiting_long`` adds up the parts of work shared out over the
  processes (a conversion's self-check) with the same deadline.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .errors import CertifyZooError, alike_on_every_process


@dataclass(frozen=True)
class StepLayout:
    offset: int  # position of this process's first image in the global batch
    global_size: int  # readable images in the global batch, all processes together
    skipped: int  # unreadable images in the global batch
    any_empty: bool  # some process has no readable image in this step: everyone skips it
    smallest: int  # fewest readable images a process has in this step


def lockstep(loader: Iterable, accelerator, to_the_end: bool = False) -> Iterator[tuple[Any, StepLayout]]:
    """Yield (batch, layout) while every process still has a batch; one small all-gather per step.

    ``to_the_end`` (evaluation, nothing to all-reduce): while any process still has one; the others get None."""
    iterator = iter(loader)
    rank = accelerator.process_index
    while True:
        batch = next(iterator, None)
        count = 0 if batch is None else int(batch.images.shape[0])
        skipped = 0 if batch is None else int(batch.skipped)
        mine = torch.tensor([[int(batch is not None), count, skipped]], device=accelerator.device)
        everyone = accelerator.gather(mine).view(-1, 3).cpu()
        if not bool(everyone[:, 0].any() if to_the_end else everyone[:, 0].all()):
            return
        counts = everyone[:, 1]
        yield batch, StepLayout(offset=int(counts[:rank].sum()), global_size=int(counts.sum()),
                                skipped=int(everyone[:, 2].sum()), any_empty=bool((counts == 0).any()),
                                smallest=int(counts.min()))


def gather_per_process(value: Any, accelerator) -> list[Any]:
    """Each process's (picklable) value, on every process, in process order."""
    from accelerate.utils import gather_object

    return list(gather_object([value])) if accelerator.num_processes > 1 else [value]


def gather_rows_into(columns: dict[str, list[torch.Tensor]], rows: dict[str, torch.Tensor] | None,
                     accelerator) -> None:
    """Append every process's per-image rows of this step to `columns` (on the CPU, in process order).

    Any number of rows per process, none included (unreadable images, a process whose data ran out): what was
    read is gathered, where a tensor gather would need the same shape everywhere. Every process must call it."""
    local = {key: value.cpu() for key, value in rows.items()} if rows else None
    for part in gather_per_process(local, accelerator):
        for key, value in (part or {}).items():
            columns.setdefault(key, []).append(value)


def unique_by_index(columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows sorted by their "index" column, each index once: the order of the data whatever the process count,
    without the images a sharded loader repeats to even out the last batch."""
    order = torch.argsort(columns["index"], stable=True)
    index = columns["index"][order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    keep = order[first]
    return {key: value[keep] for key, value in columns.items()}


def gather_seen(seen: list[int], accelerator) -> list[list[int]]:
    """Each process's list of image indices, on every process, in process order."""
    return [list(part) for part in gather_per_process(list(seen), accelerator)]


def make_accelerator(**kwargs):
    """An Accelerator that also goes multi-process on a machine without GPUs.

    Accelerate picks MULTI_CPU (gloo) under ``torchrun`` only when told to run on the CPU, so it is told exactly
    when no accelerator device exists; with a GPU nothing changes.
    """
    from accelerate import Accelerator

    # Imported before the process group exists, on purpose: torch.distributed.nn.functional binds group.WORLD as the
    # default argument of ten functions when it is first imported, and timm imports it (through torchvision and
    # torch._dynamo) after the group exists. Those defaults then hold the world group to the end, the exit hook's
    # destroy cannot end its gloo threads, and one may still be freeing a collective in finalisation (the abort of
    # _destroy_process_group_at_exit). Two-process evaluations here: 1 in 40 aborted without this import, 2 in 26
    # with two runs side by side; with it, 0 in 120 side by side.
    if torch.distributed.is_available():
        importlib.import_module("torch.distributed.nn.functional")

    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(cpu=not has_device, **kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _destroy_process_group_at_exit()
    return accelerator


@functools.cache  # one hook per process, however many commands it runs
def _destroy_process_group_at_exit() -> None:
    """Tear the process group down while the interpreter is still whole.

    A gloo worker thread frees each finished collective a moment after the caller has its result; if that moment
    falls in the interpreter's finalisation, the thread cannot take the GIL to drop the tensors' Python objects
    and the process aborts (SIGABRT, "terminate called without an active exception") after the work is done:
    torchrun then reports a finished run as failed (7 of 25 two-process conversions here, torch 2.14). Destroying
    the group at exit, before finalisation, and collecting what still refers to it ends the group, whose
    destructor waits for its worker threads (make_accelerator sees to it that nothing else holds the group).
    """
    import atexit
    import gc

    def destroy() -> None:
        if torch.distributed.is_initialized():
            # a gloo thread takes the GIL to free the tensors of the collective it just finished, and torch (2.3 at
            # least) destroys a group holding the GIL while it waits for those threads: one still freeing the last
            # collective's tensors then waits for the GIL for ever (gdb at the floors: ~ProcessGroupGloo joins a
            # thread in ~AsyncAllgatherWork -> take_gil; 3 of 22 resumed two-process evaluations hung so, 0 of 30
            # with this sleep, which hands the GIL over first).
            time.sleep(GLOO_THREADS_GRACE_SECONDS)
            torch.distributed.destroy_process_group()
            gc.collect()

    atexit.register(destroy)


GLOO_THREADS_GRACE_SECONDS = 0.25


def _default_store():
    """The process group's key-value store (torchrun's, or the main process's), None without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return torch.distributed.distributed_c10d._get_default_store()


# every process counts the same errors, those raised alike under a process group: each one's key is the same on all
_errors_said = itertools.count()


def _next_error_said_key() -> str:
    return f"certify_zoo/error_said/{next(_errors_said)}"


def main_process_said_the_error() -> None:
    """On the main process, once it printed an error every process raised alike: the others may exit now."""
    store = _default_store()
    if store is not None:
        store.set(_next_error_said_key(), "said")


def wait_for_the_main_process_to_say_the_error(grace_seconds: float) -> None:
    """On the other processes: return once the main process said the error they all raised, or has gone (it may
    have hosted the store), or after ``grace_seconds``.

    torchrun ends every process when the first one exits non-zero, so an instant exit here could end the main
    process before it printed (seen on a loaded machine). A fixed wait held every run stopped by SIGTERM for the
    whole grace: torchrun signals its processes, waits 30 s for them to end, and then kills them."""
    store = _default_store()
    if store is None:
        time.sleep(grace_seconds)
        return
    with contextlib.suppress(RuntimeError):  # the grace ran out, or the store went with the main process
        store.wait([_next_error_said_key()], datetime.timedelta(seconds=grace_seconds))


# As good as no deadline: a waiting process ends when the main process finishes or when torchrun, seeing the main
# process fail, ends it. A wait that timed out instead could only fail a run whose main process is still working.
MAIN_PROCESS_ALONE_TIMEOUT = datetime.timedelta(days=7)


@contextlib.contextmanager
def main_process_alone(accelerator) -> Iterator[bool]:
    """Yield whether this is the main process, for work only it does; at the end of the block the others have
    waited for it. They wait in a gloo group of their own whose deadline is MAIN_PROCESS_ALONE_TIMEOUT: the
    default group's deadline (torch: 30 minutes on gloo, 10 on NCCL) can be shorter than the main process's work
    (a conversion's save to a slow disk), and a waiting process that timed out failed the run before the main
    process saved it, on every --resume alike."""
    if accelerator.num_processes == 1:
        yield True
        return
    group = torch.distributed.new_group(backend="gloo", timeout=MAIN_PROCESS_ALONE_TIMEOUT)
    yield accelerator.is_main_process
    # reached only when the block ended without an error: a main process that failed exits, and torchrun ends the rest
    torch.distributed.barrier(group=group)
    torch.distributed.destroy_process_group(group)


def sum_waiting_long(accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function that adds a tensor over the processes (every process calls it with its part, all get the sum), or
    None on one process. The sum runs in a gloo group of its own (on the CPU, whatever the device; made now, by every
    process together, and taken down with the default group at exit) whose deadline is MAIN_PROCESS_ALONE_TIMEOUT:
    for work shared out over the processes whose parts can take longer than the default group's deadline, as a
    conversion's self-check on CPUs does."""
    if accelerator.num_processes == 1:
        return None
    group = torch.distributed.new_group(backend="gloo", timeout=MAIN_PROCESS_ALONE_TIMEOUT)

    def total(part: torch.Tensor) -> torch.Tensor:
        summed = part.detach().cpu().clone()
        torch.distributed.all_reduce(summed, group=group)
        return summed.to(part.device)

    return total


def on_any_process(flags: Sequence[bool], accelerator) -> list[bool]:
    """Each flag true wherever any process has it true: decisions every process must take together (stop, save),
    from a signal or a clock only some of them saw."""
    if accelerator.num_processes == 1:
        return list(flags)
    agreed = accelerator.reduce(torch.tensor([int(flag) for flag in flags], device=accelerator.device), "max")
    return [bool(flag) for flag in agreed]


def one_process_of_several_note(accelerator) -> str | None:
    """A line when `accelerate launch --num_processes N` (N > 1) started this run as one process, as it does on a
    machine without GPUs: its simple launcher sets MASTER_ADDR for the processes asked for, but none of the
    WORLD_SIZE that torchrun (and accelerate's own multi-GPU launch) give every process. None otherwise."""
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if accelerator.num_processes > 1 or not launched_by_accelerate or "WORLD_SIZE" in os.environ:
        return None
    if "MASTER_ADDR" not in os.environ:
        return None
    return ("accelerate launch started one process, not the several asked for: without GPUs it runs a single one; "
            "for several processes on CPUs use torchrun --nproc_per_node N -m certify_zoo ...")


def decided_by_main(accelerator, decide: Callable[[], Any]) -> Any:
    """``decide()`` on the main process; its result on every process, or its refusal (a CertifyZooError) raised on
    every process: a decision about shared files that another process taking by itself could get wrong, or that
    would leave the others waiting at their next collective."""
    from accelerate.utils import broadcast_object_list

    decision: list[Any] = [None, None]  # result, refusal
    if accelerator.is_main_process:
        try:
            decision[0] = decide()
        except CertifyZooError as exc:
            if accelerator.num_processes == 1:
                raise
            decision[1] = str(exc)
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        broadcast_object_list(decision)
    if decision[1] is not None:  # the main process refused: every process stops with its message
        with alike_on_every_process():
            raise CertifyZooError(decision[1])
    return decision[0]
