"""Certificates as pure functions: deterministic radii from one forward pass, and Cohen et al.'s CERTIFY.

Radii are L2 distances in [0,1] pixel space at the model's input size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# Probabilities are clipped this far inside (0, 1) so that PhiInv stays finite in float32:
# PhiInv(1 - 6e-8) ~ 5.3, so a saturated softmax gives a large but finite radius.
_PROB_EPS = float(torch.finfo(torch.float32).eps) / 2
ABSTAIN = -1


@dataclass
class DeterministicCertificate:
    """Per image: predicted class, top-two probabilities of softmax v(x), and both radii."""

    prediction: torch.Tensor
    p1: torch.Tensor
    p2: torch.Tensor
    radius: torch.Tensor  # Gaussian-smoothing bound, the default everywhere
    radius_lipschitz: torch.Tensor  # the paper's looser Lipschitz bound


def gaussian_radius(p1: torch.Tensor, p2: torch.Tensor, sigma: float) -> torch.Tensor:
    """sigma/2 * (PhiInv(p1) - PhiInv(p2)): the radius of the exact Gaussian-smoothed classifier (Salman et al.)."""
    lo, hi = _PROB_EPS, 1.0 - _PROB_EPS
    radius = 0.5 * sigma * (torch.special.ndtri(p1.clamp(lo, hi)) - torch.special.ndtri(p2.clamp(lo, hi)))
    return radius.clamp_min(0.0)


def lipschitz_radius(p1: torch.Tensor, p2: torch.Tensor, sigma: float) -> torch.Tensor:
    """(p1 - p2) * sigma / sqrt(2/pi): the paper's bound from the smoothed model's Lipschitz constant."""
    return ((p1 - p2) * (sigma / math.sqrt(2.0 / math.pi))).clamp_min(0.0)


def certify_deterministic(logits: torch.Tensor, sigma: float, temperature: float = 1.0) -> DeterministicCertificate:
    """One forward pass worth of certificates for a batch of logits (B x C), all on the logits' device
    (``temperature``: of softmax(logits / T), for a calibrated radius; 1 is the paper's)."""
    probs = (logits.float() / temperature).softmax(-1)
    top = probs.topk(2, dim=-1)
    p1, p2 = top.values[:, 0], top.values[:, 1]
    return DeterministicCertificate(top.indices[:, 0], p1, p2, gaussian_radius(p1, p2, sigma),
                                    lipschitz_radius(p1, p2, sigma))


@dataclass(frozen=True)
class Calibration:
    """How a converted model turns softmax v(x) into the radius it reports, measured at the end of its conversion
    (certify_zoo.selfcheck): R = kappa * sigma/2 (PhiInv(p1) - PhiInv(p2)) of softmax(logits / temperature).

    kappa <= 1 shrinks the radius until an attack on held-out images finds nothing inside it and rho allows it; a
    temperature below 1 sharpens the softmax, which a converted model (smoother than its Gaussian average needs)
    can afford. Both are chosen on held-out images without labels; the prediction is the same at any temperature.
    """

    kappa: float = 1.0
    temperature: float = 1.0

    @classmethod
    def of(cls, metadata: dict | None) -> "Calibration":
        """The calibration stored in certify_zoo.json (none for a model without one: the raw radius)."""
        return cls.from_record((metadata or {}).get("calibration"))

    @classmethod
    def from_record(cls, stored: dict | None) -> "Calibration":
        """From a record's ``calibration`` block (certify_zoo.json, or a certificate in certification.json)."""
        stored = stored or {}
        return cls(float(stored.get("kappa", 1.0)), float(stored.get("temperature", 1.0)))

    @property
    def withdrawn(self) -> bool:
        """kappa 0: the conversion's self-check reported no deterministic radius (every radius 0, a claim of
        nothing)."""
        return self.kappa == 0

    def short(self) -> str:
        """How it reads beside a number: 'x0.69', 'x0.52 at T 0.7' when the temperature is not 1, or 'withdrawn
        (kappa 0)' when the conversion's self-check reported no radius."""
        if self.withdrawn:
            return "withdrawn (kappa 0)"
        return f"x{self.kappa:.2f}" + (f" at T {self.temperature:g}" if self.temperature != 1.0 else "")

    def certify(self, logits: torch.Tensor, sigma: float) -> DeterministicCertificate:
        """The reported certificate: class and top-two probabilities of softmax v(x), the calibrated radii."""
        plain = certify_deterministic(logits, sigma)
        if self.kappa == 1.0 and self.temperature == 1.0:
            return plain
        tempered = plain if self.temperature == 1.0 else certify_deterministic(logits, sigma, self.temperature)
        return DeterministicCertificate(plain.prediction, plain.p1, plain.p2, tempered.radius * self.kappa,
                                        tempered.radius_lipschitz * self.kappa)


def certified_accuracy(radii: torch.Tensor, correct: torch.Tensor, thresholds: Sequence[float]) -> list[float]:
    """Fraction of all images (abstentions count as wrong) that are correct with radius >= r, for each r."""
    radii, correct = torch.as_tensor(radii, dtype=torch.float64), torch.as_tensor(correct, dtype=torch.bool)
    if radii.numel() == 0:
        return [0.0 for _ in thresholds]
    return [float((correct & (radii >= r)).double().mean()) for r in thresholds]


def average_certified_radius(radii: torch.Tensor, correct: torch.Tensor) -> float:
    """ACR: mean over all images of the radius where correct, 0 otherwise."""
    radii, correct = torch.as_tensor(radii, dtype=torch.float64), torch.as_tensor(correct, dtype=torch.bool)
    return float((radii * correct).mean()) if radii.numel() else 0.0


def clopper_pearson_lower(successes: torch.Tensor, trials: int, alpha: float) -> torch.Tensor:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion, per entry."""
    from scipy.stats import beta

    k = successes.detach().cpu().double().numpy()
    lower = beta.ppf(alpha, k, trials - k + 1)
    return torch.as_tensor(lower).nan_to_num(0.0)  # k = 0 gives NaN: the bound is 0


@dataclass
class MonteCarloCertificate:
    """Per image: CERTIFY's class (or ABSTAIN), radius, pA lower bound, and the mean softmax over the noise samples."""

    prediction: torch.Tensor
    radius: torch.Tensor
    p_a_lower: torch.Tensor
    mean_probabilities: torch.Tensor


NOISY_BATCH_CAP = 10_000
# On a CPU a forward is fastest when its input is about 2 MiB (2^19 float32 elements: 3 images at 224 px, 170 at
# 32 px): larger forwards leave the caches, and the memory-matched batch below ran slower per image on every model
# measured, at 224 px too (benchmarks/noisy_batch.py, docs: benchmarks). A GPU gets its throughput from large
# batches, so there the input memory of ``batch_size`` 224 px images is kept.
CPU_NOISY_INPUT_ELEMENTS = 2 ** 19


def noisy_batch_size(batch_size: int, image_shape: Sequence[int], device_type: str, cap: int = NOISY_BATCH_CAP,
                     cpu_input_elements: int = CPU_NOISY_INPUT_ELEMENTS) -> int:
    """Noisy images per Monte-Carlo forward, at most ``cap``. On an accelerator: ``batch_size`` for a 3x224x224
    image, proportionally more for smaller images (the same input memory; the demo's 8x8 digits get the cap), never
    fewer than ``batch_size``. On a CPU (``device_type`` "cpu"): as many as fit in ``cpu_input_elements`` input
    elements, at least one."""
    pixels = max(1, math.prod(int(size) for size in image_shape))
    if device_type == "cpu":
        return max(1, min(cap, cpu_input_elements // pixels))
    return max(batch_size, min(cap, batch_size * 3 * 224 * 224 // pixels))


# The gradient checks (PGD, rho) forward and backward: on a CPU their best piece is larger than a forward's (a ViT's
# backward lost most in small pieces), measured by benchmarks/audit_batch.py (docs: benchmarks).
CPU_CHECK_INPUT_ELEMENTS = 2 ** 21


def forward_piece(batch_size: int, image_shape: Sequence[int], device_type: str,
                  cpu_input_elements: int = CPU_CHECK_INPUT_ELEMENTS) -> int:
    """Images per forward and backward of the gradient checks (PGD, rho): ``batch_size``, and on a CPU no more than
    fit in ``cpu_input_elements`` input elements (13 at 224 px), at least one."""
    return min(batch_size, noisy_batch_size(batch_size, image_shape, device_type,
                                            cpu_input_elements=cpu_input_elements))


def gap_to_gaussian_average(probabilities: torch.Tensor,
                            mean_probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, how far softmax v(x) is from E softmax v(x + eta) (estimated by Monte-Carlo): the max-abs and
    the L1 difference over classes."""
    difference = (probabilities.float() - mean_probabilities.float()).abs()
    return difference.max(-1).values, difference.sum(-1)


class Smooth:
    """The Gaussian-smoothed classifier g(x) = argmax_c P(f(x + eta) = c), eta ~ N(0, sigma^2 I) (Cohen et al. 2019).

    Batched over images and noise; counting happens on the device and syncs with the host once per call.
    Within a chunk the images share the noise draws: independence holds per image, which is what each
    certificate needs (Cohen et al. certify one image at a time).
    """

    def __init__(self, base_classifier: Callable[[torch.Tensor], torch.Tensor], num_classes: int, sigma: float):
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma

    def certify(self, images: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CERTIFY for each image: (class or ABSTAIN, L2 radius, pA lower bound).

        With probability at least 1 - alpha over the noise, each non-abstaining prediction equals g(x) and
        g is constant within the returned radius sigma * PhiInv(pA_lower). Abstains when pA_lower <= 1/2.
        """
        result = self.certify_with_mean(images, n0, n, alpha, batch_size, generator)
        return result.prediction, result.radius, result.p_a_lower

    def certify_with_mean(self, images: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                          generator: torch.Generator | None = None) -> "MonteCarloCertificate":
        """CERTIFY, plus the mean softmax over the same n estimation samples (an estimate of E softmax v(x + eta),
        which tells how closely v approximates its own Gaussian average; it plays no part in the guarantee)."""
        selection = self.sample_noise(images, n0, batch_size, generator).argmax(-1)
        counts, probability_sums = self.sample_noise(images, n, batch_size, generator, with_probabilities=True)
        n_a = counts.gather(1, selection.view(-1, 1)).squeeze(1)
        p_a_lower = clopper_pearson_lower(n_a, n, alpha).float()
        certified = p_a_lower > 0.5
        radius = torch.where(certified, self.sigma * torch.special.ndtri(p_a_lower.clamp(max=1 - 1e-12)),
                             torch.zeros_like(p_a_lower))
        prediction = torch.where(certified, selection.cpu(), torch.full_like(selection.cpu(), ABSTAIN))
        return MonteCarloCertificate(prediction, radius, p_a_lower, (probability_sums / n).cpu())

    def predict(self, images: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """PREDICT: g(x) per image, or ABSTAIN; wrong with probability at most alpha (two-sided binomial test)."""
        from scipy.stats import binomtest

        counts = self.sample_noise(images, n, batch_size, generator).cpu()
        top2 = counts.topk(2, dim=-1)
        result = []
        for (c1, c2), (n1, n2) in zip(top2.indices.tolist(), top2.values.tolist()):
            result.append(c1 if binomtest(n1, n1 + n2, 0.5).pvalue <= alpha else ABSTAIN)
        return torch.tensor(result)

    @torch.inference_mode()
    def sample_noise(self, images: torch.Tensor, num: int, batch_size: int, generator: torch.Generator | None,
                     with_probabilities: bool = False):
        """Class counts (B x C) of the base classifier's predictions on `num` noisy copies of each image;
        with_probabilities: also the sums (B x C) of its softmax over the same copies. At most ``batch_size``
        noisy images per forward."""
        count, shape = images.shape[0], images.shape[1:]
        counts = torch.zeros(count * self.num_classes, dtype=torch.long, device=images.device)
        sums = torch.zeros(count, self.num_classes, dtype=torch.float32, device=images.device)
        per_image = max(1, batch_size // count)  # a batch_size below count: one copy each, forwarded in pieces
        owner = torch.arange(count, device=images.device)
        remaining = num
        while remaining > 0:
            this = min(per_image, remaining)
            # `this` fresh noise draws per chunk, shared by all images of the chunk: each image still gets n
            # independent N(0, sigma^2 I) samples (its certificate is unchanged), while drawing Gaussians costs
            # 1/count of what it did (on a CPU it was ~12% of a ConvNeXt forward); one broadcast add builds the batch
            noise = torch.randn((this, *shape), device=images.device, dtype=images.dtype, generator=generator)
            noisy = torch.add(images.unsqueeze(1), noise.mul_(self.sigma).unsqueeze(0))
            logits = torch.cat([self.base_classifier(piece) for piece in noisy.view(count * this, *shape)
                                .split(batch_size)])
            predictions = logits.argmax(-1)
            counts += torch.bincount(owner.repeat_interleave(this) * self.num_classes + predictions,
                                     minlength=count * self.num_classes)
            if with_probabilities:
                sums += logits.float().softmax(-1).view(count, this, self.num_classes).sum(1)
            remaining -= this
        counts = counts.view(count, self.num_classes)
        return (counts, sums) if with_probabilities else counts
