"""The cheaper penalty estimator ("jl": fewer of the paper's terms, scaled, one graph at a time) against closed
forms on linear models and against the paper's single-graph loss on real timm models."""
from __future__ import annotations

import copy

import pytest
import torch

from certify_zoo.errors import CertifyZooError
from certify_zoo.estimators import jl_probe_backward
from certify_zoo.models import create_timm_model
from certify_zoo.objective import (PENALTY_ESTIMATORS, Draws, ObjectiveSettings, boot_camp_loss, boot_camp_step,
                                   jl_fd_penalty)

SHAPE = (3, 4, 4)  # D = 48 pixels
CLASSES = 10


def linear_student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, CLASSES, bias=False)).double()


def probe_terms(student, x, w, weight=0.0):
    """jl_probe_backward on a batch, fidelity zero: the per-sample sum of the probes' terms."""
    x = x.clone().requires_grad_(True)
    logits = student(x)
    return jl_probe_backward(student, x, logits, w, 0.01, weight, torch.Tensor.backward)


def test_each_term_is_the_norm_of_a_transpose_w_on_a_linear_model():
    """v(x) = A x: the finite difference along the normalised gradient is exact, so a term is ||A^T w||^2."""
    student = linear_student()
    matrix = student[1].weight.detach()
    x = torch.rand(5, *SHAPE, dtype=torch.float64)
    w = torch.randn(3, 5, CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) / CLASSES ** 0.5
    expected = (w @ matrix).pow(2).sum(-1).sum(0)  # summed over the 3 probes
    torch.testing.assert_close(probe_terms(student, x, w), expected.float(), rtol=1e-5, atol=1e-6)


def test_jl_penalty_is_scaled_to_reps_and_matches_the_paper_in_expectation():
    """Both estimate reps * ||A||_F^2 / C: the paper with 6 terms, jl with 2 terms scaled by 6 / 2."""
    student = linear_student()
    base = copy.deepcopy(student)
    # a linear model has the same Jacobian at every x: each sample of the batch is an independent draw
    x = torch.rand(4000, *SHAPE, dtype=torch.float64)
    target = 6 * student[1].weight.detach().pow(2).sum().item() / CLASSES
    torch.manual_seed(0)
    ours = boot_camp_step(student, base, x, ObjectiveSettings(estimator="jl", probes=2), 1.0).penalty
    paper = boot_camp_loss(student, base, x, ObjectiveSettings(estimator="paper"), 1.0).penalty
    # standard error of the mean: ~1.6% (jl) and ~0.9% (paper) of the target here
    assert abs(ours.mean().item() / target - 1) < 0.07
    assert abs(paper.mean().item() / target - 1) < 0.04
    # the price of fewer terms: variance ~ reps / probes = 3 times the paper's
    assert 2.2 < ours.var().item() / paper.var().item() < 4.0


def timm_case(arch: str):
    """A double-precision timm student and its frozen base at 32 px, six images (every other one noised) and four
    terms' projections: the same step for every estimator."""

    torch.manual_seed(0)
    student = create_timm_model(arch, num_classes=CLASSES, **({"img_size": 32} if "vit" in arch else {})).double()
    base = copy.deepcopy(student).eval()
    images = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    noised = torch.tensor([True, False] * 3)
    draws = Draws(torch.randn_like(images) * 0.25 * noised.view(-1, 1, 1, 1), noised,
                  torch.randn(4, 6, CLASSES, dtype=torch.float64) / CLASSES ** 0.5)
    return student, base, images, draws


@pytest.mark.parametrize("arch, tolerance", [("resnet10t", 1e-6), ("vit_tiny_patch16_224", 1e-3)])
def test_one_graph_at_a_time_gives_the_single_graph_gradient(arch, tolerance):
    """With probes = reps and the same draws, jl's several backward calls accumulate the gradient of the paper's
    one loss: exactly with BatchNorm in train mode (the coefficient read from each shifted forward, the student's
    forward rebuilt for the last backward), to O(h) on a ViT (the coefficient at its h -> 0 limit)."""
    from certify_zoo.estimators import couples_batch

    student, base, images, draws = timm_case(arch)
    student.train()
    assert couples_batch(student) == (arch == "resnet10t")
    forwards = []
    student.register_forward_pre_hook(lambda module, args: forwards.append(1))
    paper = boot_camp_loss(student, base, images, ObjectiveSettings(sigma=0.25, reps=4), 2.0, draws)
    paper.loss.backward()
    expected = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    paper_forwards, forwards[:] = len(forwards), []
    jl = boot_camp_step(student, base, images, ObjectiveSettings(sigma=0.25, reps=4, estimator="jl", probes=4), 2.0,
                        draws)
    # the student's and one shifted forward per term; the exact coefficient rebuilds the student's forward at the end
    assert paper_forwards == 1 + 4 and len(forwards) == paper_forwards + couples_batch(student)
    assert not jl.loss.requires_grad
    torch.testing.assert_close(jl.loss, paper.loss.detach(), rtol=1e-6, atol=0)  # the penalty: the same finite
    torch.testing.assert_close(jl.penalty, paper.penalty, rtol=1e-6, atol=0)  # differences either way
    for got, want in zip((p.grad for p in student.parameters()), expected):
        # finite differences (h = 0.01) cancel large terms: compare at the gradient's own scale
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance * float(want.abs().max()) + 1e-12)


