"""How smooth a converted model is, measured without labels: rho, the gamma controller, and kappa.

rho(x) = sigma/2 * ||grad_x [PhiInv(p1(x)) - PhiInv(p2(x))]|| for the top two classes of softmax v(x), in [0,1]
pixel space. For the exact Gaussian average of a classifier every PhiInv(p_c) is 1/sigma-Lipschitz (Salman et al.
2019), so rho <= 1 everywhere, and that is what makes the deterministic radius R = sigma/2 (PhiInv(p1) - PhiInv(p2))
hold: along any path from x, the margin R(x) falls at rate at most rho, so the prediction cannot change before a
distance R / max rho. A converted model only approximates its Gaussian average; where rho > 1 its radius overclaims.

* ``rho`` measures it, one input gradient per point, at the points ``probe_points`` gives: the images, random
  neighbours, and points along each claimed radius towards the decision boundary.
* ``GammaController`` steers the penalty weight gamma during conversion so that a high quantile of rho over a
  held-out slice (and noisy points near it) falls to 1, while the student keeps agreeing with the base.
* ``calibration_factor`` turns the slice's rho and a PGD audit of the slice into kappa <= 1: the factor applied to
  every deterministic radius the model reports.

Pure functions and a small state machine; no I/O.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from .certificates import certify_deterministic, forward_piece

# the lr lever (GammaController.steers_lr) moves only while the penalty is at least this share of the loss: below it
# the fidelity still weighs more in the step's direction, and gamma is what tilts it
PENALTY_SHARE_FOR_LR = 0.5
# log-probabilities are floored here before PhiInv (float64 exp underflows below ~1e-308): only margins beyond
# PhiInv's float64 range (a probability within 1e-300 of 1) give a zero gradient
RHO_LOG_FLOOR = -690.0


def phi_inverse_margin(logits: torch.Tensor) -> torch.Tensor:
    """PhiInv(p1) - PhiInv(p2) of softmax(logits) for the top two classes, stable where p1 -> 1: PhiInv(p1) is
    -PhiInv(1 - p1) with 1 - p1 = sum of the other probabilities, taken in log space, in float64. A float32
    softmax saturates at p1 = 1 - 6e-8, where any clamp makes the margin flat and its gradient zero although the
    logits still move: rho measured there said nothing (a confident model read rho = 0 while its radii overclaimed)."""
    log_p = logits.double().log_softmax(-1)
    top = log_p.topk(2, dim=-1)
    others = log_p.scatter(-1, top.indices[:, :1], float("-inf")).logsumexp(-1)  # log(1 - p1)
    phi_inv = lambda log_q: torch.special.ndtri(log_q.clamp_min(RHO_LOG_FLOOR).exp())  # noqa: E731
    return -phi_inv(others) - phi_inv(top.values[:, 1])


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks of at most ``size`` (one more for the last), never a last chunk of one:
    during a conversion with BatchNorm on batch statistics (bn_mode recompute or train) a forward of one image fails
    in any layer that normalises a 1 x 1 feature map (squeeze-excitation, a BatchNorm1d head)."""
    start = 0
    while start < total:
        stop = min(total, start + size)
        if total - stop == 1:
            stop = total
        yield start, stop
        start = stop


CHECK_BATCH = 64  # images per forward and backward of rho's gradients; fewer on a CPU (certificates.forward_piece)


def _piece(batch_size: int, images: torch.Tensor) -> int:
    return forward_piece(batch_size, images.shape[1:], images.device.type)


@dataclass(frozen=True)
class Shard:
    """One process's share of a measurement split over ``count`` processes: chunk i of the points is measured by
    process i % count, on exactly the images one process would give it (with BatchNorm on batch statistics a chunk's
    answer depends on its companions), and the others are left 0; ``join`` adds the processes' parts (an all-reduce
    sum), so that every process ends with every value, bit for bit what one process measures."""
    index: int = 0
    count: int = 1
    join: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda part: part, compare=False)

    def measures(self, chunk: int) -> bool:
        return chunk % self.count == self.index


