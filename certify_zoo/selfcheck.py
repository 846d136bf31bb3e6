"""The end of a conversion: is the student still the base's classifier, and do its radii hold near its data?

Measured on conversion images that were set aside (never trained on), without labels: the student's own
predictions are the labels. The result is the model's calibration (certify.Calibration): every deterministic radius
it reports is kappa <= 1 times sigma/2 (PhiInv(p1) - PhiInv(p2)) of its softmax at a temperature T. For each T of a
small grid, kappa is what the PGD audit and rho of the held-out images allow (smoothness.calibration_factor); of the
T whose kappa could stand (at least WITHDRAW_BELOW), the one whose calibrated radii are largest on average wins. A
converted model's softmax is softer than its Gaussian average needs (its raw radius stays far below the Monte-Carlo
one); a lower T takes that back where the audit allows it, and T = 1 (the paper's radius) wins when it does not.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .audit import PGDSettings, pgd_l2
from .certificate_names import (FROM_CONVERSION_DATA, MIN_CALIBRATION_IMAGES, broken_share_bound,
                                count_held_out, too_few_to_calibrate)
from .certificates import certify_deterministic, forward_piece
from .draws import draw_key
from .smoothness import ALONE, RhoSummary, Shard, calibration_factor, chunks, pgd_witness, rho_at_probe_points
from .wording import counted

SELF_CHECK_PGD = PGDSettings(steps=100, restarts=2)
# the refinement attacks the calibrated radii as evaluate's default audit does (steps, restarts), so that the
# calibration passes on the held-out images the very test the evaluation applies
REFINE_PGD = PGDSettings(steps=100, restarts=4)
REFINE_ROUNDS = 6
# kappa never exceeds this, whatever the held-out images showed: they are a sample, and the evaluation's images are
# more (a BatchNorm CNN whose 128 held-out images gave no witness below 1 had 2 of 290 evaluation claims broken)
KAPPA_CAP = 0.8
# below this the raw radius overclaims more than 3x on held-out images: the model did not smooth enough for a
# one-forward-pass radius to be trusted on images the calibration did not see (a ConvNeXt calibrated at 0.16-0.27
# still had 1 claim in 170 broken on each of 4 seeds), so none is reported: kappa 0, the Monte-Carlo certificate stands
WITHDRAW_BELOW = 0.3
SMALL_KAPPA = 0.5  # below this the conversion did not smooth the model: its radii are mostly calibration
# a held-out slice on which the base predicts one class this often (with at least 5 classes) looks drawn from one part
# of class-ordered data (a stream's first rows): its calibration then speaks for that class
ONE_CLASS_SHARE = 0.5
TEMPERATURES = (1.0, 0.7, 0.5)  # softmax temperatures tried by the calibration, the paper's first
# a base prediction whose top two softmax probabilities are closer than this is a near-tie: fine-tuning at any gamma
# changes it (20 shipped photos unlike EfficientNet-Lite2's training data, 17 of them near-ties, cost its student the
# agreement floor within 20 steps at the controller's lowest gamma, which then stayed there for 200 steps)
NEAR_TIE_MARGIN = 0.1
AUDIT_KEY = 0xA0D1  # the attacks' random starts: keyed on (seed, AUDIT_KEY, stage), stage 0 the refinement


def top_class_share(predictions: torch.Tensor) -> float:
    """The share of ``predictions`` (class indices) that are the commonest class among them (0 for none)."""
    return float(predictions.bincount().max()) / predictions.numel() if predictions.numel() else 0.0


def one_class_warning(share: float, images: int, num_classes: int) -> str | None:
    """A warning when the base predicts one class for more than ONE_CLASS_SHARE of the held-out images (with at least
    5 classes and enough images to calibrate), else None."""
    if num_classes < 5 or images < MIN_CALIBRATION_IMAGES or share <= ONE_CLASS_SHARE:
        return None
    return (f"the base predicts one class for {share:.0%} of the {count_held_out(images)}: if the data are ordered "
            "by class (a stream's first rows are the held-out slice), gamma and the calibration are measured on that "
            "class alone. Give --check-data a shuffled source of unseen images.")


def top_two_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per image, the softmax probability of the top class minus the runner-up's."""
    top = logits.float().softmax(-1).topk(min(2, logits.shape[-1]), dim=-1).values
    return top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]


