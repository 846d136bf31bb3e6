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
# mean |pixel difference| in [0,1] units above which certify-zoo's preprocessing is not the processor's
PROCESSOR_TOLERANCE = 0.01


def require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise CertifyZooError(EXTRA_HINT) from exc
    return transformers


def image_classifier_classes() -> dict[str, tuple[str, ...]]:
    """transformers' image-classification classes per model type: most types have one; DeiT and LeViT have a second
    (with a distillation head, the class of their distilled checkpoints), Perceiver three (one per input
    preprocessor)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return {model_type: tuple(classes) if isinstance(classes, (tuple, list)) else (classes,)
            for model_type, classes in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items()}


def image_classifier_architectures() -> set[str]:
    return {name for classes in image_classifier_classes().values() for name in classes}


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
    A step is ("resize", size), ("crop", (h, w)) as the processor crops, or ("fit", (h, w)): a centre crop the
    processor does not make, added because a batch needs one size (the check against the processor crops its
    output the same way).
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
                # LeViT's processor (either backend: LevitImageProcessorPil, ...Fast) resizes the shortest edge to
                # 256/224 of the size it is given
                levit = str(processor_dict.get("image_processor_type") or "").startswith("LevitImageProcessor")
                steps.append(("resize", int(256 / 224 * edge) if levit else edge))
                if not do_crop:
                    steps.append(("fit", (edge, edge)))
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
    # The model sees ((x * 255) * rescale_factor - offset - mean) / std / std' for x in [0,1]: fold the rescale,
    # EfficientNet's offset (rescale_offset: to [-1, 1]) and its second division (include_top) into mean and std.
    # A processor without do_normalize (MobileViT's) never normalises, whatever image_mean its base class lists.
    scale = 255.0 * (processor_dict.get("rescale_factor", 1 / 255) if processor_dict.get("do_rescale", True) else 1.0)
    offset = 1.0 if processor_dict.get("do_rescale", True) and processor_dict.get("rescale_offset") else 0.0
    mean, std = [offset] * 3, [1.0] * 3
    if processor_dict.get("do_normalize", False):
        mean = [offset + float(m) for m in processor_dict.get("image_mean", (0.5, 0.5, 0.5))]
        std = [float(s) for s in processor_dict.get("image_std", (0.5, 0.5, 0.5))]
    if processor_dict.get("include_top"):
        std = [s * float(t) for s, t in zip(std, processor_dict.get("image_std", (0.5, 0.5, 0.5)))]
    data_config = {"input_size": (3, *out), "mean": tuple(m / scale for m in mean),
                   "std": tuple(s / scale for s in std), "interpolation": interpolation,
                   "crop_pct": processor_dict.get("crop_pct", 1.0)}
    return data_config, steps


class CenterCrop:
    """transformers' centre crop: zero padding first where the image is smaller (the odd pixel after), then the
    offset rounded down. torchvision's CenterCrop rounds halves to even: one pixel off where that is up."""

    def __init__(self, size: tuple[int, int]):
        self.size = tuple(size)

    def __call__(self, image):
        """A PIL image or a (C, H, W) tensor, cropped (and padded) to ``size``."""
        from torchvision.transforms import functional as F

        height, width = self.size
        _, image_height, image_width = F.get_dimensions(image)
        pad_x, pad_y = max(width - image_width, 0), max(height - image_height, 0)
        if pad_x or pad_y:
            image = F.pad(image, [pad_x // 2, pad_y // 2, (pad_x + 1) // 2, (pad_y + 1) // 2], fill=0)
        _, image_height, image_width = F.get_dimensions(image)
        return F.crop(image, (image_height - height) // 2, (image_width - width) // 2, height, width)


def build_transform(steps: list, interpolation: str, grey: bool = False):
    """PIL image -> float tensor in [0,1]: the processor's resize and crop, nothing else (``grey``: then the luma)."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    ops = [T.Resize(arg, interpolation=mode) if kind == "resize" else CenterCrop(arg) for kind, arg in steps]
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
        self.bgr = hands_bgr(processor_dict) and channels == 3  # swapped inside forward: the images stay RGB

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB images -> what the image processor would hand the model."""
        values = (images - self.mean) / self.std
        return values.flip(1) if self.bgr else values

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=self.pixel_values(images)).logits

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
    require_processor_reproduced(classifier, where)
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


def hands_bgr(processor_dict: dict) -> bool:
    """Whether the image processor hands the model BGR (MobileViT's ``do_flip_channel_order``)."""
    return bool(processor_dict.get("do_flip_channel_order"))


def probe_images() -> list:
    """Two test photos for the processor check, a smooth pattern of its own phase per channel (so a resize's filter
    barely shows, and a channel swap does). Their sizes leave a centre crop a margin of 4k + 3 pixels, where
    rounding the offset half to even (torchvision) and down (transformers) part, after each of the usual resizes:
    shortest edge 224, 232, 236, 248 or 256 then crop 224, 288 then 256, 320 then 288, 342 then 299."""
    from PIL import Image

    images = []
    for height, width in ((201, 301), (294, 212)):
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        pattern = torch.stack([0.5 + 0.4 * torch.sin(2 * torch.pi * (rows / (13 + 4 * c) + cols / (19 + 3 * c)) + c)
                               for c in range(3)], dim=-1)
        images.append(Image.fromarray((pattern * 255).round().to(torch.uint8).numpy()))
    return images


def processor_gaps(processor, images: list) -> list[float]:
    """Per PIL RGB image, the mean |difference|, in [0,1] pixels, between certify-zoo's preprocessing (the resize,
    crop and normalisation read from the processor's config) and the processor's own pixel_values mapped back
    through that normalisation. Raises ValueError, saying how, where the two do not even make the same size, or the
    processor fails."""
    processor_dict = processor.to_dict()
    data_config, steps = processor_config(processor_dict)
    transform = build_transform(steps, data_config["interpolation"])
    mean, std = (torch.tensor(data_config[key]).view(-1, 1, 1) for key in ("mean", "std"))
    fit = [arg for kind, arg in steps if kind == "fit"]
    gaps = []
    for image in images:
        ours = transform(image)
        try:
            theirs = processor(images=image, return_tensors="pt")["pixel_values"][0].float()
        except Exception as exc:  # whatever a processor raises, the model cannot be fed as it was trained
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"it fails on a test photo: {reason}") from exc
        if fit and theirs.shape[1:] != ours.shape[1:]:
            theirs = CenterCrop(fit[0])(theirs)
        if theirs.shape != ours.shape:
            shape = "x".join(str(n) for n in theirs.shape[1:])
            raise ValueError(f"it makes {shape} images of a {image.height}x{image.width} photo, certify-zoo "
                             f"{'x'.join(str(n) for n in ours.shape[1:])}")
        if hands_bgr(processor_dict):
            theirs = theirs.flip(0)
        gaps.append((theirs * std + mean - ours).abs().mean().item())
    return gaps


def require_processor_reproduced(classifier: TransformersImageClassifier, where: str) -> None:
    """Refuse, in one line, a model whose image processor does something certify-zoo's resize, crop, normalisation
    and channel order do not (a stretch to sides that are multiples of 32, a thumbnail, a crop relative to the
    image): noise and radii live in the pixels certify-zoo feeds, so they must be the pixels the model was trained
    on.

    On the test photos, transformers' torchvision and PIL backends differ by 0.001 on average (their resampling);
    torchvision's centre crop, one pixel off, by 0.06 to 0.08; TextNet's stretch to multiples of 32 by 0.05."""
    if classifier.input_size[0] != 3:
        return  # a grey model reads the luma, which no processor makes; its resize and crop are the shared code's
    if getattr(classifier.net, "main_input_name", "pixel_values") != "pixel_values":
        return  # not pixels at all (ImageGPT's colour tokens): require_pixels_to_logits says what it takes
    try:
        gaps = processor_gaps(classifier.processor, probe_images())
    except ValueError as exc:
        raise CertifyZooError(_not_reproduced(classifier, where, str(exc))) from exc
    for gap in gaps:
        if gap > PROCESSOR_TOLERANCE:
            raise CertifyZooError(_not_reproduced(classifier, where, f"its pixels differ from certify-zoo's by "
                                                  f"{gap:.3f} on average on a test photo, over {PROCESSOR_TOLERANCE}"))


def _not_reproduced(classifier: TransformersImageClassifier, where: str, how: str) -> str:
    return (f"{where}: certify-zoo cannot reproduce its {type(classifier.processor).__name__} ({how}); it "
            "reproduces resize, centre crop, rescale, normalise and channel order: to convert the model on such "
            "pixels instead, save it beside a processor that does only these (ViTImageProcessor)")
