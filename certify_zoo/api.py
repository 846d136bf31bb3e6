"""The Python API: ``certify_zoo.load(REPO_ID_OR_DIR)`` and ``certify_zoo.certify(model, images)``.

    import certify_zoo
    model = certify_zoo.load("user/convnext_base-certified")   # or a local output folder
    result = certify_zoo.certify(model, images)                 # N x 3 x H x W floats in [0,1], or PIL images
    result.prediction, result.top_probabilities, result.radius
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CertifyZooError
from .export import CERTIFICATION_NAME, METADATA_NAME, read_json


class CertifiedModel(nn.Module):
    """A converted classifier with what it needs to certify: [0,1] images in, logits out, plus sigma and records."""

    def __init__(self, classifier: nn.Module, sigma: float, metadata: dict[str, Any] | None = None,
                 certification: dict[str, Any] | None = None, folder: Path | None = None):
        super().__init__()
        self.classifier = classifier
        self.sigma = float(sigma)
        self.metadata = metadata or {}
        self.certification = certification or {}
        self.folder = folder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.classifier.input_size

    @property
    def label_names(self) -> list[str] | None:
        return self.classifier.label_names

    def transform(self):
        """The model's own eval preprocessing: PIL image -> [0,1] tensor at input_size (no normalisation)."""
        return self.classifier.transform()


@dataclass
class Certificates:
    """Per image: predicted class (and its name), the top probabilities of softmax v(x), certified L2 radius."""

    prediction: torch.Tensor  # N, class index
    labels: list[str] | None  # N class names when the model has them
    top_probabilities: torch.Tensor  # N x k, descending
    top_classes: torch.Tensor  # N x k
    radius: torch.Tensor  # N, kappa * sigma/2 (PhiInv(p1) - PhiInv(p2)) of softmax(logits / T), [0,1] pixel L2
    radius_lipschitz: torch.Tensor  # N, the paper's looser Lipschitz bound, times kappa
    sigma: float
    kappa: float = 1.0  # the model's calibration factor (certify_zoo.json), already applied to the radii
    radius_raw: torch.Tensor | None = None  # N, before calibration
    temperature: float = 1.0  # the model's calibrated softmax temperature, already applied to the radii


def load(repo_id_or_dir: str | Path, revision: str | None = None, sigma: float | None = None,
         device: str | torch.device | None = None) -> CertifiedModel:
    """Load a certified model from a local output folder or a Hub repo (safetensors only), in eval mode.

    Warns (UserWarning) when the model's conversion withdrew its deterministic radius (kappa 0): ``certify`` then
    returns radius 0 for every image, and the Monte-Carlo certificate is what certifies the model."""
    from .hub import is_hub_repo_spec, snapshot
    from .models import load_classifier

    spec = str(repo_id_or_dir)
    folder = snapshot(spec, revision) if is_hub_repo_spec(spec) else Path(spec).expanduser()
    if not folder.is_dir():
        raise CertifyZooError(f"{spec} is neither a local folder nor a Hub repo id (NAMESPACE/NAME)")
    metadata = read_json(folder / METADATA_NAME)
    sigma = sigma if sigma is not None else metadata.get("sigma")
    if sigma is None:
        raise CertifyZooError(f"{spec} was not converted by certify-zoo (no {METADATA_NAME} with sigma): pass sigma=")
    from .certificates import Calibration

    if Calibration.of(metadata).withdrawn:  # a library warns, as timm and transformers do: certify() still answers
        from .card import withdrawal_text

        warnings.warn(f"{spec}: {withdrawal_text(metadata, f'certify-zoo evaluate {spec} --method monte-carlo')} "
                      "certify() returns radius 0 for every image.", UserWarning, stacklevel=2)
    classifier = load_classifier(str(folder))
    model = CertifiedModel(classifier, sigma, metadata, read_json(folder / CERTIFICATION_NAME), folder).eval()
    return model.to(device) if device is not None else model


@torch.no_grad()
def certify(model: CertifiedModel, images, top_k: int = 5, sigma: float | None = None) -> Certificates:
    """Certify a batch at the cost of one forward pass: class, top probabilities and deterministic L2 radius.

    ``images``: a float tensor N x C x H x W in [0,1] at the model's input size, or PIL images (one, or a list),
    which go through the model's own preprocessing (``model.transform()``: resize, crop) as ``predict`` does.

    The raw radius is a proof for the exact Gaussian average of the model, which a converted model approximates; the
    radius returned is the model's calibrated one (kappa <= 1 times the radius of its softmax at a temperature T),
    chosen by a PGD audit and rho on held-out images at the end of conversion (``result.radius_raw`` keeps the
    raw one). See the model card's
    audit and Monte-Carlo numbers for how close the approximation is.
    """
    from .certificates import Calibration, certify_deterministic

    sigma = sigma if sigma is not None else getattr(model, "sigma", None)
    if sigma is None:
        raise CertifyZooError("this model has no sigma: load it with certify_zoo.load or pass sigma=")
    images = _as_batch(images, model)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise CertifyZooError("images must be a float tensor N x C x H x W in [0,1] (C: 3, or 1 for a grey model), "
                              "or PIL images")
    expected = tuple(model.input_size)
    if tuple(images.shape[1:]) != expected:
        raise CertifyZooError(f"images are {tuple(images.shape[1:])} but the model certifies at {expected}: resize "
                              "with model.transform() first, or pass PIL images (radii are in pixels at the model's "
                              "input size)")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise CertifyZooError("images must be in [0,1] (the model normalises them itself)")
    parameter = next(model.parameters(), None)
    if parameter is not None:
        images = images.to(parameter.device)
    logits = model(images)
    raw = certify_deterministic(logits, sigma)
    calibration = Calibration.of(getattr(model, "metadata", {}))
    cert = calibration.certify(logits, sigma)
    top = logits.float().softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
    names = model.label_names
    labels = [names[i] for i in cert.prediction.tolist()] if names else None
    return Certificates(cert.prediction, labels, top.values, top.indices, cert.radius, cert.radius_lipschitz,
                        float(sigma), calibration.kappa, raw.radius, calibration.temperature)


def _as_batch(images, model: CertifiedModel):
    """PIL images (one, or a list) as the batch the model certifies: colour as the data pipeline reads files
    (data.as_rgb), then the model's preprocessing; anything else as it is."""
    from PIL import Image

    listed = [images] if isinstance(images, Image.Image) else images
    if not isinstance(listed, (list, tuple)) or not listed or not all(isinstance(i, Image.Image) for i in listed):
        return images
    from .data import as_rgb

    transform = model.transform()
    return torch.stack([transform(as_rgb(image)) for image in listed])
