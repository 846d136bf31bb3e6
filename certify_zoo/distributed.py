"""Data parallelism helpers on top of Accelerate: the same code on one process and under ``accelerate launch``.

- ``lockstep`` walks a prepared loader on every process together: each step every process learns where its
  images sit in the global batch (for ``draws.keyed_draws``), how many were unreadable, and the loop stops
  as soon as any process runs out (a streamed dataset split across processes rarely splits evenly, and a
  process that leaves the loop early would leave the others waiting in the gradient all-reduce forever).
- streamed (iterable) datasets are split across processes in ``data_sources`` (``split_dataset_by_node``: each
  process reads only its own shards); map-style datasets are sharded by Accelerate's sampler.
- ``gather_seen`` brings every process's list of trained image indices to the main process (audit of sharding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch


@dataclass(frozen=True)
class StepLayout:
    offset: int  # position of this process's first image in the global batch
    global_size: int  # readable images in the global batch, all processes together
    skipped: int  # unreadable images in the global batch
    any_empty: bool  # some process has no readable image in this step: everyone skips it


def lockstep(loader: Iterable, accelerator) -> Iterator[tuple[Any, StepLayout]]:
    """Yield (batch, layout) while every process still has a batch; one small all-gather per step."""
    iterator = iter(loader)
    rank = accelerator.process_index
    while True:
        batch = next(iterator, None)
        count = 0 if batch is None else int(batch.images.shape[0])
        skipped = 0 if batch is None else int(batch.skipped)
        mine = torch.tensor([[int(batch is not None), count, skipped]], device=accelerator.device)
        everyone = accelerator.gather(mine).view(-1, 3).cpu()
        if not bool(everyone[:, 0].all()):
            return
        counts = everyone[:, 1]
        yield batch, StepLayout(offset=int(counts[:rank].sum()), global_size=int(counts.sum()),
                                skipped=int(everyone[:, 2].sum()), any_empty=bool((counts == 0).any()))


def gather_seen(seen: list[int], accelerator) -> list[list[int]]:
    """Each process's list of image indices, on every process, in process order."""
    from accelerate.utils import gather_object

    return [list(part) for part in gather_object([list(seen)])] if accelerator.num_processes > 1 else [list(seen)]


def make_accelerator(**kwargs):
    """An Accelerator that also goes multi-process on a machine without GPUs.

    Accelerate picks MULTI_CPU (gloo) under ``torchrun`` only when told to run on the CPU, so it is told exactly
    when no accelerator device exists; with a GPU nothing changes.
    """
    from accelerate import Accelerator

    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return Accelerator(cpu=not has_device, **kwargs)
