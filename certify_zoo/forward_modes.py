"""How the student's forwards behave during conversion: every stochastic layer off, BatchNorm by ``--bn-mode``.

The penalty's finite difference and the gamma controller's checks compare forwards of the same weights: a random mask
or moving running statistics between them would measure the mask or the statistics, not the model (a real ImageNet
model with BatchNorm in train mode lost its top-1 on most photos in two conversion steps).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .certificate_names import count_held_out
from .errors import CertifyZooError

# BatchNorm during conversion (the forward's other randomness, dropout and drop-path, is always off):
# "auto" (every recipe's default): "recompute" when the run has enough clean images and a large enough batch to
#   estimate the statistics, else "eval" (see resolve_bn_mode and docs, "Conversion safety");
# "eval": normalised with the base's running statistics, which never move;
# "recompute": normalised with each batch's statistics; the running statistics stay frozen during the run and are
#   re-estimated on clean conversion images at the end;
# "train": the paper's code: every forward, noisy and finite-difference ones included, moves the running statistics.
BN_MODES = ("auto", "eval", "recompute", "train")
BATCH_STATISTICS_MODES = ("recompute", "train")  # BatchNorm normalises each batch by its own statistics
# "auto" recomputes BatchNorm statistics only from at least this many conversion images, in batches of at least
# RECOMPUTE_MIN_BATCH: a BatchNorm CNN trained on 1,300 digits certified far more with "recompute" (Monte-Carlo at
# r = 0.5: 53% against 32% with "eval", 4 seeds), while a real ImageNet model converted on 11 photos in batches of 4
# lost predictions with it (statistics estimated from a handful of images) and kept them all with "eval"
RECOMPUTE_MIN_IMAGES = 1000
RECOMPUTE_MIN_BATCH = 16
# clean batches that re-estimate BatchNorm's running statistics at the end of a bn_mode "recompute" run
RECOMPUTE_BATCHES = 50


def batch_norms(module: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [child for child in module.modules() if isinstance(child, torch.nn.modules.batchnorm._BatchNorm)]


def stochastic_layers(module: torch.nn.Module) -> dict[str, int]:
    """Layers that would draw random masks in train mode (dropout, drop-path / stochastic depth, drop-block), by
    class name, whatever library defines them; only those with a non-zero rate are counted."""
    found: dict[str, int] = {}
    for child in module.modules():
        name = type(child).__name__
        if not any(word in name.lower() for word in ("dropout", "droppath", "dropblock", "stochasticdepth")):
            continue
        rate = next((getattr(child, attr) for attr in ("p", "drop_prob", "drop_rate", "rate")
                     if isinstance(getattr(child, attr, None), (int, float))), None)
        if rate is None or rate > 0:
            found[name] = found.get(name, 0) + 1
    return found


def resolve_bn_mode(bn_mode: str, model: torch.nn.Module, images: int | None, batch_size: int) -> str:
    """--bn-mode auto -> "recompute" for a model with BatchNorm converted on enough images in large enough batches
    (RECOMPUTE_MIN_IMAGES, RECOMPUTE_MIN_BATCH; a stream of unknown length counts as enough), else "eval"."""
    if bn_mode != "auto":
        return bn_mode
    enough = (images is None or images >= RECOMPUTE_MIN_IMAGES) and batch_size >= RECOMPUTE_MIN_BATCH
    return "recompute" if batch_norms(model) and enough else "eval"


def uses_batch_statistics(bn_mode: str, model: torch.nn.Module, batch_size: int, held_out: torch.Tensor | None) -> bool:
    """Whether BatchNorm normalises with batch statistics in this run; refused where a batch or the held-out slice
    would hold a single image, which batch statistics cannot normalise."""
    batch_statistics = bn_mode in BATCH_STATISTICS_MODES and bool(batch_norms(model))
    if batch_statistics and (batch_size < 2 or (held_out is not None and held_out.shape[0] < 2)):
        raise CertifyZooError(f"--bn-mode {bn_mode} normalises with batch statistics, which needs at least 2 images "
                              f"in every batch and held-out slice (batch size {batch_size}, "
                              f"{count_held_out(0 if held_out is None else held_out.shape[0])}): use --bn-mode eval, "
                              "or raise --batch-size / --check-images")
    return batch_statistics


def set_conversion_mode(student: torch.nn.Module, bn_mode: str) -> None:
    """Every conversion forward a deterministic function of its input: the whole student in eval mode, so Dropout,
    DropPath, stochastic depth and drop-connect are off in timm, transformers and plain torch modules alike (they all
    read ``self.training``); only BatchNorm follows ``bn_mode``. A random mask in the student would make the penalty's
    finite difference (w . v(x~ + h d) - w . v(x~)) / h measure the mask change, not the input gradient."""
    student.eval()
    if bn_mode in BATCH_STATISTICS_MODES:
        for norm in batch_norms(student):
            norm.train()


@contextlib.contextmanager
def running_statistics_kept(module: torch.nn.Module):
    """BatchNorm running statistics as they were before the block: its forwards measure the student and must not
    change it. With --bn-mode train every forward in train mode moves them (momentum 0.1), and the gamma controller's
    final check, run on noisy neighbours and points along each claim just before the model is saved, would otherwise
    leave most of its own statistics in the saved model."""
    norms = [norm for norm in batch_norms(module) if norm.track_running_stats]
    kept = [[buffer.clone() for buffer in (norm.running_mean, norm.running_var, norm.num_batches_tracked)]
            for norm in norms]
    try:
        yield
    finally:
        for norm, (mean, var, count) in zip(norms, kept):
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.num_batches_tracked.copy_(count)


class FrozenRunningStatistics:
    """bn_mode "recompute": BatchNorm normalises with batch statistics during conversion, but its running statistics
    do not move (momentum 0), and ``recompute`` re-estimates them at the end from clean images (a cumulative average,
    as in precise BatchNorm, Wu & Johnson 2021)."""

    def __init__(self, model: torch.nn.Module):
        self.norms = [norm for norm in batch_norms(model) if norm.track_running_stats]
        self.momenta = [norm.momentum for norm in self.norms]
        for norm in self.norms:
            norm.momentum = 0.0

    def recompute(self, model: Callable, batches, accelerator) -> int:
        """Running statistics = the average over ``batches`` (clean images) of each layer's batch statistics,
        weighted by batch size, averaged over processes. Returns the number of images used."""
        for norm in self.norms:  # train mode: the forwards below update the statistics (a run resumed after its
            norm.reset_running_stats()  # last step enters no training loop, and its norms were in eval mode)
            norm.train()
        seen = 0
        with torch.no_grad():
            for images in batches:
                for norm in self.norms:  # each batch weighs by its images: the mean is the images' mean
                    norm.momentum = images.shape[0] / (seen + images.shape[0])
                model(images)
                seen += images.shape[0]
        for norm, momentum in zip(self.norms, self.momenta):
            norm.momentum = momentum
            if accelerator.num_processes > 1:
                norm.running_mean.copy_(accelerator.reduce(norm.running_mean.clone(), "mean"))
                norm.running_var.copy_(accelerator.reduce(norm.running_var.clone(), "mean"))
        return seen