@dataclass(frozen=True)
class BaseAnswers:
    """The frozen base's answers on the held-out images, computed once per conversion: its top-1, what the student's
    agreement is measured against, and its top-two margin. The agreement counts every image, near-ties (margin below
    NEAR_TIE_MARGIN) too, although any fine-tuning changes them: leaving them out of the gamma controller's floor
    (a prototype, gamma study) let the controller keep states further from the base on a ViT with 6-11% near-ties,
    at less clean accuracy on every seed, and left a real EfficientNet-Lite2 with three sure check photos, each
    change of which breached the floor. The agreement where the base is sure is a diagnostic: how much of a
    shortfall the near-ties are."""

    top1: torch.Tensor
    margin: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> "BaseAnswers":
        return cls(logits.argmax(-1), top_two_margin(logits))

    @property
    def near_ties(self) -> int:
        return int((self.margin < NEAR_TIE_MARGIN).sum())

    def near_tie_warning(self, agreement_floor: float) -> str | None:
        """A warning when more of the images are near-ties than the agreement floor lets change, else None: their
        changes alone can hold the student below the floor."""
        images = self.margin.numel()
        share = self.near_ties / images if images else 0.0
        if share <= 1 - agreement_floor:
            return None
        return (f"the base's top two classes are within {NEAR_TIE_MARGIN:g} of each other on {share:.0%} of the "
                f"{count_held_out(images)}, more than the {1 - agreement_floor:.0%} of changed predictions the "
                f"agreement floor ({agreement_floor:.0%}) allows: near-ties change under any fine-tuning, so gamma may "
                "be held down for them and the student left unsmoothed. Give --check-data images like the conversion "
                "data, on which the base is sure.")

    def agreement(self, logits: torch.Tensor) -> float:
        """The share of the images on which ``logits`` (the student's) have the base's top-1 (1 for none)."""
        return float((logits.argmax(-1) == self.top1).float().mean()) if self.top1.numel() else 1.0

    def sure_agreement(self, logits: torch.Tensor) -> float | None:
        """The same on the images the base is sure of; None where there are none, or no near-tie to leave out."""
        sure = self.margin >= NEAR_TIE_MARGIN
        if not sure.any() or bool(sure.all()):
            return None
        return float((logits.argmax(-1)[sure] == self.top1[sure]).float().mean())


def broken_share_p_value(broken: int, attacked: int, bound: float) -> float:
    """P(at least ``broken`` of ``attacked`` claims broken) if each broke with probability ``bound``: small when an
    audit broke more claims than the calibration's promise allows (one break in a small audit does not say much)."""
    if broken <= 0:
        return 1.0
    from scipy.stats import binom

    return float(binom.sf(broken - 1, attacked, bound))


class Tempered(torch.nn.Module):
    """logits / T: the model whose softmax the calibrated radius reads (same prediction, sharper probabilities)."""

    def __init__(self, model, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) / self.temperature


