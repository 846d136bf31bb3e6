"""rho, the gamma controller and the calibration factor kappa, on models whose answer is known."""
from __future__ import annotations

import json
import math

import pytest
import torch

from certify_zoo.smoothness import GammaController, RhoSummary, calibration_factor, neighbours, rho
from certify_zoo.models import create_timm_model


class Probit(torch.nn.Module):
    """softmax = (Phi(w . x), Phi(-w . x)): PhiInv(p1) - PhiInv(p2) = 2 |w . x|, so rho = sigma ||w|| exactly."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, x):
        z = (x.flatten(1) * self.w).sum(1)
        normal = torch.distributions.Normal(0.0, 1.0)
        return torch.stack([normal.cdf(z).log(), normal.cdf(-z).log()], 1)


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_rho_of_a_probit_model_is_sigma_times_its_slope(scale):
    sigma = 0.5
    torch.manual_seed(0)
    w = torch.randn(48)
    w = w / w.norm() * scale / sigma  # rho = scale: the exact Gaussian average of a linear classifier has scale 1
    images = torch.rand(16, 3, 4, 4) * 0.1 + 0.45  # close to the boundary: no clamped probabilities
    assert torch.allclose(rho(Probit(w), images, sigma, batch_size=5), torch.full((16,), scale), rtol=1e-4)


def test_neighbours_are_at_the_distance_asked_unless_clipped():
    images = torch.full((8, 3, 4, 4), 0.5)
    points = neighbours(images, 0.3, torch.Generator().manual_seed(0))
    assert torch.allclose((points - images).flatten(1).norm(dim=1), torch.full((8,), 0.3), atol=1e-5)
    assert neighbours(torch.zeros(4, 3, 4, 4), 5.0).min() >= 0


def test_controller_moves_gamma_towards_the_rho_target():
    controller = GammaController(gamma=10.0, target=1.0, quantile=0.99, agreement_floor=0.85, max_factor=2.0)
    controller.observe(0, torch.full((100,), 5.0), agreement=1.0, update=False)  # warm-up: record only
    assert controller.gamma == 10.0
    controller.observe(1, torch.full((100,), 1.5), agreement=1.0, update=True)  # overclaims: up by 1.5
    assert controller.gamma == pytest.approx(15.0)
    controller.observe(2, torch.full((100,), 8.0), agreement=1.0, update=True)  # at most max_factor per update
    assert controller.gamma == pytest.approx(30.0)
    controller.observe(3, torch.full((100,), 0.8), agreement=1.0, update=True)  # smoother than needed: down
    assert controller.gamma == pytest.approx(24.0)
    controller.observe(4, torch.full((100,), 3.0), agreement=0.5, update=True)  # accuracy first
    assert controller.gamma == pytest.approx(12.0)
    assert [row["step"] for row in controller.history] == [0, 1, 2, 3, 4]
    restored = GammaController(gamma=1.0)
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.gamma == controller.gamma and restored.history == controller.history


def test_a_breach_of_the_floor_goes_back_to_the_last_good_state_and_caps_gamma_below_the_breaching_weight():
    """The cnn16 runs of the penalty-cost study (jl, lazy k=4): gamma doubled to 12.8, agreement fell from 0.91 to
    0.69 within one interval and halving gamma afterwards never won it back. With a good state held, a breach asks for
    it and gamma never again reaches the weight that breached; without one, gamma is only halved."""
    controller = GammaController(gamma=6.4)
    assert not controller.observe(112, torch.full((50,), 4.0), agreement=0.96, update=True, last_good_step=98)
    assert controller.gamma == pytest.approx(12.8)
    assert controller.observe(126, torch.full((50,), 3.0), agreement=0.69, update=True, last_good_step=112)
    assert controller.gamma == pytest.approx(6.4) and controller.history[-1]["restored_to_step"] == 112
    for step in (140, 154):  # rho still overclaims: gamma would double, but stays under the ceiling
        assert not controller.observe(step, torch.full((50,), 3.0), agreement=0.95, update=True, last_good_step=126)
    assert controller.gamma == pytest.approx(6.4)
    assert not controller.observe(168, torch.full((50,), 0.5), agreement=0.95, update=True, last_good_step=154)
    assert controller.gamma == pytest.approx(3.2)  # below the ceiling the controller moves as before
    assert controller.observe(280, torch.full((50,), 0.5), agreement=0.8, update=False, last_good_step=168, final=True)
    assert controller.gamma == pytest.approx(3.2) and controller.restorations() == 2
    during_warm_up = GammaController(gamma=1.0)
    assert not during_warm_up.observe(0, torch.full((50,), 3.0), agreement=0.5, update=False, last_good_step=0)
    nothing_held = GammaController(gamma=12.8)
    assert not nothing_held.observe(126, torch.full((50,), 3.0), agreement=0.69, update=True)
    assert nothing_held.gamma == pytest.approx(6.4) and math.isinf(nothing_held.ceiling)
    resumed = GammaController(gamma=1.0)
    resumed.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert resumed.ceiling == pytest.approx(6.4) and resumed.restorations() == 2


def test_with_sgd_the_ceiling_after_a_breach_rises_as_the_learning_rate_decays():
    """The cnn16 run with the jl estimator (1 probe): a breach at gamma 12.8 near the schedule's peak capped gamma at
    6.4 for the rest of the run while the cosine took the lr from 0.0063 to 0.001, and rho's 99th percentile ended at
    1.8. What breached is an SGD step, lr x gamma x the penalty's gradient: the ceiling is that product over the
    current lr. With AdamW (steers_lr) the step's size does not follow gamma, and the ceiling stays gamma's."""
    for steers_lr, expected in ((False, 12.8), (True, 6.4)):
        controller = GammaController(gamma=12.8, steers_lr=steers_lr)
        assert controller.observe(140, torch.full((50,), 3.0), agreement=0.69, update=True, last_good_step=126,
                                  lr=0.006)
        assert controller.gamma == pytest.approx(6.4) and controller.ceiling == pytest.approx(6.4)
        controller.observe(154, torch.full((50,), 3.0), agreement=0.95, update=True, last_good_step=140, lr=0.006)
        assert controller.gamma == pytest.approx(6.4)  # at the breach's lr the cap is the halved weight
        for step in (168, 182):  # the lr halved: the same step size allows twice the weight, and no more
            controller.observe(step, torch.full((50,), 3.0), agreement=0.95, update=True, last_good_step=154,
                               lr=0.003)
        assert controller.gamma == pytest.approx(expected) and controller.ceiling == pytest.approx(expected)
        resumed = GammaController(gamma=1.0, steers_lr=steers_lr)
        resumed.load_state_dict(json.loads(json.dumps(controller.state_dict())))
        assert resumed.ceiling == pytest.approx(expected)


@pytest.mark.parametrize(("steers_lr", "remedy"), [(False, "(train longer: --epochs)"),
                                                   (True, "(raise --lr, or train longer)")])
def test_controller_diagnoses_a_gamma_that_rises_without_rho_falling(steers_lr, remedy):
    """The convnext32 study runs (AdamW at lr 2e-5, 210 steps): gamma doubled at every check while rho's 99th
    percentile stayed near 3; a controller that reached its target, or rose less, is not diagnosed. The remedy
    names --lr only for an optimiser whose step does not grow with the loss (AdamW); with SGD, more passes."""
    stuck = GammaController(gamma=0.05, steers_lr=steers_lr)
    for step in range(9):  # the first check falls in the warm-up: recorded, no update
        stuck.observe(step * 10, torch.full((50,), 3.0 - 0.05 * step), agreement=1.0, update=step > 0,
                      lr=1e-3 if steers_lr else None)
    assert stuck.gamma == pytest.approx(0.05 * 2 ** 8)
    assert "gamma rose 256x" in stuck.stalled() and stuck.stalled().endswith(remedy)
    reached = GammaController(gamma=0.05)
    for step, level in enumerate([3.0] * 8 + [0.9]):
        reached.observe(step * 10, torch.full((50,), level), agreement=1.0, update=step > 0)
    assert reached.stalled() is None  # ends below twice the target
    short = GammaController(gamma=0.05)
    for step in range(6):
        short.observe(step * 10, torch.full((50,), 3.0), agreement=1.0, update=step > 0)
    assert short.stalled() is None  # rose 32x: not yet a diagnosis


def test_calibration_takes_the_stricter_witness():
    none = torch.full((10,), float("inf"))
    assert calibration_factor(none, torch.full((10,), 0.5))[0] == 1.0
    ratios = none.clone()
    ratios[3] = 0.5  # PGD flipped one claim at half its radius
    kappa, witnesses = calibration_factor(ratios, torch.full((10,), 0.5), margin=0.8)
    assert kappa == pytest.approx(0.4) and witnesses["counterexamples_within_claim"] == 1
    kappa, witnesses = calibration_factor(none, torch.tensor([0.5, 2.0]))
    assert kappa == pytest.approx(0.5) and witnesses["by_rho"] == pytest.approx(0.5)


def test_rho_summary_counts_the_share_above_one():
    summary = RhoSummary.of(torch.tensor([0.1, 0.2, 1.5, 0.3]))
    assert summary.points == 4 and summary.share_above_1 == 0.25 and summary.max == pytest.approx(1.5)


def test_conversion_records_gamma_trajectory_self_check_and_kappa(short_conversion):
    record = json.loads((short_conversion / "certify_zoo.json").read_text())
    assert record["conversion_forwards"]["deterministic"] and record["conversion_forwards"]["batch_norm"] == "eval"
    check, calibration = record["self_check"], record["calibration"]
    assert check["held_out_images"] == record["held_out_images"] > 0
    from certify_zoo.selfcheck import KAPPA_CAP, WITHDRAW_BELOW

    kappa = calibration["kappa"]
    assert 0 <= kappa <= KAPPA_CAP and kappa == check["kappa"]
    # refined only where some temperature's kappa could stand: the refinement only shrinks kappa
    best = max(candidate["kappa"] for candidate in calibration["candidates"])
    assert (calibration["by_refinement"] is None) == (best < WITHDRAW_BELOW) == (calibration["refinement"] == [])
    refined = calibration["by_refinement"] if best >= WITHDRAW_BELOW else calibration["candidates"][0]["kappa"]
    assert refined <= min(1.0, calibration["by_pgd"], calibration["by_rho"]) + 1e-4
    # the final rule: capped, or withdrawn (0: no deterministic radius) when the refined kappa fell below the floor
    assert kappa == (0.0 if refined < WITHDRAW_BELOW else pytest.approx(min(refined, KAPPA_CAP), abs=1e-4))
    assert 0 <= check["rho"]["share_above_1"] <= 1 and check["audit"]["attacked"] > 0
    # what kappa promises beyond the slice: an exchangeable image is the slice's most fragile w.p. <= 1 / (m + 1)
    assert calibration["broken_share_bound"] == pytest.approx(1 / (check["held_out_images"] + 1), abs=1e-4)
    # the self-check's warnings are kept with the model, not only printed: a withdrawn or small kappa says so
    from certify_zoo.selfcheck import SMALL_KAPPA

    assert isinstance(check["warnings"], list)
    assert any("deterministic radi" in w for w in check["warnings"]) == (kappa < SMALL_KAPPA)


def test_gamma_auto_measures_rho_every_check_and_steers_after_warmup(demo_base, tmp_path):
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    out = tmp_path / "auto"
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                        max_steps=20, warmup=0.5, lr=0.005, agreement_floor=0.9))
    record = json.loads((out / "certify_zoo.json").read_text())
    gamma = record["gamma"]
    assert gamma["controller"]["agreement_floor"] == 0.9  # the setting reaches the controller
    assert gamma["mode"] == "auto" and gamma["check_every_steps"] == 10  # at least 10 steps between checks
    trajectory = gamma["trajectory"]
    assert [row["step"] for row in trajectory] == [0, 10, 20]
    assert trajectory[0]["factor"] == 1.0  # warm-up (steps 0-8): measured, not moved
    assert trajectory[1]["factor"] != 1.0
    assert trajectory[2]["final"] and trajectory[2]["factor"] == 1.0  # the run's end: measured, gamma kept
    assert gamma["restorations"] == sum("restored_to_step" in row for row in trajectory)
    assert gamma["final"] == pytest.approx(trajectory[-1]["gamma"])
    assert record["effective_gamma"] == pytest.approx(gamma["final"] * 10 / 1000)
    # the recipe's start is the effective weight: 0.2 on 10 classes is gamma 20 stated at 1000 classes
    assert gamma["start_effective"] == load_recipe("demo")["gamma_start"] == 0.2
    assert trajectory[0]["gamma"] == pytest.approx(20.0)


def _observe_with_share(controller: GammaController, step: int, level: float, share: float,
                        agreement: float = 1.0, last_good_step: int | None = None) -> bool:
    """One check after ``10`` steps whose loss was a ``share`` penalty (loss 1, fidelity 1 - share)."""
    for _ in range(10):
        controller.record_step(1.0, 1.0 - share)
    return controller.observe(step, torch.full((50,), level), agreement, update=True, last_good_step=last_good_step)


def test_under_adamw_the_controller_raises_the_lr_once_the_penalty_is_most_of_the_loss():
    """AdamW's step does not grow with gamma: the convnext32 study runs climbed to gamma ~50,000 with rho at 2-3."""
    controller = GammaController(gamma=1.0, steers_lr=True, max_lr_scale=4.0)
    _observe_with_share(controller, 10, 3.0, share=0.2)  # the fidelity weighs more: gamma tilts the direction
    assert (controller.gamma, controller.lr_scale) == (2.0, 1.0) and controller.history[-1]["lever"] == "gamma"
    assert controller.history[-1]["penalty_share"] == pytest.approx(0.2)
    _observe_with_share(controller, 20, 3.0, share=0.8)  # the penalty is the direction already: the step's size
    assert (controller.gamma, controller.lr_scale) == (2.0, 2.0) and controller.history[-1]["lever"] == "lr"
    _observe_with_share(controller, 30, 1.5, share=0.8)
    assert controller.lr_scale == pytest.approx(3.0)
    _observe_with_share(controller, 40, 3.0, share=0.8)  # at most max_lr_scale; beyond it gamma moves again
    assert controller.lr_scale == 4.0 and controller.gamma == 2.0
    _observe_with_share(controller, 50, 3.0, share=0.8)
    assert controller.lr_scale == 4.0 and controller.gamma == 4.0
    _observe_with_share(controller, 60, 0.5, share=0.8)  # smoother than needed: gamma down (the balance), lr kept
    assert controller.lr_scale == 4.0 and controller.gamma == 2.0
    assert _observe_with_share(controller, 70, 3.0, share=0.8, agreement=0.5, last_good_step=60)
    assert controller.lr_scale == 2.0 and controller.gamma == 1.0  # a breach halves both ...
    _observe_with_share(controller, 80, 3.0, share=0.8)
    assert controller.lr_scale == 2.0 and controller.gamma == 1.0  # ... and caps both
    assert controller.settings()["steers_lr"] and controller.settings()["max_lr_scale"] == 4.0
    controller.record_step(1.0, 0.5)
    resumed = GammaController(gamma=1.0, steers_lr=True, max_lr_scale=4.0)
    resumed.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert resumed.lr_scale == 2.0 and resumed.penalty_share() == pytest.approx(0.5)  # sums since the last check too


