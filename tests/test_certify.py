"""Certificates against hand-computed values and a model whose smoothed classifier is known exactly."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import beta, norm

from certify_zoo.certificate_names import monte_carlo_reach, reach_short_of
from certify_zoo.certificates import (ABSTAIN, CPU_NOISY_INPUT_ELEMENTS, Smooth, average_certified_radius,
                                 certified_accuracy, certify_deterministic, clopper_pearson_lower, gaussian_radius,
                                 lipschitz_radius, noisy_batch_size)


def logits_for(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def test_deterministic_radii_match_hand_computation():
    cert = certify_deterministic(logits_for([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]]), sigma=0.5)
    assert cert.prediction.tolist() == [0, 1]
    expected = [0.25 * (norm.ppf(0.7) - norm.ppf(0.2)), 0.25 * (norm.ppf(0.5) - norm.ppf(0.4))]
    torch.testing.assert_close(cert.radius, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    lipschitz = [(0.7 - 0.2) * 0.5 / math.sqrt(2 / math.pi), (0.5 - 0.4) * 0.5 / math.sqrt(2 / math.pi)]
    torch.testing.assert_close(cert.radius_lipschitz, torch.tensor(lipschitz), rtol=1e-5, atol=1e-6)
    assert (cert.radius_lipschitz <= cert.radius + 1e-6).all()  # the Lipschitz bound is the looser one here


def test_saturated_and_tied_probabilities_give_finite_radii():
    saturated = certify_deterministic(torch.tensor([[100.0, -100.0, -100.0]]), sigma=0.25)
    assert saturated.p1.item() == 1.0 and torch.isfinite(saturated.radius).all()
    assert 0.25 / 2 * 10 < saturated.radius.item() < 0.25 / 2 * 25  # PhiInv(1-eps) - PhiInv(~0): large, finite
    tied = certify_deterministic(torch.tensor([[2.0, 2.0, 0.0]]), sigma=0.25)
    assert tied.radius.item() == 0.0 and tied.radius_lipschitz.item() == 0.0
    assert not torch.isnan(gaussian_radius(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), 1.0)).any()
    lipschitz = lipschitz_radius(torch.tensor([1.0]), torch.tensor([0.0]), 1.0).item()
    assert lipschitz == pytest.approx(math.sqrt(math.pi / 2))


def test_certified_accuracy_counts_abstentions_as_wrong_over_the_full_denominator():
    radii = torch.tensor([0.0, 0.3, 0.6, 1.2])
    correct = torch.tensor([True, True, False, True])
    assert certified_accuracy(radii, correct, [0.0, 0.25, 0.5, 1.0, 2.0]) == [0.75, 0.5, 0.25, 0.25, 0.0]
    assert average_certified_radius(radii, correct) == pytest.approx((0.0 + 0.3 + 1.2) / 4)


def test_clopper_pearson_matches_the_beta_quantile():
    k = torch.tensor([0, 5, 990, 1000])
    expected = [0.0, beta.ppf(0.001, 5, 996), beta.ppf(0.001, 990, 11), beta.ppf(0.001, 1000, 1)]
    torch.testing.assert_close(clopper_pearson_lower(k, 1000, 0.001).double(),
                               torch.tensor(expected, dtype=torch.float64))


class FirstPixelSign(torch.nn.Module):
    """Class 1 when the first pixel exceeds 0.5: its Gaussian smoothing is known, P = Phi((x0 - 0.5) / sigma)."""

    def forward(self, x):
        score = (x.flatten(1)[:, 0] - 0.5) * 1e4
        return torch.stack([-score, score], dim=1)


def test_monte_carlo_certify_recovers_the_exact_smoothed_radius():
    sigma, n = 0.25, 20_000
    images = torch.zeros(3, 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0.9, 0.55, 0.5])
    smooth = Smooth(FirstPixelSign(), num_classes=2, sigma=sigma)
    prediction, radius, p_lower = smooth.certify(images, n0=100, n=n, alpha=0.001, batch_size=4096,
                                                 generator=torch.Generator().manual_seed(0))
    exact_radius = 0.9 - 0.5  # sigma * PhiInv(Phi(0.4 / sigma)): distance to the decision boundary
    assert prediction[0] == 1 and exact_radius - 0.03 < radius[0] <= exact_radius + 0.005
    assert prediction[2] == ABSTAIN and radius[2] == 0  # on the boundary: pA = 1/2, must abstain
    assert p_lower[0] <= norm.cdf(0.4 / sigma)


def test_monte_carlo_reach_is_the_radius_certify_gives_a_model_that_never_changes_its_mind():
    """Every draw of one class is the most CERTIFY can see: its radius, whatever the model, is the reach."""
    for sigma, n in ((0.25, 1000), (0.5, 200)):
        smooth = Smooth(lambda x: torch.tensor([[5.0, 0.0]]).expand(len(x), 2), num_classes=2, sigma=sigma)
        _, radius, _ = smooth.certify(torch.rand(2, 1, 2, 2), n0=10, n=n, alpha=0.001, batch_size=512)
        torch.testing.assert_close(radius, torch.full_like(radius, monte_carlo_reach(sigma, n, 0.001)), rtol=1e-5,
                                   atol=0)
    assert 2.45 < monte_carlo_reach(1.0, 1000, 0.001) < 2.47  # Phi^-1(0.001^(1/1000))
    block = {"n": 1000, "alpha": 0.001}
    assert reach_short_of(block, 0.25, [0.0, 0.25, 0.5]) is None
    assert reach_short_of(block, 0.25, [0.0, 0.5, 0.75]) == pytest.approx(0.6158, abs=1e-4)
    assert reach_short_of({"certified_accuracy": []}, 0.25, [1.0]) is None  # no n: nothing to say


def test_monte_carlo_predict_abstains_on_the_boundary_and_answers_far_from_it():
    images = torch.zeros(2, 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0.95, 0.5])
    smooth = Smooth(FirstPixelSign(), num_classes=2, sigma=0.25)
    assert smooth.predict(images, n=2000, alpha=0.001, batch_size=1000,
                          generator=torch.Generator().manual_seed(1)).tolist() == [1, ABSTAIN]


class RecordingClassifier(torch.nn.Module):
    """Remembers every noisy batch it is shown; predicts class 0."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], 2)


