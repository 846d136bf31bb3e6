"""Peak tensor memory on the CPU: what ``torch.cuda.max_memory_allocated`` reports on a GPU.

A process's resident set (RSS) also counts what glibc's allocator keeps after tensors are freed, and how much it
keeps depends on the order of allocations, not on what a step needs: the same step measured +-15% apart in fresh
processes. Counting the bytes of live tensor storages instead gives the number a GPU run reports, exactly and in
one process. It sees every tensor an operator returns (autograd's included); it does not see scratch buffers that
kernels allocate internally and free before returning (a convolution's workspace), which a GPU's counter would.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Within the block: ``peak_bytes``, the most bytes of tensor storage alive at once among the storages created
    in it (those made before, such as the weights and the optimiser's buffers, are not counted: the analogue of
    ``max_memory_allocated() - memory_allocated()`` taken at the block's start)."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: set[int] = set()  # data pointers of the storages counted and not yet freed

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:  # a view, or an in-place result, of a storage already counted
            return
        self._live.add(key)
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        # a storage's Python object lives as long as the storage does (torch keeps the two together)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._live.discard(key)
        self.live_bytes -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # a result in an input's storage (a view, an in-place update, out=) allocated nothing: the weights and the
        # optimiser's buffers updated in place stay uncounted, as they were made before the block
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if (isinstance(tensor, torch.Tensor) and tensor.device.type != "meta"
                    and tensor.untyped_storage().data_ptr() not in inputs):
                self._count(tensor)
        return out
