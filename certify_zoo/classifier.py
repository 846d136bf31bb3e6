"""The contract every model source ends in: ImageClassifier (images in [0,1] in, logits out, preprocessing carried
with it) and the file names of a saved model. Its own module so that the timm and transformers loaders
(models.py, models_transformers.py) both build on it without importing each other."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from .errors import CertifyZooError
from .export import save_timm_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _forget_attention_biases(module: nn.Module, args) -> None:
    """Before each forward: timm's LeViT, EfficientFormer(V2), EfficientViT (MSRA) and TinyViT keep their attention
    biases gathered per device in eval mode, once, with the graph of that first forward. Conversion runs the student
    in eval mode (no dropout masks) while it trains it: a cached tensor would hold stale biases and a freed graph
    (the second backward fails), and one cached under inference_mode cannot enter the audit's autograd. Gathered
    anew, they cost one indexing per forward."""
    module.attention_bias_cache = {}


@functools.lru_cache(maxsize=None)
def imagenet_descriptions(num_classes: int) -> tuple[str, ...] | None:
    """The descriptions of the ImageNet subset with this many classes (timm's guess by class count), or None. Read
    once: timm reads them from its files, ~20 ms, and certify() asks on every call."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": num_classes})
    names = tuple(ImageNetInfo(subset).label_descriptions()) if subset else ()
    return names if len(names) == num_classes else None


class ImageClassifier(nn.Module):
    """A classifier over [0,1] images: normalisation is part of the model, not of the data."""

    def __init__(self, net: nn.Module, data_config: dict[str, Any], label_names: list[str] | None = None,
                 source: str = "timm", name: str = ""):
        super().__init__()
        self.net = net
        self.data_config = dict(data_config)
        self.label_names = list(label_names) if label_names else None
        self.source = source
        self.name = name
        mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, -1, 1, 1)
        # not persistent: the weights file holds only the source library's own state dict
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        channels = self.input_size[0]
        if channels not in (1, 3):
            raise CertifyZooError(f"{name or 'the model'} takes {channels}-channel images: certify-zoo reads images as "
                                  "RGB (3 channels) or grey (1)")
        if self.num_classes == 1:  # softmax of one logit is 1 everywhere: every radius would be infinite
            raise CertifyZooError(f"{name or 'the model'} has a single output logit (a sigmoid binary classifier?): "
                                  "certify-zoo certifies the softmax over 2 or more classes; give it the two logits "
                                  "[0, z] of the same classifier")
        for module in net.modules():
            if isinstance(getattr(module, "attention_bias_cache", None), dict):
                module.register_forward_pre_hook(_forget_attention_biases)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net((images - self.mean) / self.std)
        # timm's Inception-v3 built with aux_logits returns (logits, auxiliary logits) in every mode
        return logits[0] if isinstance(logits, (tuple, list)) else logits

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])

    def class_names(self) -> list[str] | None:
        """A name per class, to show: the model's label names; for a timm model without them whose class count is
        an ImageNet subset's (1000: ImageNet-1k), that subset's descriptions ("tabby, tabby cat"), as timm's
        inference script shows them (timm's guess by class count); else None. Shown, never saved with the model."""
        if self.label_names or self.source != "timm":
            return self.label_names
        names = imagenet_descriptions(self.num_classes)
        return list(names) if names else None

    def save(self, folder) -> None:
        """Write the model in its source library's own format (timm's: config.json with pretrained_cfg and
        model.safetensors), loadable by that library without certify-zoo."""
        save_timm_model(self.net, folder, self.label_names)

    def transform(self):
        """The model's own eval preprocessing (resize, centre crop) to a [0,1] tensor, without normalisation; grey
        for a model that takes one channel."""
        from timm.data import create_transform

        cfg = {k: self.data_config[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode")
               if k in self.data_config}
        from torchvision.transforms import Compose, ConvertImageDtype, Grayscale

        # without normalisation timm stops at a uint8 tensor; scale it to [0,1] floats
        steps = [create_transform(**cfg, is_training=False, normalize=False), ConvertImageDtype(torch.float32)]
        # images are read as RGB; a model trained on grey images (in_chans 1) gets their luma, as PIL's "L" mode
        return Compose(steps + ([Grayscale(num_output_channels=1)] if self.input_size[0] == 1 else []))


def require_class_logits(classifier: ImageClassifier, who: str, refusal: Callable[[str], str]) -> None:
    """Refuse, in one line, a classifier that does not map one blank image at its input size to (1, num_classes)
    logits: ``refusal(reason)`` when the forward raises, a line naming ``who`` and what came back otherwise. Without
    this, such a model failed at the conversion's first forward, after the data was read, in its library's words
    alone. One forward per load."""
    try:
        with torch.no_grad():
            logits = classifier(torch.zeros(1, *classifier.input_size))
    except (TypeError, ValueError, RuntimeError, AttributeError, AssertionError) as exc:
        raise CertifyZooError(refusal((str(exc).splitlines() or [type(exc).__name__])[0])) from exc
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, classifier.num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CertifyZooError(f"{who} returns {shape} for one image, not (1, {classifier.num_classes}) class logits")