@dataclass
class SelfCheck:
    images: int
    agreement: float  # student top-1 == base top-1 on the clean held-out images
    rho: RhoSummary  # on the held-out images, a random neighbour each, and points along each claimed radius
    attacked: int
    counterexamples: int  # PGD flips inside the raw claimed radius
    kappa: float
    witnesses: dict
    pgd: PGDSettings
    temperature: float = 1.0
    candidates: list[dict] | None = None  # every temperature tried: its kappa and mean calibrated radius
    refinement: list[dict] | None = None  # kappa after each attack of the calibrated radii, until none broke
    source: str = FROM_CONVERSION_DATA  # where the held-out images came from
    top_class_share: float = 0.0  # the share of held-out images whose base top-1 is the slice's commonest class
    num_classes: int = 0
    near_ties: int = 0  # held-out images on which the base is not sure (BaseAnswers)
    sure_agreement: float | None = None  # the agreement on the others (where there are both)

    def calibration(self) -> dict:
        """What certify-zoo stores with the model and applies to every deterministic radius it reports."""
        return {"kappa": round(self.kappa, 4), "temperature": self.temperature,
                "broken_share_bound": round(broken_share_bound(self.images), 4),
                "method": "for each temperature T, kappa = min(1, PGD witness, 1 / max rho) on the held-out images "
                          "(labels: the student's own predictions), the PGD witness taken over the flips found at "
                          "every temperature; of the T whose kappa is at least "
                          f"{WITHDRAW_BELOW}, the one with the largest mean calibrated radius on them; kappa then "
                          "shrunk until an attack of the calibrated radii finds no flip, capped at "
                          f"{KAPPA_CAP}, and 0 (no deterministic radius) when no T reaches {WITHDRAW_BELOW}, below "
                          f"it after the attack, or on fewer than {MIN_CALIBRATION_IMAGES} held-out images",
                "images": self.images, "images_from": self.source, **self.witnesses, "pgd": self.pgd.to_dict(),
                "candidates": self.candidates or [], "refinement": self.refinement or []}

    def to_record(self) -> dict:
        return {"held_out_images": self.images, "agreement_with_base": round(self.agreement, 4),
                **({"base_near_ties": self.near_ties, "agreement_where_base_sure": round(self.sure_agreement, 4)}
                   if self._where_sure() else {}),
                "rho": self.rho.to_dict(), "audit": {"attacked": self.attacked,
                                                    "counterexamples_within_raw_radius": self.counterexamples,
                                                    **self.pgd.to_dict()},
                "base_top_class_share": round(self.top_class_share, 4),
                "kappa": round(self.kappa, 4), "temperature": self.temperature, "warnings": self.warnings()}

    def summary_line(self) -> str:
        return (f"self-check on {count_held_out(self.images)} ({self.source}): agreement with base "
                f"{self.agreement:.1%}{self._where_sure()}; rho median {self.rho.median:.2f}, 99th pct "
                f"{self.rho.p99:.2f}, {self.rho.share_above_1:.1%} above 1; PGD "
                f"({self.pgd.steps} steps, {self.pgd.restarts} restarts) {self.counterexamples} of {self.attacked} "
                f"claims broken; calibration: temperature {self.temperature:g}, kappa {self.kappa:.3f} (reported "
                f"radius = kappa x the radius of softmax(logits / temperature))")

    def _where_sure(self) -> str:
        if self.sure_agreement is None:
            return ""
        return f" ({self.sure_agreement:.1%} on the {self.images - self.near_ties} the base is sure of)"

    def warnings(self) -> list[str]:
        found = []
        if self.images < MIN_CALIBRATION_IMAGES:
            found.append(f"no deterministic radius: {too_few_to_calibrate(self.images, MIN_CALIBRATION_IMAGES)}; "
                         "only the Monte-Carlo certificate stands. Give --check-data a folder of unseen images, or "
                         "convert on more data (a tenth of it is held out).")
        elif self.kappa == 0.0:
            found.append(f"no deterministic radius: on held-out images the raw radius overclaimed more than "
                         f"{1 / WITHDRAW_BELOW:.0f}x (rho up to {self.rho.max:.2f}); the conversion did not smooth the "
                         f"model enough, and only its Monte-Carlo certificate stands. {SMOOTH_MORE}")
        elif self.kappa < SMALL_KAPPA:
            found.append(f"kappa {self.kappa:.3f}: the conversion did not smooth the model (rho up to "
                         f"{self.rho.max:.2f}); its deterministic radii are cut to {self.kappa:.0%}. {SMOOTH_MORE}")
        if self.agreement < 0.9:
            found.append(f"the student agrees with the base on only {self.agreement:.0%} of held-out images"
                         + self._where_sure())
        one_class = one_class_warning(self.top_class_share, self.images, self.num_classes)
        if one_class:
            found.append(one_class)
        return found