class SavedTensors:
    """Counts the tensors autograd holds for backward (the graphs' memory), and their peak."""

    def __init__(self):
        self.live = self.peak = 0

    def __enter__(self):
        import weakref

        class Held:
            def __init__(self, tensor):
                self.tensor = tensor

        def pack(tensor):
            held = Held(tensor)
            self.live += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(held, self._freed)
            return held
        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor)
        self.hooks.__enter__()
        return self

    def _freed(self):
        self.live -= 1

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


@pytest.mark.parametrize("arch", ["resnet10t", "vit_tiny_patch16_224"])
def test_the_paper_step_is_its_single_graph_loss_one_graph_at_a_time(arch):
    """estimator "paper" in the loop's entry point: the gradient of boot_camp_loss (the paper's one loss, 1 + reps
    graphs kept until its backward) exactly, on a BatchNorm CNN and on a ViT alike, while holding one forward's
    graph at a time: each shifted forward is backpropagated before the next is built, the student's last."""
    student, base, images, draws = timm_case(arch)
    settings = ObjectiveSettings(sigma=0.25, reps=4, estimator="paper")
    student.train()
    with SavedTensors() as one_forward:
        student(images.clone().requires_grad_(True)).sum().backward()
    student.zero_grad()
    with SavedTensors() as single_graph:
        reference = boot_camp_loss(student, base, images, settings, 2.0, draws)
        reference.loss.backward()
    expected = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    with SavedTensors() as ours:
        step = boot_camp_step(student, base, images, settings, 2.0, draws)
    graph = one_forward.peak
    assert single_graph.peak >= (1 + 4) * graph and ours.peak <= graph + 8
    torch.testing.assert_close(step.loss, reference.loss.detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(step.penalty, reference.penalty, rtol=1e-9, atol=0)
    for got, want in zip((p.grad for p in student.parameters()), expected):
        # exact up to rounding, which the finite difference (h = 0.01) amplifies: at the gradient's own scale
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()) + 1e-12)


def test_gradient_reaches_the_student_and_lowers_its_jacobian():
    """One SGD step on the penalty alone shrinks the weights of a linear student (its Jacobian)."""
    student = linear_student()
    before = student[1].weight.detach().norm().item()
    w = torch.randn(2, 8, CLASSES, dtype=torch.float64) / CLASSES ** 0.5
    probe_terms(student, torch.rand(8, *SHAPE, dtype=torch.float64), w, weight=1.0)
    with torch.no_grad():
        student[1].weight -= 0.01 * student[1].weight.grad
    assert student[1].weight.detach().norm().item() < before


def test_boot_camp_step_with_the_jl_estimator_on_the_demo_base(demo_base):
    from certify_zoo.models import load_classifier

    student = load_classifier(str(demo_base)).train()
    base = load_classifier(str(demo_base)).eval().requires_grad_(False)
    settings = ObjectiveSettings(sigma=0.5, gamma=20.0, estimator="jl", probes=1)
    calls = []
    parts = boot_camp_step(student, base, torch.rand(6, 3, 8, 8), settings, 0.2,
                           backward=lambda loss: calls.append(loss.backward()))
    assert len(calls) == 2  # the student's forward, then the one probe's shifted forward
    assert parts.penalty.shape == (6,) and bool((parts.penalty > 0).all())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert set(PENALTY_ESTIMATORS) == {"paper", "jl"}