def test_without_the_lr_lever_gamma_alone_moves():
    controller = GammaController(gamma=1.0)
    _observe_with_share(controller, 10, 3.0, share=0.9)
    assert (controller.gamma, controller.lr_scale) == (2.0, 1.0)
    assert "lever" not in controller.history[-1] and "steers_lr" not in controller.settings()


def test_adamw_conversion_applies_the_controllers_lr_scale(demo_base, tmp_path):
    """On the demo's ViT with AdamW at a small lr, the penalty is most of the loss from the start (the student still
    equals the base, the fidelity is ~0): the controller raises the lr, and the optimiser steps with it."""
    from safetensors.torch import load_file

    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    def distance_moved(max_lr_scale: float) -> float:
        out = tmp_path / f"adamw-{max_lr_scale:g}"
        convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                            max_steps=40, warmup=0.0, optimizer="adamw", lr=1e-5,
                                            clip_grad_norm=0.0, max_lr_scale=max_lr_scale))
        base, student = load_file(demo_base / "model.safetensors"), load_file(out / "model.safetensors")
        return sum(float((student[name] - base[name]).pow(2).sum()) for name in base) ** 0.5

    assert distance_moved(8.0) > 1.5 * distance_moved(1.0)  # the scale reaches the optimiser's steps (1.9x here)
    record = json.loads((tmp_path / "adamw-8" / "certify_zoo.json").read_text())
    assert json.loads((tmp_path / "adamw-1" / "certify_zoo.json").read_text())["gamma"]["controller"].get(
        "steers_lr") is None  # --max-lr-scale 1: gamma only
    card = (tmp_path / "adamw-8" / "README.md").read_text()
    assert f"lr raised by the rho controller up to {max(row['lr_scale'] for row in record['gamma']['trajectory']):g}x" \
        in card and "lr raised" not in (tmp_path / "adamw-1" / "README.md").read_text()
    trajectory = record["gamma"]["trajectory"]
    assert record["gamma"]["controller"]["max_lr_scale"] == 8.0
    levers = [row["lever"] for row in trajectory if row["factor"] > 1]
    assert "lr" in levers and trajectory[-1]["lr_scale"] > 1
    assert all(1.0 <= row["lr_scale"] <= 8.0 for row in trajectory)
    moved = next(row for row in trajectory if row["lever"] == "lr")
    assert moved["penalty_share"] >= 0.5 and moved["rho_quantile"] > 1