def test_monte_carlo_noise_is_fresh_per_sample_and_shared_across_images_of_a_chunk():
    """Each image gets n independent N(0, sigma^2 I) draws (all its certificate needs); within a chunk the
    images share them, so drawing costs one image's worth per sample instead of the whole batch's."""
    sigma, images = 0.5, torch.rand(3, 1, 8, 8)
    model = RecordingClassifier()
    Smooth(model, 2, sigma).certify(images, n0=2, n=4, alpha=0.001, batch_size=6,
                                    generator=torch.Generator().manual_seed(0))
    noise = [(batch.view(3, -1, 1, 8, 8) - images.unsqueeze(1)) for batch in model.seen]  # image x sample
    assert [n.shape[1] for n in noise] == [2, 2, 2]  # 6 per forward = 2 samples of each of the 3 images
    for chunk in noise:
        torch.testing.assert_close(chunk[1], chunk[0])  # shared across images ...
        torch.testing.assert_close(chunk[2], chunk[0])
    per_image = torch.cat([chunk[0] for chunk in noise])  # ... all 6 samples of image 0 distinct
    assert torch.cdist(per_image.flatten(1), per_image.flatten(1)).add(100 * torch.eye(6)).min() > 1.0
    assert abs(per_image.std().item() / sigma - 1) < 0.15


def test_noisy_batch_size_keeps_the_input_memory_of_the_batch_size_at_224_on_a_gpu():
    assert noisy_batch_size(64, (3, 224, 224), "cuda") == 64
    assert noisy_batch_size(64, (3, 32, 32), "cuda") == 64 * 49
    assert noisy_batch_size(64, (3, 8, 8), "cuda") == 10_000  # capped
    assert noisy_batch_size(64, (3, 448, 448), "cuda") == 64  # never fewer than the batch


def test_noisy_batch_size_on_a_cpu_fits_its_input_budget_whatever_the_batch():
    budget = CPU_NOISY_INPUT_ELEMENTS
    for size in (8, 16, 32, 224):
        chunk = noisy_batch_size(64, (3, size, size), "cpu")
        assert chunk * 3 * size * size <= budget < (chunk + 1) * 3 * size * size  # as many as fit
        assert chunk < noisy_batch_size(64, (3, size, size), "cuda")  # smaller than a GPU's batch, at 224 px too
    assert noisy_batch_size(64, (3, 2048, 2048), "cpu") == 1  # an image above the budget: one at a time
    assert noisy_batch_size(64, (3, 8, 8), "cpu", cpu_input_elements=2 ** 30) == 10_000  # the cap still holds


def test_a_noisy_batch_smaller_than_the_images_forwards_in_pieces_with_the_same_noise_and_counts():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    sizes = []
    smooth = Smooth(lambda x: sizes.append(len(x)) or net(x), num_classes=5, sigma=0.5)
    images = torch.rand(7, 3, 4, 4)
    whole = smooth.sample_noise(images, 12, 7, torch.Generator().manual_seed(1), with_probabilities=True)
    assert sizes == [7] * 12  # one noisy copy of every image per forward
    sizes.clear()
    pieces = smooth.sample_noise(images, 12, 3, torch.Generator().manual_seed(1), with_probabilities=True)
    assert sizes == [3, 3, 1] * 12  # the same copies, three images per forward
    torch.testing.assert_close(pieces[0], whole[0], rtol=0, atol=0)
    torch.testing.assert_close(pieces[1], whole[1])
    assert int(whole[0].sum()) == 7 * 12