def test_given_projections_are_used_as_the_terms_ws():
    student = linear_student()
    matrix = student[1].weight.detach()
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    w = torch.randn(6, 4, CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) / CLASSES ** 0.5
    draws = Draws(torch.zeros_like(x), torch.zeros(4, dtype=torch.bool), w)
    parts = boot_camp_step(student, copy.deepcopy(student), x, ObjectiveSettings(estimator="jl", probes=2), 1.0, draws)
    expected = (w[:2] @ matrix).pow(2).sum(-1).sum(0) * 3
    torch.testing.assert_close(parts.penalty, expected.float(), rtol=1e-5, atol=1e-6)
    # the paper's estimator on the same draws: all six terms, unscaled
    torch.testing.assert_close(jl_fd_penalty(student, x.requires_grad_(True), student(x), 6, 0.01, w),
                               (w @ matrix).pow(2).sum(-1).sum(0).float(), rtol=1e-5, atol=1e-6)


def test_unknown_estimator_and_bad_probes_are_one_line_errors():
    from certify_zoo.conversion import ConvertSettings

    with pytest.raises(CertifyZooError, match="--estimator must be one of paper, jl"):
        ConvertSettings("m", "d", "o", objective=ObjectiveSettings(estimator="exact")).validate()
    for probes in (0, 7):  # 1..reps
        with pytest.raises(CertifyZooError, match="--probes between 1 and reps"):
            ConvertSettings("m", "d", "o", objective=ObjectiveSettings(estimator="jl", probes=probes)).validate()
    with pytest.raises(CertifyZooError, match="--probe-distribution must be one of gaussian, rademacher"):
        ConvertSettings("m", "d", "o", objective=ObjectiveSettings(probe_distribution="uniform")).validate()


def test_cli_rejects_an_unknown_estimator_in_one_line(tmp_path):
    from conftest import run_cli

    result = run_cli("convert", "resnet18", "--data", "demo", "--out", str(tmp_path / "o"), "--estimator", "exact")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'exact' is not one of 'paper', 'jl'" in result.stderr and not (tmp_path / "o").exists()


def test_clip_grad_norm_sets_the_step_length_of_a_conversion(demo_base, tmp_path):
    """One SGD step (no weight decay, momentum buffer = gradient): with the gradient clipped to norm c the weights
    move by lr * c, so halving c halves the step exactly, whichever estimator made the gradient."""
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.models import load_classifier
    from certify_zoo.recipes import load_recipe

    before = torch.cat([v.flatten() for v in load_classifier(str(demo_base)).state_dict().values()])
    moved = {}
    for clip in (1e-3, 2e-3):
        out = tmp_path / f"clip{clip:g}"
        convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                            max_steps=1, batch_size=8, weight_decay=0.0, estimator="jl",
                                            warmup=0.0, lr=10.0, lr_min=10.0, clip_grad_norm=clip))
        after = torch.cat([v.flatten() for v in load_classifier(str(out)).state_dict().values()])
        moved[clip] = (after - before).norm().item()
    # lr 10 at the recipe's reference batch 64, scaled linearly to 8 images: 1.25
    assert moved[1e-3] == pytest.approx(1.25e-3, rel=1e-2)
    assert moved[2e-3] / moved[1e-3] == pytest.approx(2.0, rel=1e-2)
    with pytest.raises(CertifyZooError, match="--clip-grad-norm"):
        ConvertSettings("m", "d", "o", clip_grad_norm=-1.0).validate()


def test_rademacher_probes_have_the_same_mean_and_no_variance_when_j_jt_is_diagonal():
    """w = +-1/sqrt(C): E[w w^T] = I/C as for the paper's Gaussian w, so the same expected penalty; a term is
    w^T (J J^T) w, which for a diagonal J J^T is tr(J J^T) / C for every draw (Hutchinson with Rademacher)."""
    student = linear_student()
    with torch.no_grad():  # orthogonal rows: J J^T diagonal, with unequal entries
        q, _ = torch.linalg.qr(torch.randn(48, CLASSES, dtype=torch.float64))
        student[1].weight.copy_(q.T * torch.arange(1, CLASSES + 1, dtype=torch.float64).unsqueeze(1))
    x = torch.rand(500, *SHAPE, dtype=torch.float64)
    target = 6 * student[1].weight.detach().pow(2).sum().item() / CLASSES
    settings = {d: ObjectiveSettings(estimator="jl", probes=1, probe_distribution=d)
                for d in ("gaussian", "rademacher")}
    torch.manual_seed(0)
    penalties = {d: boot_camp_step(student, copy.deepcopy(student), x, s, 1.0).penalty for d, s in settings.items()}
    torch.testing.assert_close(penalties["rademacher"], torch.full((500,), target, dtype=torch.float32), rtol=1e-4,
                               atol=0)
    assert abs(penalties["gaussian"].mean().item() / target - 1) < 0.15  # same mean, ...
    assert penalties["gaussian"].std().item() > 0.3 * target  # ... far from constant
