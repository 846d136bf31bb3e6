"""The cheaper estimator of the Boot Camp penalty ("jl"); the paper's own one is objective.jl_fd_penalty.

The paper's penalty is a sum over ``reps`` Johnson-Lindenstrauss terms ((w . v(x~ + h d) - w . v(x~)) / h)^2,
w ~ N(0, I/C), d the normalised input gradient of w . v (a constant); its expectation is ~ reps * ||J||_F^2 / C
(J = d logits / d pixels, C classes). Written as one loss, every term keeps the graph of its shifted forward
alive until the final backward: 1 + reps graphs at once.

``jl_probe_backward`` draws only ``probes`` of those terms and scales their sum by reps / probes (the same
expectation, so gamma and reps keep their meaning), and backpropagates them holding ONE graph at a time. The
weight gradient of weight * (D/h)^2, D = w . v(x~ + h d) - w . v(x~), is (2 weight D / h^2) (grad w . v(x~ + h d)
- grad w . v(x~)): linear in the two forwards, with a coefficient that needs only D's value. So: read D with
a no-grad forward, backpropagate the student's forward (fidelity and the -s parts) and free its graph, then
build each shifted forward's graph and backpropagate it alone. The gradient equals that of the single-graph
loss (tests/test_estimators.py); peak memory is one forward's activations, not 1 + probes.

Measured and rejected (see README, "Performance"): random input directions e with ||v(x + h e) - v(x)||^2 / h^2
(Hutchinson from the input side, no input gradient). Its penalty VALUE has the same distribution as a paper
term, but its GRADIENT w.r.t. the weights sees J along one of D input directions instead of all of them, and
is far noisier: on the demo it collapsed the student (clean 25%).
"""
from __future__ import annotations

from typing import Callable

import torch


def unit_per_sample(tensor: torch.Tensor) -> torch.Tensor:
    """Each sample scaled to unit L2 norm (zero stays zero)."""
    norm = tensor.flatten(1).norm(dim=1).clamp_min(1e-12)
    return tensor / norm.view(-1, *([1] * (tensor.dim() - 1)))


def jl_probe_backward(student: Callable, x_tilde: torch.Tensor, logits: torch.Tensor, fidelity: torch.Tensor,
                      w: torch.Tensor, h: float, weight: float,
                      backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Backpropagate mean(fidelity + weight * sum of the probes' paper terms) into the student; return the terms.

    ``w`` is probes x B x C. x_tilde must require grad and logits = student(x_tilde) with graph, fidelity its
    per-sample fidelity (graph through logits). ``backward`` is called once for the student's forward and once
    per probe (``accelerator.backward`` in the loop): the gradients accumulate. Returns the per-sample sum of
    the probes' terms, detached. For a linear v(x) = A x a term equals ||A^T w||^2.
    """
    probes = w.shape[0]
    projections = (w * logits.unsqueeze(0)).sum(-1)  # probes x B, s = w . v(x~)
    start = x_tilde.detach()
    shifted_inputs = []
    for probe in range(probes):
        (gradient,) = torch.autograd.grad(projections[probe].sum(), x_tilde, retain_graph=True)
        shifted_inputs.append(start + h * unit_per_sample(gradient).detach())
    with torch.no_grad():  # D / h, read without a graph; one forward per probe keeps BatchNorm's batches as the paper's
        slopes = torch.stack([((w[probe] * student(shifted_inputs[probe])).sum(-1) - projections[probe]).float() / h
                              for probe in range(probes)])
    coefficients = (2 * weight / h) * slopes  # d(weight * (D/h)^2) / dD
    backward((fidelity - (coefficients * projections.float()).sum(0)).mean())
    for probe in range(probes):
        shifted = student(shifted_inputs[probe])
        backward((coefficients[probe] * (w[probe] * shifted).sum(-1).float()).mean())
    return slopes.pow(2).sum(0)
