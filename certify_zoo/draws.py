"""Random draws keyed by (seed, step, position in the global batch), so results do not depend on the process count.

Under data parallelism each process holds a slice of the global batch. Drawing noise from a per-process
generator would tie the result to the number of processes, and with the same seed on every process (what
``set_seed`` does) every process would put the *same* noise on different images. Keying each image's draws
on its position in the global batch makes one process with batch 2B and two processes with batch B draw
exactly the same numbers, and gives every image of a global batch its own noise.
"""
from __future__ import annotations

import torch

from .objective import Draws, ObjectiveSettings

_MASK = (1 << 63) - 1


def draw_key(*parts: int) -> int:
    """A 63-bit seed mixed from integers (an LCG step per part): distinct tuples give unrelated seeds."""
    key = 0x2545F4914F6CDD1D
    for part in parts:
        key = (key * 6364136223846793005 + int(part) * 0x9E3779B97F4A7C15 + 1442695040888963407) & _MASK
    return key


def noised_mask(seed: int, step: int, global_size: int, noise_prob: float) -> torch.Tensor:
    """Which images of the global batch get noise: a random round(noise_prob * size), the same on every process."""
    order = torch.randperm(global_size, generator=torch.Generator().manual_seed(draw_key(seed, step)))
    mask = torch.zeros(global_size, dtype=torch.bool)
    mask[order[: int(round(noise_prob * global_size))]] = True
    return mask


def keyed_draws(seed: int, step: int, offset: int, global_size: int, image_shape: torch.Size, num_classes: int,
                settings: ObjectiveSettings, device: torch.device) -> Draws:
    """Draws for the images at positions offset .. offset + B - 1 of a global batch of ``global_size`` images.

    ``step`` counts micro-batches, ``image_shape`` is the local batch's shape (B x C x H x W).
    """
    batch = image_shape[0]
    noised = noised_mask(seed, step, global_size, settings.noise_prob)[offset: offset + batch].to(device)
    generator = torch.Generator(device=device)
    noise = torch.empty(image_shape, device=device)
    projections = torch.empty(settings.reps, batch, num_classes, device=device)
    for j in range(batch):
        generator.manual_seed(draw_key(seed, step, offset + j))
        noise[j] = torch.randn(image_shape[1:], generator=generator, device=device)
        projections[:, j] = torch.randn(settings.reps, num_classes, generator=generator, device=device)
    noise *= settings.sigma * noised.view(-1, *([1] * (len(image_shape) - 1)))
    return Draws(noise, noised, projections / num_classes ** 0.5)
