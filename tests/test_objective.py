"""The Boot Camp objective, pinned down on models whose answers are known in closed form."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certify_zoo.objective import (ObjectiveSettings, boot_camp_loss, effective_gamma, fidelity, jl_fd_penalty,
                                   noise_random_half)


class Linear(nn.Module):
    """v(x) = A x on flattened images: its input Jacobian is A everywhere."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x):
        return x.flatten(1) @ self.a.T


def test_penalty_on_linear_model_is_norm_of_a_transpose_w_per_rep():
    torch.manual_seed(0)
    a = torch.randn(7, 12, dtype=torch.float64)
    model = Linear(a)
    x = torch.rand(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    torch.manual_seed(123)
    penalty = jl_fd_penalty(model, x, logits, reps=3, h=0.01)
    torch.manual_seed(123)  # the estimator draws exactly one w per rep, in order
    expected = sum((torch.randn(5, 7, dtype=torch.float64) / 7 ** 0.5 @ a).pow(2).sum(-1) for _ in range(3))
    torch.testing.assert_close(penalty.double(), expected, rtol=1e-5, atol=1e-8)


def test_penalty_expectation_is_reps_times_frobenius_over_classes():
    torch.manual_seed(1)
    a = torch.randn(10, 48)
    model = Linear(a)
    x = torch.rand(4000, 3, 4, 4, requires_grad=True)
    penalty = jl_fd_penalty(model, x, model(x), reps=2, h=0.01)
    expected = 2 * a.pow(2).sum() / 10
    assert abs(penalty.mean().item() - expected.item()) / expected.item() < 0.05


def test_penalty_matches_finite_differences_of_a_nonlinear_model_up_to_h():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x = torch.rand(6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    torch.manual_seed(7)
    penalty = jl_fd_penalty(model, x, logits, reps=1, h=1e-4)
    torch.manual_seed(7)
    w = torch.randn(6, 5, dtype=torch.float64) / 5 ** 0.5
    jac = torch.func.vmap(torch.func.jacrev(lambda xi: model(xi.unsqueeze(0)).squeeze(0)))(x.detach())
    exact = torch.einsum("bc,bcd->bd", w, jac.flatten(2)).pow(2).sum(-1)  # ||J^T w||^2 per sample
    torch.testing.assert_close(penalty.double(), exact, rtol=1e-3, atol=1e-6)


def test_fidelity_is_zero_when_student_equals_base_on_clean_images():
    logits = torch.randn(8, 10)
    assert torch.count_nonzero(fidelity(logits, logits.softmax(-1))) == 0
    assert (fidelity(logits + torch.randn(8, 10), logits.softmax(-1)) > 0).all()


def test_noise_goes_to_exactly_half_of_the_batch_in_pixel_space():
    torch.manual_seed(3)
    images = torch.rand(10, 3, 8, 8)
    noisy, mask = noise_random_half(images, sigma=0.5)
    assert mask.sum() == 5
    assert torch.equal(noisy[~mask], images[~mask])
    assert abs((noisy[mask] - images[mask]).std().item() - 0.5) < 0.05


def test_gradients_reach_the_student_only():
    torch.manual_seed(4)
    student = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    base = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    for parameter in base.parameters():  # not frozen on purpose: the objective itself must not touch the base
        parameter.requires_grad_(True)
    parts = boot_camp_loss(student, base, torch.rand(6, 3, 4, 4), ObjectiveSettings(sigma=0.25, gamma=1.0), 0.5)
    parts.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in base.parameters())


def test_loss_is_fidelity_plus_weighted_penalty():
    torch.manual_seed(5)
    student = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    settings = ObjectiveSettings(sigma=0.5, gamma=1.0, reps=2)
    parts = boot_camp_loss(student, student, torch.rand(6, 3, 4, 4), settings, gamma_weight=0.3)
    expected = (parts.fidelity + 0.3 * 0.5 * 0.25 * parts.penalty).mean()
    torch.testing.assert_close(parts.loss.detach(), expected)
    assert parts.agreement.numel() == 3 and parts.agreement.eq(1).all()  # clean half: student == base


@pytest.mark.parametrize("classes, expected", [(1000, 0.05), (10, 0.0005), (100, 0.005)])
def test_gamma_is_stated_at_imagenet_class_count(classes, expected):
    assert effective_gamma(0.05, classes) == pytest.approx(expected)
