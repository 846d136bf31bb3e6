"""transformers image classifiers behind the same ImageClassifier contract as timm models.

The image processor's resize / centre crop become a torchvision transform to [0,1] tensors; its rescale,
mean and std become the wrapper's normalisation, so sigma and radii stay in [0,1] pixel space at the
processor's output size. Optional: needs ``pip install 'certify-zoo[transformers]'``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .classifier import CONFIG_NAME, ImageClassifier, require_class_logits
from .errors import CertifyZooError
from .export import move_in
from .hub_files import require_safetensors

EXTRA_HINT = "transformers models need the optional extra: pip install 'certify-zoo[transformers]'"
PROCESSOR_NAME = "preprocessor_config.json"
# PIL resampling codes as stored in image processor configs -> torchvision interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# transformers' own default for ConvNeXt-style processors (resize shortest_edge / crop_pct, then crop)
_CROP_PCT_BELOW = 384


def require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise CertifyZooError(EXTRA_HINT) from exc
    return transformers


def image_classifier_architectures() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def _check_config(config: dict, where: str, trust_remote_code: bool) -> None:
    """Refuse remote code without the flag and anything that is not an image classifier (a random head otherwise)."""
    architectures = config.get("architectures") or []
    if config.get("auto_map") and not trust_remote_code:
        raise CertifyZooError(f"{where} runs its own Python code (auto_map in {CONFIG_NAME}): pass --trust-remote-code "
                              "only if you trust its author")
    if config.get("auto_map"):
        return
    if not architectures or not any(name in image_classifier_architectures() for name in architectures):
        shown = ", ".join(architectures) or config.get("model_type", "unknown")
        raise CertifyZooError(f"{where} is not an image classifier ({shown}): certify-zoo needs an "
                              "AutoModelForImageClassification model with its trained classification head")
    if config.get("problem_type") in ("multi_label_classification", "regression"):
        # a sigmoid per label (or a value): one class per image, the softmax's top two, is not what it predicts
        raise CertifyZooError(f"{where} is a {config['problem_type'].replace('_', '-')} model: certify-zoo certifies "
                              "single-label classifiers, whose prediction is the softmax's top class")


def _interpolation(resample) -> str:
    """PIL resampling code (int), its enum, or a torchvision mode name -> a torchvision mode name."""
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value.lower()
    return _RESAMPLE.get(int(value), "bilinear")


def processor_config(processor_dict: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """(data_config, transform steps) from an image processor's saved config.

    data_config has timm's keys (input_size, mean, std, interpolation, crop_pct) so reports read the same.
    mean/std are rescaled so that the wrapper, fed [0,1] pixels, reproduces the processor's rescale + normalise.
    """
    size = processor_dict.get("size") or {}
    crop = processor_dict.get("crop_size") or {}
    do_crop = bool(processor_dict.get("do_center_crop")) and bool(crop)
    interpolation = _interpolation(processor_dict.get("resample", 2))
    steps: list[tuple[str, Any]] = []
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if processor_dict.get("do_resize", True):
        if size.get("height") and size.get("width"):
            steps.append(("resize", (size["height"], size["width"])))
            out = (size["height"], size["width"])
        elif size.get("shortest_edge"):
            edge = int(size["shortest_edge"])
            crop_pct = processor_dict.get("crop_pct")
            if crop_pct and edge < _CROP_PCT_BELOW:  # ConvNeXt/ResNet processors: resize up, crop back to edge
                steps += [("resize", int(edge / crop_pct)), ("crop", (edge, edge))]
            elif crop_pct:  # ... and from 384 up they warp to a square, without a crop
                steps.append(("resize", (edge, edge)))
            else:
                steps += [("resize", edge), ("crop", (edge, edge))]  # a batch needs one fixed size
            out = (edge, edge)
        else:
            raise CertifyZooError(f"image processor size {size} is not supported (need height/width or shortest_edge)")
    else:
        out = None
    if do_crop:
        out = (crop["height"], crop["width"])
        steps.append(("crop", out))
    if out is None:
        raise CertifyZooError("image processor neither resizes nor crops: the model's input size is unknown")
    # The model sees ((x * 255) * rescale_factor - mean) / std for x in [0,1]: fold the rescale into mean and std.
    scale = 255.0 * (processor_dict.get("rescale_factor", 1 / 255) if processor_dict.get("do_rescale", True) else 1.0)
    if processor_dict.get("do_normalize", True):
        mean = tuple(float(m) / scale for m in processor_dict.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(s) / scale for s in processor_dict.get("image_std", (0.5, 0.5, 0.5)))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0 / scale,) * 3
    data_config = {"input_size": (3, *out), "mean": mean, "std": std, "interpolation": interpolation,
                   "crop_pct": processor_dict.get("crop_pct", 1.0)}
    return data_config, steps


def build_transform(steps: list, interpolation: str, grey: bool = False):
    """PIL image -> float tensor in [0,1]: the processor's resize and crop, nothing else (``grey``: then the luma)."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    ops = [T.Resize(arg, interpolation=mode) if kind == "resize" else T.CenterCrop(arg) for kind, arg in steps]
    return T.Compose([*ops, T.PILToTensor(), T.ConvertImageDtype(torch.float32),
                      *([T.Grayscale(num_output_channels=1)] if grey else [])])


