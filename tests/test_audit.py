"""The adversarial audit itself: it catches a model built to be non-smooth, and it is exact on a linear model."""
from __future__ import annotations

import torch
from torch import nn

from certify_zoo.audit import PGDSettings, pgd_l2, statement, summarise_audit
from certify_zoo.certificates import certify_deterministic

SETTINGS = PGDSettings(steps=50, restarts=3)


def assert_verified_counterexamples(model, images, target, radius, result):
    """Every reported counterexample really changes the prediction, lies in [0,1] and inside the ball."""
    chosen = result.flipped
    adversarial = images[chosen] + result.perturbation[chosen]
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert torch.all(result.perturbation[chosen].flatten(1).norm(dim=1) <= radius[chosen] * (1 + 1e-5))
    assert torch.allclose(result.perturbation[chosen].flatten(1).norm(dim=1), result.distance[chosen], atol=1e-5)
    with torch.no_grad():
        assert torch.all(model(adversarial).argmax(-1) != target[chosen])


def saturated_mlp() -> nn.Module:
    """A small MLP with weights scaled by 300: saturated softmax, so it claims radii of ~2.6 * sigma, while its
    decision boundaries are as close as any ordinary network's (seeds torch's global generator)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for layer in (net[1], net[3]):
            layer.weight.mul_(300 ** 0.5)
    return net


def test_non_smooth_network_is_caught_inside_its_claimed_radii():
    net = saturated_mlp()
    images = torch.rand(24, 3, 4, 4)
    with torch.no_grad():
        cert = certify_deterministic(net(images), sigma=0.25)
    assert torch.all(cert.radius > 0.5)
    result = pgd_l2(net, images, cert.prediction, cert.radius, SETTINGS, torch.Generator().manual_seed(0))
    assert result.flipped.float().mean() >= 0.9
    assert_verified_counterexamples(net, images, cert.prediction, cert.radius, result)
    summary = summarise_audit(cert.radius, torch.ones(24, dtype=torch.bool), result, torch.arange(24), SETTINGS)
    assert summary["counterexamples"] == int(result.flipped.sum()) and summary["attacked"] == 24
    assert summary["worst"][0]["flip_distance"] < summary["worst"][0]["claimed_radius"]
    assert "found" in summary["statement"] and "sound" not in summary["statement"]


def test_attack_in_pieces_equals_the_whole_batch_and_bisects_only_the_flipped():
    """A CPU attacks in pieces (evaluate and the self-check pass certificates.forward_piece): each image's margin
    depends on that image alone, so the same restarts find the same counterexamples at the same distances; the
    bisection forwards the images the attack flipped, not the whole batch."""
    net = saturated_mlp()
    images = torch.rand(20, 3, 4, 4)
    with torch.no_grad():
        cert = certify_deterministic(net(images), sigma=0.25)
    radius = cert.radius * torch.linspace(0.05, 1.0, 20)  # the smallest balls hold no counterexample
    settings = PGDSettings(steps=20, restarts=2)
    whole = pgd_l2(net, images, cert.prediction, radius, settings, torch.Generator().manual_seed(0))
    assert 0 < int(whole.flipped.sum()) < 20
    forwards: list[int] = []
    counting = lambda x: forwards.append(len(x)) or net(x)  # noqa: E731
    pieces = pgd_l2(counting, images, cert.prediction, radius, settings, torch.Generator().manual_seed(0), piece=3)
    assert max(forwards) == 3
    assert torch.equal(pieces.flipped, whole.flipped)
    assert torch.equal(pieces.adversarial_class, whole.adversarial_class)
    assert torch.allclose(pieces.distance, whole.distance, equal_nan=True, atol=1e-5)
    sizes: list[int] = []
    one = pgd_l2(lambda x: sizes.append(len(x)) or net(x), images, cert.prediction, radius,
                 PGDSettings(steps=20, restarts=1, bisection_steps=5), torch.Generator().manual_seed(0))
    # 21 gradient forwards, each of the images without a counterexample yet (an image found is not stepped further:
    # an unsmoothed student's batch went on being stepped whole for the few claims that held), 5 bisection forwards
    # of the flipped images only, the final check
    flipped = int(one.flipped.sum())
    assert 0 < flipped < 20
    searching = sizes[:21]
    assert searching[0] == 20 and searching == sorted(searching, reverse=True) and searching[-1] == 20 - flipped
    assert sizes[21:] == [flipped] * 5 + [20]


def linear_model_with_known_radii(count: int = 12, classes: int = 3, dims: int = 48, seed: int = 0):
    """logits = W x + b on [0,1] images near the middle of the box; exact L2 radius of each prediction:
    min over other classes j of (z_y - z_j) / ||w_y - w_j|| (the box is far enough away not to matter)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dims, generator=generator)
    model = nn.Sequential(nn.Flatten(), nn.Linear(dims, classes))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.zero_()
    images = 0.5 + 0.02 * torch.randn(count, 3, 4, 4, generator=generator)
    with torch.no_grad():
        logits = model(images)
    prediction = logits.argmax(-1)
    radii = torch.full((count,), float("inf"))
    for j in range(classes):
        gap = logits.gather(1, prediction.view(-1, 1)).squeeze(1) - logits[:, j]
        distance = gap / (weight[prediction] - weight[j]).norm(dim=1).clamp_min(1e-12)
        radii = torch.where(prediction == j, radii, torch.minimum(radii, distance))
    assert radii.max() < 0.4  # so that the [0,1] box (0.5 away) plays no part
    return model, images, prediction, radii


def test_linear_model_unbroken_inside_exact_radius_and_broken_just_outside():
    model, images, prediction, radii = linear_model_with_known_radii()
    inside = pgd_l2(model, images, prediction, 0.98 * radii, SETTINGS, torch.Generator().manual_seed(0))
    assert not inside.flipped.any()
    assert torch.isnan(inside.distance).all() and torch.all(inside.adversarial_class == -1)
    outside = pgd_l2(model, images, prediction, 1.02 * radii, SETTINGS, torch.Generator().manual_seed(0))
    assert outside.flipped.all()
    assert_verified_counterexamples(model, images, prediction, 1.02 * radii, outside)
    # bisection along the ray brings the reported distance down to the exact radius
    assert torch.all(outside.distance >= radii * (1 - 1e-4)) and torch.all(outside.distance <= radii * 1.005)


def test_clean_audit_wording():
    text = statement(359, 0, PGDSettings(steps=100, restarts=4))
    assert text == "no counterexample found by PGD (359 points, 100 steps, 4 restarts)"
    # a withdrawn radius (kappa 0) leaves nothing to attack, which is not a clean audit
    assert statement(0, 0, PGDSettings(steps=100, restarts=4)) == ("nothing to attack: no image has a reported "
                                                                  "radius above 0")
    # one of a kind reads as one ("1 counterexamples among 1 points" had been printed)
    one_restart = PGDSettings(steps=5, restarts=1)
    assert statement(1, 0, one_restart) == "no counterexample found by PGD (1 point, 5 steps, 1 restart)"
    assert statement(8, 1, one_restart).startswith("PGD found 1 counterexample among 8 points ")
