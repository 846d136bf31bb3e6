"""The Adversarial Boot Camp objective (Campbell, Finlay, Oberman 2020, arXiv 2010.02508) as pure functions.

loss = 1/2 ||softmax v(x~) - softmax f(x)||^2 + gamma_eff * 1/2 * sigma^2 * penalty

v is the student, f the frozen base, x~ the batch with Gaussian noise on a random half, all in [0,1]
pixel space. The penalty estimates the student's Dirichlet energy ||J_v||_F^2 (Johnson-Lindenstrauss
projections w ~ N(0, I/C) of the logits, directional finite differences of step h along the
normalised input gradient of w . v).

gamma is stated at ImageNet's class count: w ~ N(0, I/C) makes E[penalty] = reps * ||J||_F^2 / C, so
``effective_gamma = gamma * C / 1000`` weighs ||J||_F^2 the same way for any C. The reference code
differentiates after mean/std normalisation, where the penalty is std^2 (~0.05 on ImageNet) times
smaller: its gamma 1 is our gamma ~0.05.
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from .estimators import couples_batch, jl_probe_backward, unit_per_sample

REFERENCE_CLASS_COUNT = 1000
# The penalty divides a logit difference by h = 0.01; one bf16 rounding step of a logit near 10 is 0.06 (fp16: 0.008),
# as large as the difference itself, so it is computed in float32 only (half precision is refused with a penalty).
PENALTY_PRECISION = "float32"


@dataclass(frozen=True)
class ObjectiveSettings:
    sigma: float = 0.25
    # pixel-space, at 1000 classes (0.05 = the reference code's gamma 1), or "auto": steered during conversion by
    # smoothness.GammaController; the loss functions below always receive the number in force
    gamma: float | str = "auto"
    reps: int = 6
    h: float = 0.01
    noise_prob: float = 0.5
    estimator: str = "paper"
    probes: int = 1  # terms actually drawn by the "jl" estimator (reps keeps the penalty's scale)
    # the "jl" estimator's w: "gaussian" N(0, I/C) as the paper, or "rademacher" (+-1/sqrt(C), the signs of the same
    # Gaussian draws): E[w w^T] = I/C either way (the same expected penalty); Rademacher's term variance lacks
    # the diagonal of (J J^T)^2 (Hutchinson), about half of it on the demo
    probe_distribution: str = "gaussian"
    # lazy penalty (as lazy R1 regularisation, StyleGAN2): the penalty's graph on every k-th optimiser step only, its
    # weight multiplied by k (same expected gradient); fidelity every step. 1: the penalty on every step
    penalty_every: int = 1
    # share of each penalty step's images that carry the penalty (the first ceil(share * B) of the shuffled batch, at
    # least one), its mean over them standing for the batch's (the same expectation); fidelity on the whole batch.
    # With "jl" only. 1: every image. Unlike a longer lazy period it does not concentrate the penalty's gradient
    # on few steps (a 16x-weighted step collapsed EfficientNet-Lite2), and costs a forward of the chosen images
    penalty_share: float = 1.0

    def to_dict(self) -> dict:
        # what the record says about precision: conversions refuse half precision while the penalty is on
        # (ConvertSettings.validate), so its finite difference is always taken in float32
        return {**asdict(self), "penalty_precision": PENALTY_PRECISION}


@dataclass
class Draws:
    """The random numbers of one step, drawn outside the loss so that a caller can make them reproducible.

    ``noise`` is sigma-scaled pixel noise (zero on clean images), ``noised`` marks the noised images and
    ``projections`` (reps x B x C) are the JL vectors w ~ N(0, I/C).
    """

    noise: torch.Tensor
    noised: torch.Tensor
    projections: torch.Tensor


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar, with graph
    fidelity: torch.Tensor  # per-sample, detached
    penalty: torch.Tensor  # per-sample, detached
    agreement: torch.Tensor  # per clean sample: student top-1 == base top-1
    with_penalty: bool = True  # False on a fidelity-only step: ``penalty`` is zeros there, not a measurement


def effective_gamma(gamma: float, num_classes: int) -> float:
    """gamma at ImageNet scale -> the weight for C classes (the same weight on ||J||_F^2)."""
    return gamma * num_classes / REFERENCE_CLASS_COUNT


def stated_gamma(effective: float, num_classes: int) -> float:
    """The inverse of ``effective_gamma``: the weight on the penalty for C classes -> gamma at ImageNet scale."""
    return effective * REFERENCE_CLASS_COUNT / num_classes


def penalty_due(step: int, every: int) -> bool:
    """Whether optimiser step ``step`` (0-based) builds the penalty: steps 0, k, 2k, ... (every step when k <= 1)."""
    return every <= 1 or step % every == 0


def lazy_weight(gamma_weight: float, every: int) -> float:
    """The penalty weight of a lazy penalty step: k times the every-step weight, so that over a period of k steps
    the penalty's gradient has the expectation it has when it is built on every step."""
    return gamma_weight * max(1, every)


