"""The cheaper penalty estimator ("jl": fewer of the paper's terms, scaled) against closed forms on linear models."""
from __future__ import annotations

import pytest
import torch

from certify_zoo.errors import CertifyZooError
from certify_zoo.estimators import jl_fd_terms, jl_probe_penalty
from certify_zoo.objective import PENALTY_ESTIMATORS, ObjectiveSettings, boot_camp_loss, jl_fd_penalty

SHAPE = (3, 4, 4)  # D = 48 pixels
CLASSES = 10


def linear_model(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(CLASSES, torch.Size(SHAPE).numel(), generator=generator, dtype=torch.float64)
    return matrix, (lambda x: x.flatten(1) @ matrix.T)


def test_each_term_is_the_norm_of_a_transpose_w_on_a_linear_model():
    """v(x) = A x: the finite difference along the normalised gradient is exact, so a term is ||A^T w||^2."""
    matrix, model = linear_model()
    x = torch.rand(5, *SHAPE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) / CLASSES ** 0.5
    terms = jl_fd_terms(model, x, model(x), w, h=0.01)
    expected = (w @ matrix).pow(2).sum(-1)  # probes x B
    torch.testing.assert_close(terms, expected.float(), rtol=1e-5, atol=1e-6)


def test_probe_penalty_is_scaled_to_reps_and_matches_the_paper_in_expectation():
    """Both estimate reps * ||A||_F^2 / C: the paper with 6 terms, jl with 2 terms scaled by 6 / 2."""
    matrix, model = linear_model()
    # a linear model has the same Jacobian at every x: each sample of the batch is an independent draw
    x = torch.rand(4000, *SHAPE, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    target = 6 * matrix.pow(2).sum().item() / CLASSES
    torch.manual_seed(0)
    ours = jl_probe_penalty(model, x, logits, reps=6, h=0.01, probes=2).detach()
    paper = jl_fd_penalty(model, x, logits, reps=6, h=0.01).detach()
    # standard error of the mean: ~1.6% (jl) and ~0.9% (paper) of the target here
    assert abs(ours.mean().item() / target - 1) < 0.07
    assert abs(paper.mean().item() / target - 1) < 0.04
    # the price of fewer terms: variance ~ reps / probes = 3 times the paper's
    assert 2.2 < ours.var().item() / paper.var().item() < 4.0


def test_with_as_many_probes_as_reps_it_is_the_paper_estimator():
    """Same random draws in the same order: identical terms, only the shifted forwards are batched."""
    _, model = linear_model()
    x = torch.rand(4, *SHAPE, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    torch.manual_seed(3)
    w = torch.randn(6, 4, CLASSES, dtype=torch.float64) / CLASSES ** 0.5
    batched = jl_fd_terms(model, x, logits, w, h=0.01).sum(0)
    sequential = sum((((w[r] @ (model(x.detach() + 0.01 * d) - logits).T).diagonal()) / 0.01).pow(2)
                     for r, d in enumerate(_directions(model, x, logits, w)))
    torch.testing.assert_close(batched, sequential.float(), rtol=1e-5, atol=1e-6)


def _directions(model, x, logits, w):
    for r in range(w.shape[0]):
        (g,) = torch.autograd.grad((w[r] * logits).sum(), x, retain_graph=True)
        yield g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def test_gradient_reaches_the_student_and_lowers_its_jacobian():
    """One SGD step on the penalty alone shrinks the weights of a linear student (its Jacobian)."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, CLASSES))
    before = student[1].weight.detach().norm().item()
    x = torch.rand(8, *SHAPE, requires_grad=True)
    jl_probe_penalty(student, x, student(x), reps=6, h=0.01, probes=2).mean().backward()
    with torch.no_grad():
        student[1].weight -= 0.01 * student[1].weight.grad
    assert student[1].weight.detach().norm().item() < before


def test_boot_camp_loss_with_the_jl_estimator_on_a_timm_model(demo_base):
    from certify_zoo.models import load_classifier

    student = load_classifier(str(demo_base)).train()
    base = load_classifier(str(demo_base)).eval().requires_grad_(False)
    settings = ObjectiveSettings(sigma=0.5, gamma=20.0, estimator="jl", probes=2)
    parts = boot_camp_loss(student, base, torch.rand(6, 3, 8, 8), settings, gamma_weight=0.2)
    parts.loss.backward()
    assert parts.penalty.shape == (6,) and bool((parts.penalty > 0).all())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert set(PENALTY_ESTIMATORS) == {"paper", "jl"}


def test_unknown_estimator_and_bad_probes_are_one_line_errors():
    from certify_zoo.convert import ConvertSettings

    with pytest.raises(CertifyZooError, match="--estimator must be one of paper, jl"):
        ConvertSettings("m", "d", "o", objective=ObjectiveSettings(estimator="exact")).validate()
    with pytest.raises(CertifyZooError, match="--probes"):
        ConvertSettings("m", "d", "o", objective=ObjectiveSettings(estimator="jl", probes=0)).validate()


def test_cli_rejects_an_unknown_estimator_in_one_line(tmp_path):
    from conftest import run_cli

    result = run_cli("convert", "resnet18", "--data", "demo", "--out", str(tmp_path / "o"), "--estimator", "exact")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--estimator must be one of paper, jl" in result.stderr and not (tmp_path / "o").exists()


def test_given_projections_are_used_as_the_terms_ws():
    matrix, model = linear_model()
    x = torch.rand(4, *SHAPE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) / CLASSES ** 0.5
    penalty = jl_probe_penalty(model, x, model(x), reps=6, h=0.01, probes=2, projections=w)
    expected = (w[:2] @ matrix).pow(2).sum(-1).sum(0) * 3
    torch.testing.assert_close(penalty, expected.float(), rtol=1e-5, atol=1e-6)
