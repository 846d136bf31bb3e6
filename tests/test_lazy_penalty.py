"""The lazy penalty (lazy R1 regularisation, StyleGAN2): the penalty's graph on every k-th step, weighted k times;
the fidelity alone, and nothing more, on the others."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certify_zoo.draws import keyed_draws
from certify_zoo.objective import (ObjectiveSettings, boot_camp_step, fidelity, jl_fd_penalty, lazy_weight,
                                   penalty_due)

SHAPE = (3, 6, 6)
CLASSES = 5
GAMMA = 0.7


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, CLASSES)).double()


def draws_for(step: int, settings: ObjectiveSettings, batch: int = 6):
    draws = keyed_draws(0, step, 0, batch, torch.Size((batch, *SHAPE)), CLASSES, settings, torch.device("cpu"))
    draws.noise, draws.projections = draws.noise.double(), draws.projections.double()
    return draws


def step_gradient(student: nn.Module, base: nn.Module, images, settings, weight, draws) -> torch.Tensor:
    student.zero_grad(set_to_none=True)
    parts = boot_camp_step(student, base, images, settings, weight, draws)
    gradient = torch.cat([p.grad.flatten() for p in student.parameters()])
    return gradient, parts


def test_penalty_is_due_on_the_first_step_of_every_period_with_k_times_the_weight():
    assert [penalty_due(step, 4) for step in range(9)] == [True, False, False, False] * 2 + [True]
    assert all(penalty_due(step, every) for step in range(5) for every in (0, 1))
    assert lazy_weight(GAMMA, 4) == pytest.approx(4 * GAMMA)
    assert lazy_weight(GAMMA, 1) == lazy_weight(GAMMA, 0) == GAMMA


def test_every_step_schedule_gives_the_single_graph_gradient_of_fidelity_plus_penalty():
    """penalty_every = 1 changes nothing: each step's gradient is that of mean(fidelity + weight * penalty)."""
    settings = ObjectiveSettings(sigma=0.5, reps=2, estimator="paper", penalty_every=1)
    student, base = small_net(0), small_net(1)
    images = torch.rand(6, *SHAPE, dtype=torch.float64)
    for step in range(3):
        draws = draws_for(step, settings)
        weight = lazy_weight(GAMMA, settings.penalty_every) if penalty_due(step, settings.penalty_every) else 0.0
        ours, parts = step_gradient(student, base, images, settings, weight, draws)
        student.zero_grad(set_to_none=True)
        x_tilde = (images + draws.noise).requires_grad_(True)
        logits = student(x_tilde)
        penalty = jl_fd_penalty(student, x_tilde, logits, settings.reps, settings.h, draws.projections)
        loss = fidelity(logits, base(images).softmax(-1)) + GAMMA * 0.5 * settings.sigma ** 2 * penalty
        loss.mean().backward()
        expected = torch.cat([p.grad.flatten() for p in student.parameters()])
        torch.testing.assert_close(ours, expected)
        assert parts.with_penalty and parts.penalty.gt(0).all()


@pytest.mark.parametrize("estimator", ["paper", "jl"])
def test_a_fidelity_only_step_is_the_fidelity_gradient_from_one_forward_of_each_model(estimator):
    settings = ObjectiveSettings(sigma=0.5, reps=2, probes=2, estimator=estimator, penalty_every=4)
    student, base = small_net(0), small_net(1)
    images = torch.rand(6, *SHAPE, dtype=torch.float64)
    draws = draws_for(1, settings)
    assert not penalty_due(1, settings.penalty_every)
    calls = {"student": 0, "base": 0}
    hooks = [model.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
             for name, model in (("student", student), ("base", base))]
    ours, parts = step_gradient(student, base, images, settings, 0.0, draws)
    for hook in hooks:
        hook.remove()
    assert calls == {"student": 1, "base": 1}  # no penalty graph, no shifted forward
    assert not parts.with_penalty
    student.zero_grad(set_to_none=True)
    fidelity(student(images + draws.noise), base(images).softmax(-1)).mean().backward()
    expected = torch.cat([p.grad.flatten() for p in student.parameters()])
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(parts.loss, parts.fidelity.mean())


