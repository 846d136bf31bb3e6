"""Adversarial audit of claimed radii: L2 PGD tries to change a prediction inside the radius it claims.

A deterministic radius is a proof only for the exact Gaussian average of v, which the converted model
approximates; the audit looks for evidence against the claim. Finding nothing is not a proof: a clean
audit is reported as "no counterexample found by PGD (N points, S steps, R restarts)".

Pure functions over batches, on whatever device the model and images are on. Images are in [0,1]
pixel space at the model's input size, as everywhere in certify-zoo.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .wording import counted

ATTACKS = ("none", "pgd")


@dataclass(frozen=True)
class PGDSettings:
    steps: int = 100
    restarts: int = 4  # the first starts at the clean image, the others at uniform random points of the ball
    step_fraction: float = 2.5  # step size = step_fraction * radius / steps (Madry et al.'s rule)
    bisection_steps: int = 12  # shrink a counterexample along its ray to the smallest flipping distance found

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttackResult:
    """Per image: whether the prediction changed inside the ball, at what L2 distance, and to which class."""

    flipped: torch.Tensor  # bool
    distance: torch.Tensor  # float, NaN where not flipped
    adversarial_class: torch.Tensor  # long, -1 where not flipped
    perturbation: torch.Tensor | None = None  # the counterexample minus the image (zero where not flipped)


def margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y per row: positive exactly when the prediction is no longer y."""
    others = logits.float().scatter(1, target.view(-1, 1), float("-inf"))
    return others.max(1).values - logits.float().gather(1, target.view(-1, 1)).squeeze(1)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def _l2(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).norm(dim=1)


