"""Cheaper estimators of the Boot Camp penalty (the paper's own one is objective.jl_fd_penalty).

The paper's penalty is a sum over ``reps`` Johnson-Lindenstrauss terms ||J^T w||^2, w ~ N(0, I/C), each
read off by a finite difference along the normalised input gradient of w . v; its expectation is
``reps * ||J||_F^2 / C`` (J = d logits / d pixels, C classes). Each term costs an input-gradient backward,
an extra forward and that forward's share of the final backward: ~1x a plain fine-tuning step per term.

``jl_probe_penalty`` keeps the paper's terms but draws only ``probes`` of them and scales their sum by
``reps / probes``: the same expectation, so gamma and reps keep their meaning, at about probes/reps of the
penalty's cost; the shifted forwards of all probes go through ONE forward (one large batch instead of
``probes`` small ones). With probes == reps it is the paper's estimator with its forwards batched.

Measured and rejected (see README, "Performance"): random input directions e with ||v(x + h e) - v(x)||^2 / h^2
(Hutchinson from the input side, no input gradient, one forward per probe). Its penalty VALUE has the same
distribution as a paper term, but its GRADIENT w.r.t. the weights sees J along one of D input directions
instead of all of them, and is far noisier: on the demo it collapsed the student (clean 25%).
"""
from __future__ import annotations

from typing import Callable

import torch


def _unit_per_sample(tensor: torch.Tensor) -> torch.Tensor:
    norm = tensor.flatten(1).norm(dim=1).clamp_min(1e-12)
    return tensor / norm.view(-1, *([1] * (tensor.dim() - 1)))


def jl_fd_terms(student: Callable, x_tilde: torch.Tensor, logits: torch.Tensor, w: torch.Tensor,
                h: float) -> torch.Tensor:
    """The paper's term ((w . v(x~ + h d) - w . v(x~)) / h)^2 for each of the given projections (probes x B).

    ``w`` is probes x B x C; d = grad_x (w . v) / ||grad_x (w . v)|| is a constant (no graph). x_tilde must
    require grad and logits = student(x_tilde) with graph. For a linear v(x) = A x a term equals ||A^T w||^2.
    """
    probes = w.shape[0]
    projections = (w * logits.unsqueeze(0)).sum(-1)  # probes x B
    directions = []
    for probe in range(probes):
        (gradient,) = torch.autograd.grad(projections[probe].sum(), x_tilde, retain_graph=True)
        directions.append(_unit_per_sample(gradient).detach())
    start = x_tilde.detach().repeat(probes, *([1] * (x_tilde.dim() - 1)))
    shifted = student(start + h * torch.cat(directions)).view(*w.shape)  # all probes in one forward
    return (((w * shifted).sum(-1) - projections) / h).float().pow(2)


def jl_probe_penalty(student: Callable, x_tilde: torch.Tensor, logits: torch.Tensor, reps: int, h: float,
                     probes: int = 2, projections: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample: (reps / probes) * the sum of ``probes`` paper terms, w ~ N(0, I/C). E = reps * ||J||_F^2 / C.

    ``projections`` (at least probes x B x C), when given, are used as the w's (the first ``probes`` of them), so
    that a caller who draws the step's random numbers itself gets reproducible penalties.
    """
    batch, num_classes = logits.shape
    if projections is not None:
        w = projections[:probes].to(logits.dtype)
    else:
        w = torch.randn((probes, batch, num_classes), device=logits.device, dtype=logits.dtype) / num_classes ** 0.5
    return jl_fd_terms(student, x_tilde, logits, w, h).sum(0) * (reps / probes)
