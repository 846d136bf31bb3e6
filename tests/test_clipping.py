"""The median-norm gradient clip on real gradients: warm-up, the threshold, separate statistics per kind of step,
exact resume from its state, and Accelerate's clip as the clipping call."""
from __future__ import annotations

import json
import math

import pytest
import torch

from certify_zoo.clipping import MedianNormClip, fixed_clip_threshold, median_threshold


def total_norm(model: torch.nn.Module) -> float:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()


def model_with_gradient(scale: float, seed: int) -> torch.nn.Module:
    """A small conv net whose gradient (from a real backward) has norm about ``scale`` times its natural one."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 10))
    images, labels = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    (scale * torch.nn.functional.cross_entropy(model(images), labels)).backward()
    return model


def feed(clip: MedianNormClip, scales, penalty_step: bool, seed: int = 0) -> list[float]:
    return [clip(model_with_gradient(s, seed + i).parameters(), penalty_step) for i, s in enumerate(scales)]


def test_threshold_is_a_multiple_of_the_median_after_warmup():
    assert median_threshold([1.0, 2.0], 3.0, warmup=3) == math.inf
    assert median_threshold([1.0, 5.0, 2.0], 3.0, warmup=3) == 6.0
    assert median_threshold([4.0], 2.0, warmup=1) == 8.0
    with pytest.raises(ValueError):
        MedianNormClip(0.0)
    with pytest.raises(ValueError):
        MedianNormClip(2.0, window=4, warmup=5)


def test_no_clip_during_warmup_then_spikes_are_cut_to_the_threshold_and_ordinary_steps_kept():
    clip = MedianNormClip(multiple=2.0, window=8, warmup=4)
    spike = model_with_gradient(100.0, seed=99)
    before = total_norm(spike)
    assert clip(spike.parameters(), penalty_step=True) == pytest.approx(before)  # warm-up: measured only
    assert total_norm(spike) == pytest.approx(before)
    norms = feed(clip, [1.0] * 4, penalty_step=True)
    threshold = clip.threshold(True)
    expected = 2.0 * sorted([before, *norms])[2]  # median of the 5 recorded norms (spike included)
    assert threshold == pytest.approx(expected)
    ordinary = model_with_gradient(1.0, seed=7)
    kept = total_norm(ordinary)
    assert kept < threshold
    clip(ordinary.parameters(), penalty_step=True)
    assert total_norm(ordinary) == pytest.approx(kept)
    spike = model_with_gradient(100.0, seed=98)
    threshold = clip.threshold(True)
    returned = clip(spike.parameters(), penalty_step=True)
    assert returned > 10 * threshold  # the norm before clipping
    assert total_norm(spike) == pytest.approx(threshold, rel=1e-4)
    assert clip.clipped == {"penalty": 1, "fidelity": 0}


def test_penalty_and_fidelity_steps_keep_separate_medians():
    """k-weighted penalty steps (10x the gradient here) are not clipped by the median of cheap steps, and vice versa."""
    clip = MedianNormClip(multiple=2.0, window=16, warmup=4)
    fidelity_norms = feed(clip, [1.0] * 12, penalty_step=False)
    penalty_norms = feed(clip, [10.0] * 4, penalty_step=True, seed=100)
    middle = sorted(fidelity_norms)[5:7]  # the median of 12 is the mean of these two
    assert clip.threshold(False) == pytest.approx(middle[0] + middle[1])  # 2 x the median
    assert clip.threshold(True) > 5 * clip.threshold(False)
    penalty_step = model_with_gradient(10.0, seed=200)
    kept = total_norm(penalty_step)
    clip(penalty_step.parameters(), penalty_step=True)
    assert total_norm(penalty_step) == pytest.approx(kept)  # a penalty step of ordinary size passes
    fidelity_step = model_with_gradient(10.0, seed=200)
    clip(fidelity_step.parameters(), penalty_step=False)
    assert total_norm(fidelity_step) < kept / 2  # the same gradient on a fidelity-only step is a spike
    summary = clip.summary()
    assert summary["steps"] == {"penalty": 5, "fidelity": 13}
    assert summary["median_norm"]["penalty"] > 5 * summary["median_norm"]["fidelity"]
    assert min(penalty_norms) > max(fidelity_norms)


def test_state_round_trips_through_json_and_resumes_exactly():
    scales = [1.0, 2.0, 0.5, 30.0, 1.0, 1.5, 40.0, 1.0, 0.7, 50.0]
    uninterrupted = MedianNormClip(multiple=1.5, window=5, warmup=3)
    first = feed(uninterrupted, scales, penalty_step=True)
    resumed = MedianNormClip(multiple=1.5, window=5, warmup=3)
    feed(resumed, scales[:6], penalty_step=True)
    restored = MedianNormClip(multiple=9.0)  # the saved settings win
    restored.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    second = feed(restored, scales[6:], penalty_step=True, seed=6)
    assert second == first[6:]
    assert restored.state_dict() == uninterrupted.state_dict()
    clipped_after = [model_with_gradient(60.0, seed=300) for _ in range(2)]
    for clip, model in zip((uninterrupted, restored), clipped_after):
        clip(model.parameters(), penalty_step=True)
    assert torch.equal(*(torch.cat([p.grad.flatten() for p in m.parameters()]) for m in clipped_after))


def test_accelerate_clip_is_the_clipping_call():
    """With Accelerate's clip_grad_norm_ (what the loop passes) the result equals torch's own clip."""
    from certify_zoo.distributed import make_accelerator

    accelerator = make_accelerator()
    models = [accelerator.prepare(model_with_gradient(s, seed=i)) for i, s in enumerate([1.0, 1.2, 0.8, 1.1])]
    clip = MedianNormClip(multiple=1.0, window=4, warmup=4)
    for model in models:
        clip(model.parameters(), True, accelerator.clip_grad_norm_)
    spike = accelerator.prepare(model_with_gradient(20.0, seed=9))
    reference = model_with_gradient(20.0, seed=9)
    threshold = clip.threshold(True)
    norm = clip(spike.parameters(), True, accelerator.clip_grad_norm_)
    torch_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), threshold)
    assert norm == pytest.approx(torch_norm.item())
    for ours, theirs in zip(spike.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad)
    assert total_norm(spike) == pytest.approx(threshold, rel=1e-4)


def test_fixed_clip_keeps_a_lazy_penalty_steps_k_weighting():
    """A k-weighted penalty step (gradient k times an every-step one) passes a fixed clip that an every-step gradient
    just meets, undiminished; the fidelity-only steps between are clipped at the norm itself."""
    every, norm = 4, total_norm(model_with_gradient(1.0, seed=3))
    lazy = model_with_gradient(float(every), seed=3)
    before = total_norm(lazy)
    torch.nn.utils.clip_grad_norm_(lazy.parameters(), fixed_clip_threshold(norm * 1.001, every, penalty_step=True))
    assert total_norm(lazy) == pytest.approx(before) == pytest.approx(every * norm)
    cheap = model_with_gradient(float(every), seed=3)
    torch.nn.utils.clip_grad_norm_(cheap.parameters(), fixed_clip_threshold(norm, every, penalty_step=False))
    assert total_norm(cheap) == pytest.approx(norm, rel=1e-5)
    assert fixed_clip_threshold(norm, 1, penalty_step=True) == norm