def project(images: torch.Tensor, delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Onto the L2 ball of each image's radius, then onto the [0,1] box (clipping never leaves the ball)."""
    scale = (radius / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    delta = delta * _per_image(scale, delta)
    return (images + delta).clamp(0.0, 1.0) - images


def random_in_ball(images: torch.Tensor, radius: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform point of each image's L2 ball (direction ~ Gaussian, norm ~ radius * U^(1/d)), then the box."""
    direction = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
    direction = direction / _per_image(_l2(direction).clamp_min(1e-12), direction)
    dims = images[0].numel()
    uniform = torch.rand(images.shape[0], device=images.device, dtype=images.dtype, generator=generator)
    return project(images, direction * _per_image(radius * uniform.pow(1.0 / dims), direction), radius)


def _prediction(model: Callable, images: torch.Tensor, piece: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(part).argmax(-1) for part in images.split(piece)])


def _margin_and_gradient(model: Callable, images: torch.Tensor, delta: torch.Tensor, target: torch.Tensor,
                         piece: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The margin at images + delta and its gradient in delta, one piece of images at a time (each image's margin
    depends on that image alone, in eval mode: the same values as one forward of the batch)."""
    losses, gradients = [], []
    for image, part, label in zip(images.split(piece), delta.split(piece), target.split(piece)):
        part = part.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = margin(model(image + part), label)
            (gradient,) = torch.autograd.grad(loss.sum(), part)
        losses.append(loss.detach())
        gradients.append(gradient)
    return torch.cat(losses), torch.cat(gradients)


def pgd_l2(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, target: torch.Tensor,
           radius: torch.Tensor, settings: PGDSettings = PGDSettings(),
           generator: torch.Generator | None = None, piece: int | None = None) -> AttackResult:
    """Try to change model's prediction away from `target` within L2 distance `radius` of each image (in [0,1]).

    Margin loss, normalised-gradient ascent, projection onto ball and box after each step, success checked at
    every iterate of every restart. A found counterexample is then shrunk along its ray by bisection, so the
    reported distance is (close to) the smallest flipping distance in that direction; every reported distance
    was checked by a forward pass. An image refuted from one start is not stepped further from it, and once every
    image of the batch is refuted, the remaining restarts are skipped (they could only shorten distances, not
    change the count). ``piece``: images per forward and
    backward (default: the whole batch; a CPU runs faster on pieces that stay in its caches).
    """
    radius = radius.to(images.device, images.dtype)
    count = images.shape[0]
    piece = max(1, piece or count)
    best = torch.full((count,), math.inf, device=images.device)
    best_delta = torch.zeros_like(images)
    step = _per_image(settings.step_fraction * radius / max(1, settings.steps), images)
    for restart in range(settings.restarts):
        delta = torch.zeros_like(images) if restart == 0 else random_in_ball(images, radius, generator)
        found_norm = torch.full((count,), math.inf, device=images.device)
        found_delta = torch.zeros_like(images)
        for iteration in range(settings.steps + 1):
            # only the images without a counterexample from this start are stepped: a later iterate of a found one
            # lies further along its ascent, and the bisection below shortens the one found along its ray (an
            # unsmoothed student with 18 of 20 claims broken early stepped all 20 for every step the last two took)
            searching = ~torch.isfinite(found_norm)
            if not searching.any():
                break  # every image already has a counterexample from this start
            rows = slice(None) if searching.all() else torch.nonzero(searching).flatten()  # no copy while all search
            loss, gradient = _margin_and_gradient(model, images[rows], delta[rows], target[rows], piece)
            found = loss > 0
            found_norm[rows] = torch.where(found, _l2(delta[rows]), found_norm[rows])
            found_delta[rows] = torch.where(_per_image(found, gradient), delta[rows], found_delta[rows])
            if iteration == settings.steps:
                break
            unit = gradient / _per_image(_l2(gradient).clamp_min(1e-12), gradient)
            delta[rows] = project(images[rows], delta[rows] + step[rows] * unit, radius[rows])
        flipped = torch.isfinite(found_norm)
        found_delta = _shrink_along_ray(model, images, found_delta, target, flipped, settings.bisection_steps,
                                        piece)
        shorter = flipped & (_l2(found_delta) < best)
        best = torch.where(shorter, _l2(found_delta), best)
        best_delta = torch.where(_per_image(shorter, images), found_delta, best_delta)
        if torch.isfinite(best).all():
            break  # every claim is already refuted: further restarts could only shorten the distances
    flipped = torch.isfinite(best)
    adversarial = _prediction(model, images + best_delta, piece)
    flipped = flipped & (adversarial != target)  # belt and braces: only verified counterexamples count
    best_delta = best_delta * _per_image(flipped, best_delta)
    distance = torch.where(flipped, _l2(best_delta), torch.full_like(best, math.nan))
    return AttackResult(flipped.cpu(), distance.cpu(), torch.where(flipped, adversarial, -1).cpu(), best_delta.cpu())


def _shrink_along_ray(model: Callable, images: torch.Tensor, delta: torch.Tensor, target: torch.Tensor,
                      flipped: torch.Tensor, steps: int, piece: int) -> torch.Tensor:
    """Bisection on t in (0, 1] keeping images + t * delta flipped (the box is convex: it stays inside). Only the
    flipped images are forwarded: the others keep their delta."""
    chosen = torch.nonzero(flipped).flatten()
    if chosen.numel() == 0:
        return delta
    images, ray, target = images[chosen], delta[chosen], target[chosen]
    low = torch.zeros(chosen.numel(), device=images.device)
    high = torch.ones(chosen.numel(), device=images.device)
    for _ in range(steps):
        middle = (low + high) / 2
        flips = _prediction(model, images + ray * _per_image(middle, ray), piece) != target
        high = torch.where(flips, middle, high)
        low = torch.where(flips, low, middle)
    delta = delta.clone()
    delta[chosen] = ray * _per_image(high, ray)
    return delta


def statement(attacked: int, counterexamples: int, settings: PGDSettings) -> str:
    """The one sentence every report prints beside a deterministic number. Never 'sound' or 'proven'."""
    how = f"{counted(settings.steps, 'step')}, {counted(settings.restarts, 'restart')}"
    if attacked == 0:  # every reported radius 0 (a withdrawn calibration, kappa 0), or no correct image to attack
        return "nothing to attack: no image has a reported radius above 0"
    if counterexamples == 0:
        return f"no counterexample found by PGD ({counted(attacked, 'point')}, {how})"
    return (f"PGD found {counted(counterexamples, 'counterexample')} among {counted(attacked, 'point')} inside their "
            "claimed radii "
            f"({100 * counterexamples / max(1, attacked):.1f}%; {how})")


def summarise_audit(claimed: torch.Tensor, attacked: torch.Tensor, result: AttackResult, indices: torch.Tensor,
                    settings: PGDSettings, certificate: str = "deterministic", names: Sequence[str] | None = None,
                    worst: int = 20) -> dict:
    """The audit record: counts, the sentence, and the worst counterexamples (smallest flip distance / claim)."""
    attacked = attacked.bool()
    flipped = result.flipped & attacked
    count, broken = int(attacked.sum()), int(flipped.sum())
    ratio = result.distance / claimed.clamp_min(1e-12)
    order = sorted(torch.nonzero(flipped).flatten().tolist(), key=lambda i: float(ratio[i]))[:worst]
    rows = []
    for i in order:
        row = {"index": int(indices[i]), "claimed_radius": float(claimed[i]),
               "flip_distance": float(result.distance[i]),
               "fraction_of_claim": float(ratio[i]), "adversarial_class": int(result.adversarial_class[i])}
        if names is not None:
            row["file"] = str(names[i])
        rows.append(row)
    return {"certificate": certificate, "attack": "L2 PGD on the margin loss, projected onto the claimed ball and "
            "onto [0,1]", **settings.to_dict(), "attacked": count, "counterexamples": broken,
            "counterexample_rate": broken / count if count else 0.0, "statement": statement(count, broken, settings),
            "worst": rows}