def _batch_norm_cnn_on_batch_statistics():
    """A small timm resnet with BatchNorm on batch statistics (what --bn-mode train and recompute run the student in):
    each chunk's answer depends on the images it is measured with."""
    from certify_zoo.forward_modes import set_conversion_mode

    torch.manual_seed(0)
    net = create_timm_model("resnet10t", num_classes=10, stem_width=8, channels=(8, 16, 16, 16))
    set_conversion_mode(net, "train")
    return net


def test_rho_measured_in_shards_and_summed_is_what_one_process_measures():
    """The gamma controller's check split over processes (each measures every N-th chunk, the parts are summed): bit
    for bit one process's values, each part measuring only its own chunks, on chunks of the same images."""
    from certify_zoo.smoothness import ALONE, Shard, probe_points

    net = _batch_norm_cnn_on_batch_statistics()
    calls = []
    model = lambda x: (calls.append(x.shape[0]), net(x))[1]  # noqa: E731
    images = torch.rand(21, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    generator = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    whole = rho(model, probe_points(model, images, 0.5, generator(), ALONE, batch_size=4), 0.5, batch_size=4)
    alone_calls, calls[:] = list(calls), []
    for count in (2, 3):
        points, values, measured = [], [], []
        for index in range(count):  # the processes one after another, each joining nothing
            shard = Shard(index, count)
            points.append(probe_points(model, images, 0.5, generator(), shard, batch_size=4))
            measured.append(list(calls))
            calls[:] = []
        joined = torch.stack(points)[:, 42:].sum(0)  # the descent points: summed over processes, as the all-reduce
        # the images and their keyed neighbours are drawn whole on every process
        assert all(torch.equal(part[:42], points[0][:42]) for part in points)
        full_points = torch.cat([points[0][:42], joined])
        assert torch.equal(full_points, probe_points(model, images, 0.5, generator(), ALONE, batch_size=4))
        calls[:] = []
        for index in range(count):
            values.append(rho(model, full_points, 0.5, batch_size=4, shard=Shard(index, count)))
            measured[index] += calls
            calls[:] = []
        assert torch.equal(torch.stack(values).sum(0), whole)
        assert sorted(size for part in measured for size in part) == sorted(alone_calls)  # every chunk once
        assert all(len(part) < len(alone_calls) * 0.75 for part in measured)  # each a share of it


def test_a_controller_check_leaves_the_students_batch_norm_statistics_as_they_were():
    """With --bn-mode train every forward in train mode moves BatchNorm's running statistics, and the controller's
    final check ran its noisy neighbours and descent points through the student just before it was saved: most of the
    saved statistics were the check's. A check measures; the student leaves it as it came."""
    from certify_zoo.conversion import _steer_gamma
    from certify_zoo.selfcheck import BaseAnswers
    from certify_zoo.smoothness import probe_points

    net = _batch_norm_cnn_on_batch_statistics()
    images = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    running = [key for key in net.state_dict() if "running" in key]
    statistics = lambda: {key: net.state_dict()[key].clone() for key in running}  # noqa: E731
    same = lambda a, b: all(torch.equal(a[key], b[key]) for key in a)  # noqa: E731
    before = statistics()
    rho(net, probe_points(net, images, 0.5, torch.Generator().manual_seed(2)), 0.5)  # the check's forwards, bare
    assert not same(before, statistics())
    net.load_state_dict(before, strict=False)

    with torch.no_grad():
        base = BaseAnswers.of(net(images))
    net.load_state_dict(before, strict=False)
    controller = GammaController(gamma=1.0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    _steer_gamma(controller, net, optimizer, base, images, 0.5, seed=0, step=5, last_good=None, update=False,
                 final=True)
    assert controller.history[-1]["step"] == 5 and controller.history[-1]["agreement"] == 1.0  # it measured
    assert same(before, statistics())