ALONE = Shard()  # one process measures every chunk


def rho(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, sigma: float,
        batch_size: int = CHECK_BATCH, shard: Shard = ALONE) -> torch.Tensor:
    """Per image: sigma/2 * ||grad_x [PhiInv(p1) - PhiInv(p2)]|| at x, the top two classes chosen at x."""
    values = []
    for chunk, (start, stop) in enumerate(chunks(images.shape[0], _piece(batch_size, images))):
        if not shard.measures(chunk):
            values.append(torch.zeros(stop - start, device=images.device))
            continue
        x = images[start:stop].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(phi_inverse_margin(model(x)).sum(), x)
        values.append(0.5 * sigma * gradient.flatten(1).norm(dim=1).float().detach())
    return shard.join(torch.cat(values)) if values else images.new_zeros(0)


def descent_points(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, sigma: float,
                   fractions: tuple[float, ...] = (0.5, 1.0), batch_size: int = CHECK_BATCH,
                   shard: Shard = ALONE) -> torch.Tensor:
    """Points on the way from each image towards its decision boundary: x - t R(x) g / ||g||, g the gradient of the
    margin PhiInv(p1) - PhiInv(p2), R(x) the radius claimed at x, t in ``fractions``; clipped to [0,1].

    The radius holds only if rho <= 1 along the whole segment it claims, and a model can be flat at x and steep
    further out (a confident ConvNeXt read rho < 1 at every held-out image and random neighbour while PGD broke most
    of its claims): rho is measured where the claim is tested, not only at x."""
    points = []
    for chunk, (start, stop) in enumerate(chunks(images.shape[0], _piece(batch_size, images))):
        if not shard.measures(chunk):
            points.extend(torch.zeros_like(images[start:stop]) for _ in fractions)
            continue
        x = images[start:stop].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            (gradient,) = torch.autograd.grad(phi_inverse_margin(logits).sum(), x)
        claim = certify_deterministic(logits.detach(), sigma).radius.to(x.dtype)
        unit = gradient / gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        for fraction in fractions:
            step = (fraction * claim).view(-1, *([1] * (x.dim() - 1)))
            points.append((x.detach() - step * unit).clamp(0.0, 1.0))
    return shard.join(torch.cat(points)) if points else images[:0]


def probe_points(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, sigma: float,
                 generator: torch.Generator | None = None, shard: Shard = ALONE,
                 batch_size: int = CHECK_BATCH) -> torch.Tensor:
    """Where rho is measured: the images, a random neighbour of each (sigma/2 away), and points along each claim's
    steepest way down (``descent_points``)."""
    return torch.cat([images, neighbours(images, sigma / 2, generator),
                      descent_points(model, images, sigma, batch_size=batch_size, shard=shard)])


def rho_at_probe_points(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, sigma: float,
                        generator: torch.Generator | None = None, shard: Shard = ALONE,
                        batch_size: int = CHECK_BATCH) -> torch.Tensor:
    """rho at ``probe_points`` of ``images``: what the gamma controller and the self-check measure."""
    points = probe_points(model, images, sigma, generator, shard, batch_size)
    return rho(model, points, sigma, batch_size, shard)


