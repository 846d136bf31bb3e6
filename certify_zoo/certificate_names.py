"""The names of the certificates, as every output (card, plot, zoo) spells them: one place, imported by all."""
from __future__ import annotations

from statistics import NormalDist
from typing import Sequence

# Order and wording of certificates everywhere; the keys are those of certification.json's "certificates".
CERTIFICATE_LABELS = {"monte_carlo": "Monte-Carlo", "deterministic": "deterministic",
                      "deterministic_raw": "deterministic raw claim",
                      "deterministic_lipschitz": "deterministic Lipschitz"}
DETERMINISTIC = ("deterministic", "deterministic_raw", "deterministic_lipschitz")
# What the PGD audit speaks for: it attacks inside the reported (calibrated) radius, and the Lipschitz radius is
# never larger; the raw radius before calibration is larger, so the audit says nothing about it.
AUDITED = ("deterministic", "deterministic_lipschitz")
# a certificate block's calibration source when evaluate measured raw radii (calibrated=False, for the studies)
RAW_RADIUS_SOURCE = "none (raw radius)"
# What each certificate proves, as evaluate records it and the card states it.
CERTIFICATE_MEANING = {
    "deterministic": "one forward pass; radius sigma/2 (PhiInv(p1) - PhiInv(p2)) of softmax v(x). A proof only for "
                     "the exact Gaussian average of v, which the converted model approximates",
    "deterministic_raw": "the deterministic radius before calibration (kappa 1, temperature 1): what softmax v(x) "
                         "claims",
    "deterministic_lipschitz": "one forward pass; the paper's looser Lipschitz bound (p1 - p2) sigma / sqrt(2/pi), "
                               "calibrated like deterministic; same caveat",
    "monte_carlo": "Cohen et al. 2019 CERTIFY on v under N(0, sigma^2) pixel noise: holds with probability >= 1 - "
                   "alpha (Clopper-Pearson); abstentions count as wrong",
}
# Where a calibration's held-out images came from (calibration.images_from): a slice of the conversion data, usually
# images the base trained on, or --check-data, images it did not.
FROM_CONVERSION_DATA, FROM_CHECK_DATA = "conversion data", "check data"
# fewer held-out images than this and no deterministic radius is reported: a calibration on m images promises at
# most 1 / (m + 1) of claims broken (broken_share_bound), and below 19 that promise is weaker than 1 in 20 (on 12
# photos a tenth leaves 1 image, whose calibration promised at most half the claims)
MIN_CALIBRATION_IMAGES = 19


def broken_share_bound(held_out_images: int) -> float:
    """What a calibration's kappa promises on images it did not see: 1 / (m + 1) for m held-out images.

    kappa leaves every held-out image's calibrated radius unbroken by the audit's attack (selfcheck.refine), so an
    image drawn like them has its radius broken by that attack only if it is more fragile than all m of them: by
    exchangeability, a chance of at most 1 / (m + 1) (the split-conformal argument). A bound on the expected share
    of broken claims, not on one image; the margin and the cap usually keep the share far below it."""
    return 1.0 / (held_out_images + 1)


def count_held_out(images: int) -> str:
    """'1 held-out image', '9 held-out images': how every message counts them."""
    return f"{images} held-out image{'' if images == 1 else 's'}"


def too_few_to_calibrate(images: int, needed: int) -> str:
    """Why a calibration on ``images`` held-out images reports no radius (the self-check and the card say it)."""
    return (f"{count_held_out(images)} cannot calibrate a deterministic radius (a "
            f"calibration on m images promises at most 1 / (m + 1) of claims broken, {broken_share_bound(images):.0%} "
            f"here; at least {needed} images are needed)")


def monte_carlo_reach(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n estimation draws at alpha: all n draws of one class give the
    Clopper-Pearson bound pA_lower = alpha^(1/n), whatever the model, and R = sigma PhiInv(pA_lower). Certified
    accuracy beyond it is 0 for every model (2.46 sigma at n = 1000, alpha = 0.001): it counts draws, not
    robustness."""
    return sigma * NormalDist().inv_cdf(alpha ** (1.0 / n))


def reach_short_of(block: dict, sigma: float, radii: Sequence[float]) -> float | None:
    """The reach of a Monte-Carlo record (its n and alpha) when some of ``radii`` lie beyond it, else None: outputs
    say so beside the zeros there."""
    if "n" not in block or "alpha" not in block:
        return None
    reach = monte_carlo_reach(sigma, block["n"], block["alpha"])
    return reach if max(radii, default=0.0) > reach else None


def reach_clause(reach: float) -> str:
    """How a Monte-Carlo row (the card's) or certificate (predict's) names its reach, inside its parentheses."""
    return f"no radius above {reach:.3g} with n draws"


def reach_note(block: dict, sigma: float, radii: Sequence[float]) -> str | None:
    """The sentence the table's caption and the plot's notes give where ``reach_short_of`` finds a reach, else None."""
    reach = reach_short_of(block, sigma, radii)
    if reach is None:
        return None
    return f"Monte-Carlo n={block['n']} certifies no radius above {reach:.3g} (all n draws one class)"