@pytest.mark.parametrize("estimator", ["paper", "jl"])
def test_the_lazy_penalty_step_adds_k_times_the_penalty_gradient(estimator):
    """grad(step at k w) - grad(fidelity) = k (grad(step at w) - grad(fidelity)), same draws: only the penalty
    part is scaled."""
    every = 4
    settings = ObjectiveSettings(sigma=0.5, reps=2, probes=1, estimator=estimator, penalty_every=every)
    student, base = small_net(0), small_net(1)
    images = torch.rand(6, *SHAPE, dtype=torch.float64)
    draws = draws_for(0, settings)
    fidelity_only, _ = step_gradient(student, base, images, settings, 0.0, draws)
    every_step, plain = step_gradient(student, base, images, settings, GAMMA, draws)
    lazy, parts = step_gradient(student, base, images, settings, lazy_weight(GAMMA, every), draws)
    penalty_part = every_step - fidelity_only
    assert penalty_part.norm() > 1e-3 * fidelity_only.norm()  # the penalty moves the gradient measurably
    torch.testing.assert_close(lazy - fidelity_only, every * penalty_part)
    torch.testing.assert_close(parts.penalty, plain.penalty)  # the estimate itself does not depend on the weight


@pytest.mark.parametrize("share, chosen", [(0.5, 3), (0.2, 2), (0.01, 1)])
def test_a_penalty_share_is_the_batch_fidelity_plus_the_penalty_mean_of_its_first_images(share, chosen):
    """penalty_share s: the gradient of mean over B of fidelity + weight * mean over the first ceil(s B) images
    of the jl penalty (those images' noise and probes), in double precision; an exact coefficient gives the paper's
    finite difference."""
    settings = ObjectiveSettings(sigma=0.5, reps=2, estimator="jl", probes=1, penalty_share=share)
    student, base = small_net(0), small_net(1)
    images = torch.rand(6, *SHAPE, dtype=torch.float64)
    draws = draws_for(0, settings)
    counter = {"forwards": 0}
    counted = lambda x: (counter.__setitem__("forwards", counter["forwards"] + 1), student(x))[1]  # noqa: E731
    student.zero_grad(set_to_none=True)
    parts = boot_camp_step(counted, base, images, settings, GAMMA, draws)  # not a Module: exact coefficient
    ours = torch.cat([p.grad.flatten() for p in student.parameters()])
    assert parts.penalty.shape == (chosen,) and parts.penalty.gt(0).all() and parts.fidelity.shape == (6,)
    assert counter["forwards"] == 4  # the batch, the chosen images, their shifted forward (D read from it), and
    # the chosen images' forward rebuilt for their -s part (their graph freed meanwhile)
    student.zero_grad(set_to_none=True)
    x_tilde = images + draws.noise
    fidelity(student(x_tilde), base(images).softmax(-1)).mean().backward()
    x_share = x_tilde[:chosen].clone().requires_grad_(True)
    penalty = jl_fd_penalty(student, x_share, student(x_share), 1, settings.h, draws.projections[:1, :chosen].sign()
                            / CLASSES ** 0.5 if settings.probe_distribution == "rademacher"
                            else draws.projections[:1, :chosen])
    (GAMMA * 0.5 * settings.sigma ** 2 * settings.reps * penalty).mean().backward()
    expected = torch.cat([p.grad.flatten() for p in student.parameters()])
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(parts.penalty, settings.reps * penalty.detach().float())


def test_a_penalty_share_needs_the_jl_estimator_and_a_share_in_0_1(tmp_path):
    from certify_zoo.conversion import ConvertSettings
    from certify_zoo.errors import CertifyZooError

    for objective in (ObjectiveSettings(estimator="paper", penalty_share=0.5), ObjectiveSettings(penalty_share=0.0),
                      ObjectiveSettings(estimator="jl", penalty_share=1.5)):
        with pytest.raises(CertifyZooError, match="--penalty-share"):
            ConvertSettings(model="m", data="d", out=str(tmp_path), objective=objective).validate()
