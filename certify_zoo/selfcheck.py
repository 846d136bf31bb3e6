"""The end of a conversion: is the student still the base's classifier, and do its radii hold near its data?

Measured on conversion images that were set aside (never trained on), without labels: the student's own
predictions are the labels. The result is the model's calibration, kappa <= 1: every deterministic radius it
reports is kappa times the raw sigma/2 (PhiInv(p1) - PhiInv(p2)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .audit import PGDSettings, pgd_l2
from .certify import certify_deterministic
from .draws import draw_key
from .smoothness import RhoSummary, calibration_factor, neighbours, rho

SELF_CHECK_PGD = PGDSettings(steps=100, restarts=2)
SMALL_KAPPA = 0.5  # below this the conversion did not smooth the model: its radii are mostly calibration


@dataclass
class SelfCheck:
    images: int
    agreement: float  # student top-1 == base top-1 on the clean held-out images
    rho: RhoSummary  # on the held-out images and one neighbour each, sigma/2 away
    attacked: int
    counterexamples: int  # PGD flips inside the raw claimed radius
    kappa: float
    witnesses: dict
    pgd: PGDSettings

    def calibration(self) -> dict:
        """What certify-zoo stores with the model and applies to every deterministic radius it reports."""
        return {"kappa": round(self.kappa, 4), "method": "min(1, PGD witness, 1 / max rho) on held-out conversion "
                "images (labels: the student's own predictions)", "images": self.images, **self.witnesses,
                "pgd": self.pgd.to_dict()}

    def to_record(self) -> dict:
        return {"held_out_images": self.images, "agreement_with_base": round(self.agreement, 4),
                "rho": self.rho.to_dict(), "audit": {"attacked": self.attacked,
                                                    "counterexamples_within_raw_radius": self.counterexamples,
                                                    **self.pgd.to_dict()},
                "kappa": round(self.kappa, 4)}

    def summary_line(self) -> str:
        return (f"self-check on {self.images} held-out images: agreement with base {self.agreement:.1%}; rho median "
                f"{self.rho.median:.2f}, 99th pct {self.rho.p99:.2f}, {self.rho.share_above_1:.1%} above 1; PGD "
                f"({self.pgd.steps} steps, {self.pgd.restarts} restarts) {self.counterexamples} of {self.attacked} "
                f"claims broken; kappa {self.kappa:.3f} (deterministic radii reported x kappa)")

    def warnings(self) -> list[str]:
        found = []
        if self.kappa < SMALL_KAPPA:
            found.append(f"kappa {self.kappa:.3f}: the conversion did not smooth the model (rho up to "
                         f"{self.rho.max:.2f}); its deterministic radii are cut to {self.kappa:.0%}. Let --gamma be "
                         "auto, or raise it, or train longer.")
        if self.agreement < 0.9:
            found.append(f"the student agrees with the base on only {self.agreement:.0%} of held-out images")
        return found


def self_check(student, base, images: torch.Tensor, sigma: float, seed: int,
               pgd: PGDSettings = SELF_CHECK_PGD, batch_size: int = 64) -> SelfCheck:
    """Agreement, rho and a PGD audit of the raw radii on ``images`` (clean, held out), and the resulting kappa."""
    generator = torch.Generator(device=images.device).manual_seed(draw_key(seed, 0x5E1F))
    rho_values = rho(student, torch.cat([images, neighbours(images, sigma / 2, generator)]), sigma, batch_size)
    ratios, attacked, broken, agree = [], 0, 0, 0
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        with torch.no_grad():
            logits = student(chunk)
            agree += int((logits.argmax(-1) == base(chunk).argmax(-1)).sum())
        claim = certify_deterministic(logits, sigma)
        chosen = claim.radius > 0
        if not chosen.any():
            continue
        result = pgd_l2(student, chunk[chosen], claim.prediction[chosen], claim.radius[chosen], pgd, generator)
        attacked += int(chosen.sum())
        broken += int(result.flipped.sum())
        ratios.append(torch.where(result.flipped, result.distance / claim.radius[chosen].cpu(),
                                  torch.full_like(result.distance, float("inf"))))
    kappa, witnesses = calibration_factor(torch.cat(ratios) if ratios else torch.zeros(0), rho_values)
    return SelfCheck(images.shape[0], agree / max(1, images.shape[0]), RhoSummary.of(rho_values), attacked, broken,
                     kappa, witnesses, pgd)
