"""The cheaper estimator of the Boot Camp penalty ("jl"); the paper's own one is objective.jl_fd_penalty.

The paper's penalty is a sum over ``reps`` Johnson-Lindenstrauss terms ((w . v(x~ + h d) - w . v(x~)) / h)^2,
w ~ N(0, I/C), d the normalised input gradient of w . v (a constant); its expectation is ~ reps * ||J||_F^2 / C
(J = d logits / d pixels, C classes). Written as one loss, every term keeps the graph of its shifted forward
alive until the final backward: 1 + reps graphs at once.

``jl_probe_backward`` draws ``probes`` of those terms and scales their sum by reps / probes (the same
expectation, so gamma and reps keep their meaning; probes = reps with Gaussian w is the paper's estimator
itself), and backpropagates them holding ONE forward's graph at a time. The weight gradient of weight * (D/h)^2,
D = w . v(x~ + h d) - w . v(x~), is (2 weight D / h^2) (grad w . v(x~ + h d) - grad w . v(x~)): linear in the two
forwards, with a scalar coefficient per sample. Where nothing couples the batch, the coefficient is taken at its
h -> 0 limit D / h -> w . J d = ||grad_x (w . v)||, which the input gradient already gave: the student's forward
(fidelity and the -s parts) is backpropagated and freed first, then each shifted forward is built and
backpropagated alone (the gradient matches the single-graph loss's to O(h); tests/test_estimators.py bounds the
difference). When BatchNorm couples the batch, or for the paper's estimator, the coefficient is read from each
shifted forward itself: the student's graph is freed by the last input gradient, each shifted forward is
backpropagated alone, and the student's forward is rebuilt for the fidelity and -s parts. That is one forward
more than the single-graph loss, for the same gradient exactly, at the memory of one forward's graph instead of
1 + reps. The reported penalty is the finite difference itself either way.

Measured and rejected (docs, "Method and gamma"): random input directions e with ||v(x + h e) - v(x)||^2 / h^2
(Hutchinson from the input side, no input gradient). Its penalty VALUE has the same distribution as a paper
term, but its GRADIENT w.r.t. the weights sees J along one of D input directions instead of all of them, and
is far noisier: on the demo it collapsed the student.
"""
from __future__ import annotations

from typing import Callable

import torch


def unit_per_sample(tensor: torch.Tensor) -> torch.Tensor:
    """Each sample scaled to unit L2 norm (zero stays zero)."""
    norm = tensor.flatten(1).norm(dim=1).clamp_min(1e-12)
    return tensor / norm.view(-1, *([1] * (tensor.dim() - 1)))


def couples_batch(model: torch.nn.Module) -> bool:
    """Whether some layer mixes the samples of a batch (BatchNorm in train mode): then one sample's output moves
    when the others' inputs do, and a finite difference shifting the whole batch is not a per-sample derivative."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def jl_probe_backward(student: Callable, x_tilde: torch.Tensor, logits: torch.Tensor, w: torch.Tensor, h: float,
                      weight: float, backward: Callable[[torch.Tensor], None],
                      fidelity_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      exact_coefficient: bool = True) -> torch.Tensor:
    """Backpropagate mean(fidelity + weight * sum of the probes' paper terms) into the student; return the terms.

    ``w`` is probes x B x C. x_tilde must require grad and logits = student(x_tilde) with graph; ``fidelity_of``
    gives the per-sample fidelity of the student's logits (None: none here, already backpropagated). ``backward``
    is called once per probe and once for the student's forward (``accelerator.backward`` in the loop): the
    gradients accumulate, and one forward's graph is alive at a time. ``exact_coefficient``: read each term's D
    from its shifted forward (needed when the model couples the batch, see ``couples_batch``; the gradient is then
    the single-graph loss's exactly), which frees the student's graph before the probes and rebuilds its forward
    for the last backward (one forward more); otherwise use D's h -> 0 limit ||grad_x (w . v)|| and backpropagate
    the student's graph first. Returns the per-sample sum of the probes' finite-difference terms, detached. For a
    linear v(x) = A x a term equals ||A^T w||^2.
    """
    probes = w.shape[0]

    def project(student_logits: torch.Tensor) -> torch.Tensor:  # probes x B, s = w . v(x~)
        return (w * student_logits.unsqueeze(0)).sum(-1)

    projections = project(logits)
    values = projections.detach()  # differences in the model's dtype, cast after (as the paper's estimator)
    start = x_tilde.detach()
    shifted_inputs, limits = [], []
    for probe in range(probes):  # the exact path lets the last input gradient free the student's graph
        keep = not exact_coefficient or probe < probes - 1
        (gradient,) = torch.autograd.grad(projections[probe].sum(), x_tilde, retain_graph=keep)
        shifted_inputs.append(start + h * unit_per_sample(gradient).detach())
        limits.append(gradient.flatten(1).norm(dim=1).float())  # D / h -> w . J d = ||grad_x s|| as h -> 0

    def student_part(student_logits: torch.Tensor, student_projections: torch.Tensor,
                     coefficients: torch.Tensor) -> None:  # the fidelity and -s parts
        carried = fidelity_of(student_logits) if fidelity_of is not None else 0.0
        backward((carried - (coefficients * student_projections.float()).sum(0)).mean())

    if not exact_coefficient:
        student_part(logits, projections, (2 * weight / h) * torch.stack(limits))  # d(weight * (D/h)^2) / dD
    terms, coefficients = [], []
    for probe in range(probes):
        shifted = (w[probe] * student(shifted_inputs[probe])).sum(-1)
        slope = ((shifted.detach() - values[probe]) / h).float()
        coefficient = (2 * weight / h) * (slope if exact_coefficient else limits[probe])
        backward((coefficient * shifted.float()).mean())
        coefficients.append(coefficient)
        terms.append(slope.pow(2))
    if exact_coefficient:  # the student's forward again (the same logits: nothing in it is random)
        rebuilt = student(start)
        student_part(rebuilt, project(rebuilt), torch.stack(coefficients))
    return torch.stack(terms).sum(0)