def neighbours(images: torch.Tensor, distance: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One point per image at L2 distance ``distance`` in a uniformly random direction, clipped to [0,1]."""
    direction = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (images.dim() - 1)))
    return (images + distance * direction).clamp(0.0, 1.0)


@dataclass
class RhoSummary:
    """rho over a set of points: what the controller steers and what the self-check reports."""

    points: int
    median: float
    p90: float
    p99: float
    max: float
    share_above_1: float

    @classmethod
    def of(cls, values: torch.Tensor) -> "RhoSummary":
        values = values.double().cpu()
        if values.numel() == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        q = values.quantile(torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
        return cls(int(values.numel()), q[0], q[1], q[2], float(values.max()), float((values > 1).double().mean()))

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class GammaController:
    """Multiplicative dual ascent on gamma for the constraint quantile_q(rho) <= target.

    Each update multiplies gamma by (rho_q / target) ** rate, limited to [1 / max_factor, max_factor]: up while the
    slice overclaims, down while it is smoother than needed (a larger gamma than needed costs clean accuracy and
    radius). Whenever the student's top-1 agreement with the base on the clean slice is below ``agreement_floor``,
    gamma is divided by max_factor instead: accuracy first; the calibration (kappa) then covers what rho leaves.
    When the caller still holds the student as it was at the last check that met the floor (``last_good_step``),
    a breach also asks it to go back there, and the weight that breached becomes a ceiling: halving alone came too
    late, since the student does not win back its agreement when gamma falls (runs that breached once ended with
    gamma at its floor and the agreement still below it).
    ``gamma`` is stated at 1000 classes like --gamma (the loop scales it by C/1000).

    A second lever, for optimisers whose step does not grow with the loss (AdamW: ``steers_lr``): there a larger
    gamma only tilts the step's direction towards the penalty, and once the penalty is most of the objective
    (``penalty_share``, its share of the loss since the last check, ``record_step``) the direction is the penalty's
    already and the step's size is the learning rate's. A ConvNeXt converted with AdamW climbed to gamma ~50,000
    while rho stayed at 2-3 (gamma study). So while the slice overclaims and the penalty is at least half the
    loss, the controller raises ``lr_scale`` (the factor on the schedule's lr, at most ``max_lr_scale``) instead of
    gamma; gamma moves whenever the fidelity weighs more, and on every move down (it sets the balance between the
    two terms). A breach of the floor halves both and caps both, as for gamma alone.
    """

    gamma: float
    target: float = 1.0
    quantile: float = 0.99
    agreement_floor: float = 0.85
    rate: float = 1.0
    max_factor: float = 2.0
    min_gamma: float = 1e-4
    max_gamma: float = 1e5
    steers_lr: bool = False
    max_lr_scale: float = 32.0
    history: list[dict] = field(default_factory=list)
    # (penalty part, whole loss) summed over the steps since the last check: what ``penalty_share`` reads
    loss_sums: list[float] = field(default_factory=lambda: [0.0, 0.0])

    @property
    def ceiling(self) -> float:
        """Half the lowest weight whose run breached the floor and was undone (the gamma each such check set), at
        the learning rate of the last check (``ceiling_at``)."""
        return self.ceiling_at(self.history[-1].get("lr") if self.history else None)

    def ceiling_at(self, lr: float | None) -> float:
        """The ceiling at schedule learning rate ``lr``. With SGD (``steers_lr`` off) what breached is a step: lr times
        gamma times the penalty's gradient. A breach at the schedule's peak then does not cap gamma once the schedule
        has decayed: the ceiling is the breached product over the current lr (a breach with the lr unknown caps gamma
        as such). With AdamW the step's size does not follow gamma, and the ceiling is gamma's."""
        ceilings = [entry["gamma"] * (entry["lr"] / lr if lr and entry.get("lr") and not self.steers_lr else 1.0)
                    for entry in self.history if "restored_to_step" in entry and not entry.get("final")]
        return min(ceilings, default=math.inf)

    @property
    def lr_scale(self) -> float:
        """The factor on the schedule's learning rate in force (1 until the lr lever moves it)."""
        return self.history[-1].get("lr_scale", 1.0) if self.history else 1.0

    def _lowest_restored(self, key: str, default: float) -> float:
        return min((entry.get(key, 1.0) for entry in self.history
                    if "restored_to_step" in entry and not entry.get("final")), default=default)

    def record_step(self, loss: float, fidelity: float) -> None:
        """One optimiser step's objective (mean over the global batch) and its fidelity part."""
        if math.isfinite(loss) and math.isfinite(fidelity):
            self.loss_sums[0] += max(0.0, loss - fidelity)
            self.loss_sums[1] += max(0.0, loss)

    def penalty_share(self) -> float:
        """The penalty's share of the loss over the steps since the last check (0 when none was recorded)."""
        penalty, total = self.loss_sums
        return penalty / total if total > 0 else 0.0

    def observe(self, step: int, rho_values: torch.Tensor, agreement: float, update: bool,
                last_good_step: int | None = None, final: bool = False, lr: float | None = None) -> bool:
        """Record this measurement; with ``update`` (after warm-up) move gamma. Returns True when the caller should
        restore the student to its state at ``last_good_step`` (the floor was breached, after warm-up or at the run's
        ``final`` check, and that state is held)."""
        summary = RhoSummary.of(rho_values)
        level = {0.5: summary.median, 0.9: summary.p90, 0.99: summary.p99}.get(self.quantile)
        if level is None:
            level = float(rho_values.double().quantile(self.quantile))
        factor = 1.0
        restore = (update or final) and not self.meets_floor(agreement) and last_good_step is not None
        share, lr_scale, lever = self.penalty_share(), self.lr_scale, "gamma"
        if update:
            if not self.meets_floor(agreement):
                factor = 1.0 / self.max_factor
            elif level > 0 and math.isfinite(level):
                factor = min(self.max_factor, max(1.0 / self.max_factor, (level / self.target) ** self.rate))
            lr_limit = min(self.max_lr_scale, self._lowest_restored("lr_scale", math.inf))
            if self.steers_lr and factor > 1 and share >= PENALTY_SHARE_FOR_LR and lr_scale < lr_limit:
                lever, lr_scale = "lr", min(lr_limit, lr_scale * factor)
            else:
                if factor < 1 and not self.meets_floor(agreement):
                    lr_scale = max(1.0, lr_scale * factor)
                ceiling = min(self.ceiling_at(lr), self.gamma * factor) if restore else self.ceiling_at(lr)
                self.gamma = min(self.max_gamma, ceiling, max(self.min_gamma, self.gamma * factor))
        self.loss_sums = [0.0, 0.0]
        self.history.append({"step": step, "gamma": self.gamma, "rho_quantile": round(level, 4),
                             "rho_median": round(summary.median, 4), "share_above_1": round(summary.share_above_1, 4),
                             "agreement": round(agreement, 4), "factor": round(factor, 4),
                             **({"lever": lever, "lr_scale": round(lr_scale, 6), "penalty_share": round(share, 4)}
                                if self.steers_lr else {}),
                             **({"lr": lr} if lr else {}), **({"final": True} if final else {}),
                             **({"restored_to_step": last_good_step} if restore else {})})
        return restore

    def meets_floor(self, agreement: float) -> bool:
        return agreement >= self.agreement_floor

    def restorations(self) -> int:
        return sum("restored_to_step" in entry for entry in self.history)

    def undone_entirely(self) -> bool:
        """Whether the run's last check sent the student back to step 0: the saved weights are the base's."""
        return bool(self.history) and self.history[-1].get("restored_to_step") == 0

    def undone(self) -> str | None:
        """A warning when the conversion keeps none of its steps (``undone_entirely``): the output is the base
        (its weights; BatchNorm statistics as --bn-mode made them)."""
        if not self.undone_entirely():
            return None
        last = self.history[-1]
        return (f"no step of this conversion is kept: at its last check (step {last['step']}) the student agreed with "
                f"the base on {last['agreement']:.1%} of the held-out images, below the floor "
                f"{self.agreement_floor:.0%}, and it went back to step 0, the base's weights. The output is not "
                "smoothed: lower --lr, or, where the base has near-ties among the held-out images (said before the "
                "first step: they change under any fine-tuning), give --check-data images on which it is sure")

    def stalled(self, rise: float = 64.0, miss: float = 2.0) -> str | None:
        """A diagnosis when gamma (times the lr lever's factor) rose at least ``rise``-fold over the run and the rho
        quantile still ends above ``miss`` times the target: the penalty's weight is not what limits smoothing (e.g.
        an optimiser whose step does not grow with the loss, such as AdamW at a small lr over a short run, even with
        the lr lever at its limit); None otherwise."""
        if len(self.history) < 2:
            return None
        first, last = self.history[0], self.history[-1]
        gamma_rise, lr_rise = last["gamma"] / first["gamma"], last.get("lr_scale", 1.0) / first.get("lr_scale", 1.0)
        if gamma_rise * lr_rise < rise or last["rho_quantile"] <= miss * self.target:
            return None
        levers = f"gamma rose {gamma_rise:.0f}x" + (f" and the learning rate {lr_rise:.0f}x" if lr_rise > 1 else "")
        # SGD's step already grows with gamma, and a larger lr cost accuracy there: on a 10-class MobileNetV2
        # (efficientnet recipe, sigma 0.5), 4x --lr took kappa from 0.32 to 0.46 and clean accuracy from 93.0 to
        # 85.3; twice the passes took kappa to 0.50 and clean accuracy to 93.7
        remedy = "raise --lr, or train longer" if self.steers_lr else "train longer: --epochs"
        return (f"{levers} while rho's {self.quantile:.0%} quantile only went "
                f"from {first['rho_quantile']:.2f} to {last['rho_quantile']:.2f} (target {self.target:g}): the "
                f"penalty's weight is not what limits smoothing; the optimiser's steps are too small over this run "
                f"({remedy})")

    def state_dict(self) -> dict:
        return {"gamma": self.gamma, "history": list(self.history), "loss_sums": list(self.loss_sums)}

    def load_state_dict(self, state: dict) -> None:
        self.gamma, self.history = float(state["gamma"]), list(state.get("history", []))
        self.loss_sums = [float(value) for value in state.get("loss_sums", (0.0, 0.0))]

    def settings(self) -> dict:
        return {"target": self.target, "quantile": self.quantile, "agreement_floor": self.agreement_floor,
                "rate": self.rate, "max_factor": self.max_factor,
                **({"steers_lr": True, "max_lr_scale": self.max_lr_scale} if self.steers_lr else {})}


def pgd_witness(flip_ratios: torch.Tensor, margin: float = 0.8) -> float:
    """The largest kappa the counterexamples found leave: margin * the smallest finite (flip distance / claimed
    radius), 1 where none was found (not capped: a flip beyond every claim gives more than 1)."""
    ratios = flip_ratios[torch.isfinite(flip_ratios)]
    return margin * float(ratios.min()) if ratios.numel() else 1.0


def calibration_factor(flip_ratios: torch.Tensor, rho_values: torch.Tensor, margin: float = 0.8) -> tuple[float, dict]:
    """kappa <= 1 for the deterministic radii, from a slice the model was not trained on.

    Two witnesses, the smaller wins:
    * PGD: ``flip_ratios`` are (flip distance / claimed radius) of the slice's counterexamples found inside
      (a multiple of) the claimed radius; kappa must bring every claim below them: margin * min ratio.
    * rho: the prediction cannot change before R / max rho (module docstring): 1 / max rho over the slice and
      its neighbours (not a bound on points the slice did not see, hence the audit on top).
    ``margin`` (< 1) leaves room for points of the evaluation split that are worse than the slice's worst.
    """
    ratios = flip_ratios[torch.isfinite(flip_ratios)]
    by_pgd = pgd_witness(flip_ratios, margin)
    finite_rho = rho_values[torch.isfinite(rho_values)]
    worst_rho = float(finite_rho.max()) if finite_rho.numel() else 0.0
    by_rho = 1.0 / worst_rho if worst_rho > 1.0 else 1.0
    kappa = max(0.0, min(1.0, by_pgd, by_rho))
    return kappa, {"by_pgd": round(min(1.0, by_pgd), 4), "by_rho": round(by_rho, 4), "margin": margin,
                   "counterexamples_within_claim": int((ratios < 1).sum()), "max_rho": round(worst_rho, 4)}
