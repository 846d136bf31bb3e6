"""The student as it was at the gamma controller's last check that met the agreement floor, kept in memory.

A penalty weight that breaks the student's agreement with the base does its harm within one check interval, and
lowering the weight afterwards does not undo it: the students that breached the floor kept most of the loss to the
end of their run. Going back to the last state that met the floor (weights, BatchNorm buffers, the optimiser's
momentum) undoes it for the cost of the interval's steps. Every process holds the same copy (the same weights after
each synchronised step), so every process restores the same state.
"""
from __future__ import annotations

import torch


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class LastGoodState:
    """A copy, on the CPU, of a model's state and its optimiser's, taken at one step."""

    def __init__(self, step: int, model: torch.nn.Module, optimizer) -> None:
        self.step = step
        self.model_state = _to_cpu(model.state_dict())
        self.optimizer_state = _to_cpu(optimizer.state_dict())

    def restore(self, model: torch.nn.Module, optimizer) -> None:
        """Load the copy back (load_state_dict copies onto the tensors' own devices)."""
        model.load_state_dict(self.model_state)
        optimizer.load_state_dict(self.optimizer_state)
