"""MODEL spec -> ImageClassifier: images in [0,1] at the model's input size in, logits out.

Every source (timm registry, timm folder, Hub repo) ends as the same wrapper, which carries its own
preprocessing (timm's ``pretrained_cfg``): mean/std are applied inside ``forward``, so sigma and radii
always live in [0,1] pixel space at ``input_size``.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CertifyZooError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])

    def transform(self):
        """The model's own eval preprocessing (resize, centre crop) to a [0,1] tensor, without normalisation."""
        from timm.data import create_transform

        cfg = {k: self.data_config[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode")
               if k in self.data_config}
        from torchvision.transforms import Compose, ConvertImageDtype

        # without normalisation timm stops at a uint8 tensor; scale it to [0,1] floats
        return Compose([create_transform(**cfg, is_training=False, normalize=False), ConvertImageDtype(torch.float32)])


@dataclass
class ModelSpec:
    """How a MODEL string was resolved, shown to the user."""

    kind: str  # "local-timm", "timm"
    location: str
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind}: {self.location}"


def resolve_model_spec(spec: str) -> ModelSpec:
    """Decide where a MODEL string points, in the documented order, without loading anything."""
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / CONFIG_NAME
        if not config.is_file():
            raise CertifyZooError(f"model folder {path} has no {CONFIG_NAME}: expected a timm-format folder "
                                  f"({CONFIG_NAME} + {WEIGHTS_NAME})")
        return ModelSpec("local-timm", str(path))
    if spec.startswith(("./", "/", "../", "~")) or path.suffix in {".pt", ".pth", ".bin", ".safetensors"}:
        raise CertifyZooError(f"model folder {spec} does not exist")
    name = spec.removeprefix("timm/")
    return ModelSpec("timm", name)


def _timm_architecture_or_error(name: str) -> str:
    import timm
    from timm.models import split_model_name_tag

    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
        raise CertifyZooError(f"unknown model {name!r}: not a local folder and not a timm model name{hint}")
    return arch


def _load_safetensors_into(net: nn.Module, weights: Path) -> None:
    from safetensors.torch import load_file

    if not weights.is_file():
        raise CertifyZooError(f"no {WEIGHTS_NAME} in {weights.parent}: certify-zoo loads safetensors weights only "
                              "(pickle files such as pytorch_model.bin are never unpickled)")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # a truncated or foreign file
        raise CertifyZooError(f"cannot read weights {weights}: {exc}") from exc
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CertifyZooError(f"weights in {weights} do not fit the architecture in its config.json "
                              f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")


def preprocessing_config(net: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=net)
    cfg["input_size"] = tuple(cfg["input_size"])
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return cfg


def load_timm_folder(folder: Path) -> ImageClassifier:
    """A timm-format folder (config.json + model.safetensors), built from config, weights from safetensors."""
    import timm
    from timm.models._hub import load_model_config_from_path

    try:
        pretrained_cfg, arch, model_args = load_model_config_from_path(folder)
    except (KeyError, json.JSONDecodeError) as exc:
        raise CertifyZooError(f"{folder / CONFIG_NAME} is not a timm config (no 'architecture'): {exc}") from exc
    _timm_architecture_or_error(arch)
    pretrained_cfg.pop("file", None)
    model_args = {"num_classes": pretrained_cfg.get("num_classes"), **model_args}
    net = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    _load_safetensors_into(net, folder / WEIGHTS_NAME)
    labels = pretrained_cfg.get("label_names")
    return ImageClassifier(net.eval(), preprocessing_config(net), labels, source="timm", name=str(folder))


def load_timm_pretrained(name: str, revision: str | None = None) -> ImageClassifier:
    """A timm registry name: architecture from timm, default pretrained tag, safetensors weights from its Hub repo."""
    import timm

    _timm_architecture_or_error(name)
    net = timm.create_model(name, pretrained=False)
    hub_id = net.pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        raise CertifyZooError(f"timm model {name!r} has no pretrained weights on the Hugging Face Hub")
    weights = _hub_file(hub_id, net.pretrained_cfg.get("hf_hub_filename") or WEIGHTS_NAME, revision)
    _load_safetensors_into(net, weights)
    return ImageClassifier(net.eval(), preprocessing_config(net), net.pretrained_cfg.get("label_names"),
                           source="timm", name=f"timm/{name}")


def _hub_file(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError as exc:  # first: it subclasses EntryNotFoundError
        raise CertifyZooError(f"cannot download {repo_id}/{filename}: no network and not in the Hugging Face cache "
                              "(connect, or pass a local model folder)") from exc
    except EntryNotFoundError as exc:
        raise CertifyZooError(f"{repo_id} has no {filename}: certify-zoo loads safetensors weights only") from exc
    except GatedRepoError as exc:
        raise CertifyZooError(f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise CertifyZooError(f"Hub repo {repo_id} not found (or private: set HF_TOKEN)") from exc
    except OSError as exc:
        raise CertifyZooError(f"cannot download {repo_id}/{filename}: {exc.__class__.__name__}") from exc


def load_classifier(spec: str, revision: str | None = None) -> ImageClassifier:
    """Resolve and load a MODEL spec into an ImageClassifier in eval mode."""
    resolved = resolve_model_spec(spec)
    if resolved.kind == "local-timm":
        model = load_timm_folder(Path(resolved.location))
    else:
        model = load_timm_pretrained(resolved.location, revision)
    if model.num_classes < 2:  # a backbone / feature extractor: there is no prediction to certify
        raise CertifyZooError(f"{spec} is not an image classifier (it has {model.num_classes} output classes, e.g. a "
                              "backbone saved without its head): pass a model with a classification head")
    return model