def fidelity(student_logits: torch.Tensor, base_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample 1/2 ||softmax v - softmax f||^2."""
    return 0.5 * (student_logits.float().softmax(-1) - base_probs.float()).pow(2).sum(-1)


def noise_random_half(images: torch.Tensor, sigma: float, noise_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """x~: N(0, sigma^2 I) pixel noise on a random subset of round(noise_prob * B) images; returns (x~, noised mask)."""
    batch = images.shape[0]
    order = torch.randperm(batch, device=images.device)
    noised = torch.zeros(batch, dtype=torch.bool, device=images.device)
    noised[order[: int(round(noise_prob * batch))]] = True
    noise = torch.randn_like(images) * sigma
    return images + noise * noised.view(-1, *([1] * (images.dim() - 1))), noised


def jl_fd_penalty(student: Callable, x_tilde: torch.Tensor, logits: torch.Tensor, reps: int, h: float,
                  projections: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's estimator, per sample, summed over reps (graph kept for backward into the student).

    x_tilde must require grad and logits = student(x_tilde). For each rep: w ~ N(0, I/C), s = w . v(x~),
    d = grad_x s / ||grad_x s|| (a constant), term = ((w . v(x~ + h d) - s) / h)^2.
    """
    num_classes = logits.shape[-1]
    penalty = logits.new_zeros(logits.shape[0], dtype=torch.float32)
    for rep in range(reps):
        if projections is not None:
            w = projections[rep].to(logits.dtype)
        else:
            w = torch.randn_like(logits) / num_classes ** 0.5
        s = (w * logits).sum(-1)
        (grad_x,) = torch.autograd.grad(s.sum(), x_tilde, retain_graph=True)
        direction = unit_per_sample(grad_x).detach()
        shifted = student(x_tilde.detach() + h * direction)
        penalty = penalty + (((w * shifted).sum(-1) - s) / h).float().pow(2)
    return penalty


# name -> what it computes. "paper": the reference estimator, all `reps` Gaussian terms with the gradient of its
# single-graph loss (boot_camp_loss) exactly. "jl": `probes` of the same terms scaled to `reps` (same expectation).
# Both are backpropagated one graph at a time (certify_zoo.estimators).
PENALTY_ESTIMATORS = ("paper", "jl")
PROBE_DISTRIBUTIONS = ("gaussian", "rademacher")


def _student_forward(student: Callable, base: Callable, images: torch.Tensor, settings: ObjectiveSettings,
                     draws: Draws | None, with_penalty: bool = True):
    """The base on clean x (no graph), the student on x~ (graph; x~ requires grad only for the penalty: a
    fidelity-only backward then stops at the weights, one input-gradient pass cheaper)."""
    with torch.no_grad():
        base_logits = base(images)
    if draws is None:
        x_tilde, noised = noise_random_half(images, settings.sigma, settings.noise_prob)
    else:
        x_tilde, noised = images + draws.noise.to(images.dtype), draws.noised
    x_tilde = x_tilde.detach().requires_grad_(with_penalty)
    logits = student(x_tilde)
    agreement = (logits.detach()[~noised].argmax(-1) == base_logits[~noised].argmax(-1)).float()
    return x_tilde, logits, base_logits.float().softmax(-1), agreement


def _needs_exact_coefficient(student: Callable) -> bool:
    """jl_probe_backward's exact coefficient: for a model that couples the batch, or one it cannot inspect."""
    return not isinstance(student, torch.nn.Module) or couples_batch(student)


def _penalty_weight(settings: ObjectiveSettings, gamma_weight: float) -> float:
    return gamma_weight * 0.5 * settings.sigma ** 2


def _builds_penalty(settings: ObjectiveSettings, gamma_weight: float) -> bool:
    return gamma_weight > 0 and settings.reps > 0


def boot_camp_loss(student: Callable, base: Callable, images: torch.Tensor, settings: ObjectiveSettings,
                   gamma_weight: float, draws: Draws | None = None) -> LossParts:
    """One step's objective with the paper's estimator, as one loss with graph. ``gamma_weight`` is the
    effective (class-count scaled, warmed-up) gamma; 0 gives the fidelity alone, with no penalty graph.

    Without ``draws`` the noise and projections come from torch's global generator.
    The base sees clean images under no_grad: gradients reach the student only.
    """
    with_penalty = _builds_penalty(settings, gamma_weight)
    x_tilde, logits, target, agreement = _student_forward(student, base, images, settings, draws, with_penalty)
    fid = fidelity(logits, target)
    if with_penalty:
        penalty = jl_fd_penalty(student, x_tilde, logits, settings.reps, settings.h,
                                None if draws is None else draws.projections)
    else:
        penalty = torch.zeros_like(fid)
    per_sample = fid + _penalty_weight(settings, gamma_weight) * penalty
    return LossParts(per_sample.mean(), fid.detach(), penalty.detach(), agreement, with_penalty)


def boot_camp_step(student: Callable, base: Callable, images: torch.Tensor, settings: ObjectiveSettings,
                   gamma_weight: float, draws: Draws | None = None,
                   backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> LossParts:
    """One step's objective AND its backward pass with ``settings.estimator`` (the loop's entry point).

    The student's .grad receives d loss / d weights (``backward`` is called more than once: the penalty's graphs
    are backpropagated one at a time, see certify_zoo.estimators). The returned loss is detached.

    ``settings.penalty_share`` < 1 ("jl"): the fidelity on the whole batch, the penalty on its first
    ``penalty_images`` (a random subset: the loader shuffles) from their own forward, its mean standing for the
    batch's.
    A lazy penalty (``settings.penalty_every`` = k) is the caller's schedule: per optimiser step ``step``,
    ``gamma_weight = lazy_weight(w, k) if penalty_due(step, k) else 0.0``; a weight of 0 is a fidelity-only step
    (the cheapest: one student forward and backward, one base forward, no penalty graph).
    """
    if not _builds_penalty(settings, gamma_weight):
        parts = boot_camp_loss(student, base, images, settings, gamma_weight, draws)
        backward(parts.loss)
        return replace(parts, loss=parts.loss.detach())
    on_share = settings.penalty_share < 1
    x_tilde, logits, target, agreement = _student_forward(student, base, images, settings, draws,
                                                          with_penalty=not on_share)
    paper = settings.estimator == "paper"
    w = _gaussian_projections(settings.reps, logits, draws) if paper else _jl_probes(settings, logits, draws)
    if on_share:  # fidelity of the whole batch now; the penalty on the first images, from their own forward
        fid = fidelity(logits, target)
        backward(fid.mean())
        chosen = penalty_images(images.shape[0], settings.penalty_share)
        x_tilde = x_tilde[:chosen].detach().requires_grad_(True)
        logits, w, fidelity_of = student(x_tilde), w[:, :chosen], None
    else:  # the penalty shares the batch's forward, whose backward carries the fidelity
        fid = fidelity(logits.detach(), target)

        def fidelity_of(student_logits):
            return fidelity(student_logits, target)
    weight = _penalty_weight(settings, gamma_weight)
    # the paper's estimator: all reps terms, the single-graph loss's gradient exactly (boot_camp_loss), one graph
    # alive at a time; "jl": probes of them, scaled to reps
    scale = 1.0 if paper else settings.reps / settings.probes
    penalty = scale * jl_probe_backward(student, x_tilde, logits, w, settings.h, weight * scale, backward,
                                        fidelity_of, exact_coefficient=paper or _needs_exact_coefficient(student))
    fid = fid.detach()
    # with the penalty on every image, boot_camp_loss's own sum: the same float32 roundings, the same loss to the bit
    loss = fid.mean() + weight * penalty.mean() if on_share else (fid + weight * penalty).mean()
    return LossParts(loss, fid, penalty, agreement)


def penalty_images(batch: int, share: float) -> int:
    """How many of a batch's images carry the penalty at ``share``: ceil(share * batch), at least 1."""
    return max(1, min(batch, math.ceil(share * batch - 1e-9)))


def _gaussian_projections(count: int, logits: torch.Tensor, draws: Draws | None) -> torch.Tensor:
    """The first ``count`` terms' w, count x B x C: the draws' projections (or fresh N(0, I/C) ones)."""
    if draws is not None:
        return draws.projections[:count].to(logits.dtype)
    return torch.randn((count, *logits.shape), device=logits.device, dtype=logits.dtype) / logits.shape[-1] ** 0.5


def _jl_probes(settings: ObjectiveSettings, logits: torch.Tensor, draws: Draws | None) -> torch.Tensor:
    """The "jl" estimator's w, probes x B x C: the first Gaussian ones, as Rademacher signs if asked."""
    w = _gaussian_projections(settings.probes, logits, draws)
    if settings.probe_distribution == "rademacher":
        w = torch.where(w >= 0, 1.0, -1.0).to(w.dtype) / logits.shape[-1] ** 0.5
    return w