# what smooths a model further, whichever way gamma was set (the self-check does not know)
SMOOTH_MORE = "More steps smooth it further (--epochs); with a fixed --gamma, let it be auto or raise it."


def without_held_out_images() -> dict:
    """The calibration a conversion stores when it set no image aside (--check-images 0, or data too small to spare
    one): kappa 0, as on fewer than MIN_CALIBRATION_IMAGES: a raw radius no attack has checked is no certificate."""
    return {"kappa": 0.0, "temperature": 1.0, "broken_share_bound": round(broken_share_bound(0), 4),
            "method": f"no held-out images: no deterministic radius (at least {MIN_CALIBRATION_IMAGES} are needed)",
            "images": 0, "min_images": MIN_CALIBRATION_IMAGES}


def self_check(student, base: BaseAnswers, images: torch.Tensor, sigma: float, seed: int,
               pgd: PGDSettings = SELF_CHECK_PGD, batch_size: int = 64,
               temperatures: tuple[float, ...] = TEMPERATURES, source: str = FROM_CONVERSION_DATA,
               report: Callable[[str], None] = lambda line: None, shard: Shard = ALONE) -> SelfCheck:
    """Agreement, rho and a PGD audit on ``images`` (clean, held out) at each temperature; the calibration whose
    radii are largest on average. The record's rho and audit are those of the paper's radius (T = 1). ``base``: the
    base's answers on ``images``, what the student's agreement is measured against. ``report`` gets a line as each
    stage ends: at ImageNet sizes on a CPU one stage takes minutes, after a training bar that has already finished.
    ``shard``: this process's share of the gradients and attacks under N processes (smoothness.Shard), every
    process ending with the same record, bit for bit one process's."""
    started = time.perf_counter()
    # below MIN_CALIBRATION_IMAGES kappa is 0 whatever is measured: T = 1 only, for the record
    calibrating = images.shape[0] >= MIN_CALIBRATION_IMAGES
    temperatures = temperatures if calibrating else (1.0,)
    report(f"self-check of {count_held_out(images.shape[0])}: rho and PGD ({pgd.steps} steps x {pgd.restarts} "
           f"restarts) at temperature" + (f"s {', '.join(f'{t:g}' for t in temperatures)}, then, if a kappa "
                                          f"reaches {WITHDRAW_BELOW:g}, PGD inside the calibrated radii until it "
                                          "finds no flip" if calibrating else
                                          f" 1 only (fewer than {MIN_CALIBRATION_IMAGES}: no calibration)"))
    with torch.no_grad():
        logits = torch.cat([student(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])
    trials = []
    claims = {temperature: certify_deterministic(logits, sigma, temperature) for temperature in temperatures}
    flips = torch.full((images.shape[0],), float("inf"))  # per image, the shortest flip any attack found so far
    for stage, temperature in enumerate(temperatures, 1):
        claim = claims[temperature]
        known = bound_by_known_flips(flips, claim.radius)
        if known < WITHDRAW_BELOW:  # the flips already found rule this temperature out: no attack can raise its kappa
            broken = int((flips < claim.radius.cpu()).sum())
            trials.append((float((known * claim.radius).mean()), temperature, known, {"from_known_flips": True},
                           None, 0, broken))
            report(f"self-check {stage}/{len(temperatures)}: temperature {temperature:g}: not attacked, the flips "
                   f"found already put its kappa at most {known:.3f} ({time.perf_counter() - started:.0f} s)")
            continue
        model = student if temperature == 1.0 else Tempered(student, temperature)
        # every temperature's rho at the same probe points
        probes = torch.Generator(device=images.device).manual_seed(draw_key(seed, 0x5E1F))
        rho_values = rho_at_probe_points(model, images, sigma, probes, shard, batch_size)
        distances, attacked, broken = _audit(student, images, claim, pgd, draw_key(seed, AUDIT_KEY, stage),
                                             batch_size, shard)
        flips = torch.minimum(flips, distances)
        kappa, witnesses = calibration_factor(flip_ratios(distances, claim.radius), rho_values)
        mean_radius = float((kappa * claim.radius).mean())
        trials.append((mean_radius, temperature, kappa, witnesses, rho_values, attacked, broken))
        report(f"self-check {stage}/{len(temperatures)}: temperature {temperature:g}: {broken} of {attacked} claims "
               f"broken{f', kappa {kappa:.3f}' if calibrating else ''} ({time.perf_counter() - started:.0f} s)")
    # a sharper T's attack reaches further out and can find, inside the radii of a higher T, a flip that T's own
    # attack missed: every flip found bounds every temperature's kappa
    trials = [bounded_by_flips(trial, flips, claims[trial[1]].radius) for trial in trials]
    paper = trials[0]
    best = best_surviving(trials)
    candidates = [{"temperature": t, "kappa": round(k, 4), "mean_calibrated_radius": round(m, 4),
                   "counterexamples_within_claim": b, "attacked": not w.get("from_known_flips", False)}
                  for m, t, k, w, _, _, b in trials]
    refined = calibrating and best is not None
    if refined:
        kappa, refinement = refine(student, images, claims[best[1]], best[2], best[3]["margin"],
                                   draw_key(seed, AUDIT_KEY, 0), batch_size, shard=shard)
        attacks = sum(entry["attacked"] is not None for entry in refinement)
        report(f"self-check: temperature {best[1]:g} chosen; PGD inside its calibrated radii: kappa {best[2]:.3f} -> "
               f"{kappa:.3f} in {counted(attacks, 'attack')} ({time.perf_counter() - started:.0f} s)")
    else:
        best, refinement = paper, []  # withdrawn (or too few images): the record keeps the paper's radius
        kappa = best[2]
        if calibrating:
            report(f"self-check: no temperature's kappa reaches {WITHDRAW_BELOW:g} (largest "
                   f"{max(trial[2] for trial in trials):.3f}): no deterministic radius, so no attack of calibrated "
                   f"radii ({time.perf_counter() - started:.0f} s)")
    witnesses = {**best[3], "by_refinement": round(kappa, 4) if refined else None, "cap": KAPPA_CAP,
                 "withdrawn_below": WITHDRAW_BELOW, "min_images": MIN_CALIBRATION_IMAGES}
    kappa = final_kappa(kappa, images.shape[0])
    return SelfCheck(images.shape[0], base.agreement(logits), RhoSummary.of(paper[4]), paper[5], paper[6],
                     kappa, witnesses, pgd, best[1], candidates, refinement, source, top_class_share(base.top1),
                     logits.shape[-1], base.near_ties, base.sure_agreement(logits))


def best_surviving(trials: list[tuple]) -> tuple | None:
    """The trial (mean calibrated radius, temperature, kappa, ...) whose calibrated radii are largest on average,
    among those whose kappa is at least WITHDRAW_BELOW; ties: the higher temperature. None when no kappa is: the
    refinement only shrinks kappa, so such a trial ends withdrawn whatever follows. (Taking the largest mean radius
    over every trial chose a sharper temperature whose kappa was doomed over one whose radius would have stood.)"""
    surviving = [trial for trial in trials if trial[2] >= WITHDRAW_BELOW]
    return max(surviving, key=lambda trial: (round(trial[0], 6), trial[1])) if surviving else None


def flip_ratios(distances: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Flip distance / claimed radius of each image with a claim (inf where no flip was found)."""
    claimed = radius.cpu() > 0
    return distances[claimed] / radius.cpu()[claimed]


def bound_by_known_flips(flips: torch.Tensor, radius: torch.Tensor, margin: float = 0.8) -> float:
    """The largest kappa that the flips already found (per image, the shortest; inf for none) leave the radii
    ``radius``: calibration_factor's PGD witness for them. A flip is a point of another class at that distance from
    the image whatever temperature the radius was read at, so one found while attacking the radii of T = 1 bounds
    the kappa of every sharper T, whose radius of that image is larger: on an unsmoothed student (EfficientNet-Lite2
    after 20 steps, 18 of 20 claims broken at T = 1) the attacks of T = 0.7 and 0.5 could only end below
    WITHDRAW_BELOW, and took two thirds of the self-check."""
    return min(1.0, pgd_witness(flip_ratios(flips, radius), margin))


def bounded_by_flips(trial: tuple, flips: torch.Tensor, radius: torch.Tensor) -> tuple:
    """A trial (mean calibrated radius, temperature, kappa, witnesses, ...) with its kappa lowered to what the flips
    found (per image, the shortest, at any temperature) leave its radii ``radius``, where they leave less."""
    mean_radius, temperature, kappa, witnesses, *rest = trial
    known = bound_by_known_flips(flips, radius)
    if known >= kappa:
        return trial
    return (float((known * radius).mean()), temperature, known, {**witnesses, "by_known_flips": round(known, 4)},
            *rest)


def final_kappa(refined: float, images: int) -> float:
    """The refined kappa, capped at KAPPA_CAP, or 0 (no deterministic radius) when it fell below WITHDRAW_BELOW or
    was measured on fewer than MIN_CALIBRATION_IMAGES held-out images."""
    return 0.0 if refined < WITHDRAW_BELOW or images < MIN_CALIBRATION_IMAGES else min(refined, KAPPA_CAP)


def refine(student, images: torch.Tensor, claim, kappa: float, margin: float, key: int, batch_size: int,
           pgd: PGDSettings = REFINE_PGD, rounds: int = REFINE_ROUNDS,
           shard: Shard = ALONE) -> tuple[float, list[dict]]:
    """Attack the calibrated radii kappa * R themselves, as the evaluation's audit will, and shrink kappa below every
    flip found (a margin under the shortest), until an attack finds none. An attack inside the larger raw radius
    takes coarser steps and reports flips along its own rays only, so it can miss closer ones."""
    history = []
    for attack in range(rounds):
        scaled = replace(claim, radius=claim.radius * kappa)
        distances, attacked, broken = _audit(student, images, scaled, pgd, draw_key(key, attack), batch_size, shard)
        history.append({"kappa": round(kappa, 4), "attacked": attacked, "broken": broken})
        if broken == 0:
            return kappa, history
        kappa *= pgd_witness(flip_ratios(distances, scaled.radius), margin)  # broken > 0: a flip inside the claim
    history.append({"kappa": round(kappa, 4), "attacked": None, "broken": None})  # rounds spent: not re-attacked
    return kappa, history


def _audit(student, images: torch.Tensor, claim, pgd: PGDSettings, key: int, batch_size: int,
           shard: Shard = ALONE):
    """PGD inside each claimed radius (the student's own predictions as labels): the flip distance of each image
    (inf where nothing was found or nothing was claimed), images attacked, claims broken.

    The images are attacked in pieces of a forward's size, each with random starts of its own (keyed on ``key`` and
    the piece), so that a piece's answer is the same whoever attacks it: under N processes each attacks every N-th
    piece and ``shard.join`` adds the parts (the others' pieces are 0 in each part), bit for bit one process's answer.
    """
    distances = torch.zeros(images.shape[0])
    counts = torch.zeros(2, dtype=torch.int64)  # attacked, broken
    piece = forward_piece(batch_size, images.shape[1:], images.device.type)
    for index, (start, stop) in enumerate(chunks(images.shape[0], piece)):
        if not shard.measures(index):
            continue
        radius, prediction = claim.radius[start:stop], claim.prediction[start:stop]
        chosen = radius > 0
        distances[start:stop] = float("inf")
        if not chosen.any():
            continue
        generator = torch.Generator(device=images.device).manual_seed(draw_key(key, index))
        result = pgd_l2(student, images[start:stop][chosen], prediction[chosen], radius[chosen], pgd, generator,
                        piece)
        counts += torch.tensor([int(chosen.sum()), int(result.flipped.sum())])
        distance = result.distance.float().cpu()
        distances[start:stop][chosen.cpu()] = torch.where(result.flipped.cpu(), distance,
                                                          torch.full_like(distance, float("inf")))
    distances, counts = shard.join(distances), shard.join(counts)
    return distances, int(counts[0]), int(counts[1])
