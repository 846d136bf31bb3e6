"""A gradient clip that transfers across models: at a multiple of the running median of the gradient's norm.

A fixed norm (the demo's 1.0) is calibrated on one model, and weight-gradient norms differ by orders of magnitude
between models and over a run. Clipping at ``multiple`` times the median of the last ``window`` norms cuts the
rare spikes (a collapse starts with a few) and leaves ordinary steps alone, whatever the model's scale.

With a lazy penalty (objective.penalty_due) the k-weighted penalty steps have larger gradients than the
fidelity-only steps between them: one median over all steps, mostly cheap ones, would clip exactly the penalty
steps and undo their k weighting. So penalty steps and fidelity-only steps keep separate statistics.

In the Accelerate loop (gradients synchronised, before ``optimizer.step()``)::

    norm = clip(student.parameters(), penalty_step=parts.with_penalty, clip_grad_norm_=accelerator.clip_grad_norm_)

``accelerator.clip_grad_norm_`` unscales fp16 gradients and handles FSDP; it returns the norm of the
synchronised gradient, the same on every process, so every process keeps the same statistics. The state is
plain numbers (``state_dict``), for a checkpoint's JSON.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Callable, Iterable, Sequence

import torch

from .objective import lazy_weight

PENALTY, FIDELITY = "penalty", "fidelity"
STEP_KINDS = (PENALTY, FIDELITY)


def median_threshold(norms: Sequence[float], multiple: float, warmup: int) -> float:
    """The clip threshold given the earlier norms of one kind of step: ``multiple`` x their median, or inf
    (no clip) while fewer than ``warmup`` have been seen."""
    if len(norms) < max(1, warmup):
        return math.inf
    return multiple * statistics.median(norms)


def fixed_clip_threshold(norm: float, every: int, penalty_step: bool) -> float:
    """Where a fixed clip (``--clip-grad-norm``) cuts this step: a lazy penalty step (k = ``every``) carries k steps'
    penalty, and clipping it at the every-step norm would undo exactly that k weighting (the demo's norm 1 did, once
    its gradients passed 1), so it is clipped as its weight is scaled; fidelity-only steps and k = 1 at the norm."""
    return lazy_weight(norm, every) if penalty_step else norm


def step_kind(penalty_step: bool) -> str:
    return PENALTY if penalty_step else FIDELITY


class MedianNormClip:
    """Clip the weight gradient at ``multiple`` x the median norm of the last ``window`` steps of the same kind
    (penalty or fidelity-only), once ``warmup`` steps of that kind have been seen (before: no clip)."""

    def __init__(self, multiple: float, window: int = 100, warmup: int = 10):
        if not multiple > 0 or window < 1 or not 1 <= warmup <= window:
            raise ValueError(f"median clip needs multiple > 0 and 1 <= warmup <= window, got multiple {multiple}, "
                             f"window {window}, warmup {warmup}")
        self.multiple, self.window, self.warmup = float(multiple), int(window), int(warmup)
        self.norms: dict[str, deque[float]] = {kind: deque(maxlen=self.window) for kind in STEP_KINDS}
        self.steps = dict.fromkeys(STEP_KINDS, 0)
        self.clipped = dict.fromkeys(STEP_KINDS, 0)

    def threshold(self, penalty_step: bool) -> float:
        """The norm the next step of this kind is clipped at (inf while warming up)."""
        return median_threshold(self.norms[step_kind(penalty_step)], self.multiple, self.warmup)

    def __call__(self, parameters: Iterable[torch.Tensor], penalty_step: bool = True,
                 clip_grad_norm_: Callable[..., torch.Tensor] = torch.nn.utils.clip_grad_norm_) -> float:
        """Clip the gradients of ``parameters`` in place; record and return their total L2 norm before clipping.

        ``clip_grad_norm_``: ``accelerator.clip_grad_norm_`` in the loop (torch's by default): it returns the norm
        before clipping, so one call both measures and clips. A non-finite norm is returned but not recorded.
        """
        kind = step_kind(penalty_step)
        limit = self.threshold(penalty_step)
        norm = float(clip_grad_norm_(parameters, limit))
        if math.isfinite(norm):
            self.norms[kind].append(norm)
            self.steps[kind] += 1
            self.clipped[kind] += int(norm > limit)
        return norm

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers (JSON-safe): a resumed run clips exactly as the uninterrupted one."""
        return {"multiple": self.multiple, "window": self.window, "warmup": self.warmup,
                "norms": {kind: list(values) for kind, values in self.norms.items()},
                "steps": dict(self.steps), "clipped": dict(self.clipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.multiple, self.window, self.warmup = float(state["multiple"]), int(state["window"]), int(state["warmup"])
        for kind in STEP_KINDS:
            self.norms[kind] = deque((float(value) for value in state["norms"][kind]), maxlen=self.window)
            self.steps[kind] = int(state["steps"][kind])
            self.clipped[kind] = int(state["clipped"][kind])

    def summary(self) -> dict[str, Any]:
        """What a run's record states about its clip: the rule, how often each kind was clipped, recent medians."""
        return {"rule": "median", "multiple": self.multiple, "window": self.window, "warmup": self.warmup,
                "steps": dict(self.steps), "clipped_steps": dict(self.clipped),
                "median_norm": {kind: statistics.median(values) if values else None
                                for kind, values in self.norms.items()}}