class TransformersImageClassifier(ImageClassifier):
    """AutoModelForImageClassification over [0,1] images: pixel_values in, logits out."""

    def __init__(self, net, processor, name: str = ""):
        processor_dict = processor.to_dict()
        data_config, self._steps = processor_config(processor_dict)
        channels = int(getattr(net.config, "num_channels", 3) or 3)
        if channels != 3:  # a grey model (num_channels 1); a processor may still list three means
            data_config.update(input_size=(channels, *data_config["input_size"][1:]),
                               mean=data_config["mean"][:channels], std=data_config["std"][:channels])
        id2label = net.config.id2label or {}
        labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(net.config.num_labels)]
        super().__init__(net, data_config, labels, source="transformers", name=name)
        self.processor = processor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=(images - self.mean) / self.std).logits

    @property
    def num_classes(self) -> int:
        return int(self.net.config.num_labels)

    def save(self, folder) -> None:
        """transformers' own format (save_pretrained, safetensors, image processor), moved in file by file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        try:
            self.net.save_pretrained(staging, safe_serialization=True)
            self.processor.save_pretrained(staging)
            files = sorted(p.name for p in staging.iterdir())
            # weights first, config.json last: config.json marks a complete folder
            for file in sorted(files, key=lambda n: (n == CONFIG_NAME, n)):
                move_in(staging / file, folder / file)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def transform(self):
        return build_transform(self._steps, self.data_config["interpolation"], grey=self.input_size[0] == 1)


def load_transformers_folder(folder: Path, name: str = "", trust_remote_code: bool = False) -> ImageClassifier:
    """A save_pretrained folder (config.json + safetensors + preprocessor_config.json) as an ImageClassifier."""
    transformers = require_transformers()
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    transformers.utils.logging.disable_progress_bar()  # our own progress bars are the ones that matter

    folder = Path(folder)
    where = name or str(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    _check_config(config, where, trust_remote_code)
    if not (folder / PROCESSOR_NAME).is_file():
        raise CertifyZooError(f"{where} has no {PROCESSOR_NAME}: its preprocessing (size, mean, std) is unknown; save "
                              "the image processor with save_pretrained next to the model")
    require_safetensors(folder, where)
    try:
        net = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True,
                                                              trust_remote_code=trust_remote_code)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise CertifyZooError(f"transformers cannot load {where}: {str(exc).splitlines()[0]}") from exc
    classifier = TransformersImageClassifier(net.eval(), processor, name=where)
    require_pixels_to_logits(classifier, where)
    return classifier


def require_pixels_to_logits(classifier: TransformersImageClassifier, where: str) -> None:
    """Refuse, in one line, an image-classification class that does not map one image's pixel_values to class logits.

    Some of transformers' image-classification classes take something else (ImageGPT: colour-cluster token ids;
    SigLIP 2: variable-resolution patch sequences) or return no logits; without this check they failed later, at the
    conversion's first forward, in transformers' own words."""
    who = f"{where} ({type(classifier.net).__name__})"
    require_class_logits(classifier, who, lambda reason: f"{who} does not map an image's pixels to class logits "
                                                         f"({reason}): certify-zoo converts classifiers whose forward "
                                                         "takes pixel_values alone")
