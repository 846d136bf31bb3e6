"""MODEL spec -> ImageClassifier: images in [0,1] at the model's input size in, logits out.

Every source (timm registry, timm folder, Hub repo) ends as the same wrapper, which carries its own
preprocessing (timm's ``pretrained_cfg``): mean/std are applied inside ``forward``, so sigma and radii
always live in [0,1] pixel space at ``input_size``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .classifier import CONFIG_NAME, WEIGHTS_NAME, ImageClassifier, require_class_logits
from .errors import CertifyZooError, did_you_mean
from .export import MODEL_ARGS_ATTRIBUTE, read_json
from .hub_files import hub_config, hub_file, hub_snapshot, require_safetensors

@dataclass
class ModelSpec:
    """How a MODEL string was resolved, shown to the user."""

    kind: str  # "local-timm", "local-transformers", "timm", "hub-timm", "hub-transformers"
    location: str
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind}: {self.location}"

    @property
    def library(self) -> str:
        return self.kind.rsplit("-", 1)[-1] if self.kind != "timm" else "timm"


# transformers' TimmWrapperForImageClassification saves a timm model (its architecture and pretrained_cfg in
# config.json, model_type "timm_wrapper") with every weight under this prefix: certify-zoo loads the timm model inside
TIMM_WRAPPER, TIMM_WRAPPER_PREFIX = "timm_wrapper", "timm_model."


def config_library(config: dict, where: str) -> str:
    """timm configs name one ``architecture``; transformers configs list ``architectures`` and a ``model_type``."""
    if "architecture" in config:
        return "timm"
    if "architectures" in config or "model_type" in config:
        return "transformers"
    raise CertifyZooError(f"{where} is neither a timm config (no 'architecture') nor a transformers config "
                          "(no 'architectures'/'model_type')")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.removeprefix("hf-hub:").split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def local_model_spec(spec: str) -> ModelSpec | None:
    """A MODEL that is a local folder, checked without any download; None for a name or a Hub id. A spec written as
    a path (./, /, ~, a weights file) that names no folder is refused here, before a recipe is guessed from it."""
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / CONFIG_NAME
        if not config.is_file():
            raise CertifyZooError(f"model folder {path} has no {CONFIG_NAME}: expected a timm folder ({CONFIG_NAME} + "
                                  f"{WEIGHTS_NAME}) or a transformers folder (save_pretrained)")
        try:
            library = config_library(json.loads(config.read_text()), str(config))
        except json.JSONDecodeError as exc:
            raise CertifyZooError(f"{config} is not valid json ({exc.msg})") from exc
        return ModelSpec(f"local-{library}", str(path))
    if spec.startswith(("./", "/", "../", "~")) or spec.endswith("/") \
            or path.suffix in {".pt", ".pth", ".bin", ".safetensors"}:
        raise CertifyZooError(f"model folder {spec} does not exist")
    return None


def resolve_model_spec(spec: str, revision: str | None = None) -> ModelSpec:
    """Decide where a MODEL string points, in the documented order; only a Hub repo's config.json is fetched.

    1. a local folder (timm or transformers format, told apart by its config.json),
    2. ``timm/NAME[.TAG]`` or a bare timm name (timm's registry and its pretrained tag),
    3. ``hf-hub:ORG/NAME`` or any ``ORG/NAME`` Hub repo, timm or transformers by its config.json.
    """
    local = local_model_spec(spec)
    if local is not None:
        return local
    if _names_timm_model(spec):
        return ModelSpec("timm", spec.removeprefix("timm/"))
    if not _looks_like_hub_id(spec):
        raise _names_no_model(spec)
    repo_id = spec.removeprefix("hf-hub:")
    library = config_library(hub_config(repo_id, revision), f"{repo_id}/{CONFIG_NAME}")
    return ModelSpec(f"hub-{library}", repo_id, {"revision": revision} if revision else {})


def require_model_spec(spec: str) -> None:
    """Refuse, before anything is downloaded, a MODEL that names nothing: a path to no folder, a timm name not in
    timm's registry, text that is no Hub id (a Hub repo is checked when it is fetched). evaluate had asked for --sigma
    first, and said what was wrong only once it was given."""
    if local_model_spec(spec) is None:
        if _names_timm_model(spec):
            _timm_architecture_or_error(spec.removeprefix("timm/"))
        elif not _looks_like_hub_id(spec):
            raise _names_no_model(spec)


def _names_timm_model(spec: str) -> bool:
    return spec.startswith("timm/") or "/" not in spec and not spec.startswith("hf-hub:")


def _names_no_model(spec: str) -> CertifyZooError:
    return CertifyZooError(f"cannot read MODEL {spec!r}: give a local folder, a timm name or a Hub id ORG/NAME")


def _timm_architecture_or_error(name: str) -> str:
    import timm
    from timm.models import split_model_name_tag

    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        hint = did_you_mean(arch, timm.list_models()) or " (see `timm.list_models()`)"
        raise CertifyZooError(f"unknown model {name!r}: not a local folder and not a timm model name{hint}")
    return arch


def _load_safetensors_into(net: nn.Module, weights: Path, prefix: str = "") -> None:
    """``prefix``: what every tensor name carries before the model's own (a TimmWrapper's ``timm_model.``)."""
    from safetensors.torch import load_file

    if not weights.is_file():
        raise CertifyZooError(f"no {WEIGHTS_NAME} in {weights.parent}: certify-zoo loads safetensors weights only "
                              "(pickle files such as pytorch_model.bin are never unpickled)")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # a truncated or foreign file; safetensors says 'No such file' where it may not read
        reason = exc if os.access(weights, os.R_OK) else "permission denied: make it readable"
        raise CertifyZooError(f"cannot read weights {weights}: {reason}") from exc
    if prefix:
        state = {name.removeprefix(prefix): tensor for name, tensor in state.items()}
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


NOT_MODEL_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "device", "dtype")


def create_timm_model(architecture: str, **kwargs) -> nn.Module:
    """``timm.create_model``, remembering the model's arguments where timm does not.

    timm records them (``_model_args``) only from 1.0.31 on, and ``save_for_hf`` writes them from that record:
    under timm 1.0.29 the demo's 2-block ViT was saved without them and came back as a default vit_tiny (size
    mismatch). ``save_timm_model`` passes what is remembered here explicitly, which every timm 1.0 writes."""
    import timm

    net = timm.create_model(architecture, **kwargs)
    if not hasattr(net, "_model_args"):
        setattr(net, MODEL_ARGS_ATTRIBUTE, {k: v for k, v in kwargs.items() if k not in NOT_MODEL_ARGS})
    return net


def load_timm_folder(folder: Path, name: str | None = None) -> ImageClassifier:
    """A timm-format folder (config.json + model.safetensors), built from config, weights from safetensors."""
    from timm.models._hub import load_model_config_from_path

    config = read_json(folder / CONFIG_NAME)
    wrapped = config.get("model_type") == TIMM_WRAPPER
    if wrapped:  # timm's parser reads neither its null model_args nor its top level
        if "pretrained_cfg" not in config:
            raise CertifyZooError(f"{folder / CONFIG_NAME} is a transformers TimmWrapper config without its timm "
                                  "pretrained_cfg: the model's preprocessing (size, mean, std) is unknown")
        pretrained_cfg, arch = dict(config["pretrained_cfg"]), config["architecture"]
        model_args = config.get("model_args") or {}
        pretrained_cfg.update({key: config[key] for key in ("num_classes", "label_names") if key in config})
    else:
        try:
            pretrained_cfg, arch, model_args = load_model_config_from_path(folder)
        except (KeyError, json.JSONDecodeError) as exc:
            raise CertifyZooError(f"{folder / CONFIG_NAME} is not a timm config (no 'architecture'): {exc}") from exc
    _timm_architecture_or_error(arch)
    pretrained_cfg.pop("file", None)
    model_args = {"num_classes": pretrained_cfg.get("num_classes"), **model_args}
    net = create_timm_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    require_safetensors(folder, str(folder))
    _load_safetensors_into(net, folder / WEIGHTS_NAME, TIMM_WRAPPER_PREFIX if wrapped else "")
    if not getattr(net, "num_classes", 0):
        raise CertifyZooError(f"{folder} is a feature extractor (num_classes 0), not an image classifier")
    labels = pretrained_cfg.get("label_names")
    return ImageClassifier(net.eval(), preprocessing_config(net), labels, source="timm", name=name or str(folder))


def load_timm_pretrained(name: str, revision: str | None = None) -> ImageClassifier:
    """A timm registry name: architecture from timm, default pretrained tag, safetensors weights from its Hub repo."""
    import timm

    _timm_architecture_or_error(name)
    net = timm.create_model(name, pretrained=False)
    hub_id = net.pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        raise CertifyZooError(f"timm model {name!r} has no pretrained weights on the Hugging Face Hub")
    weights = hub_file(hub_id, net.pretrained_cfg.get("hf_hub_filename") or WEIGHTS_NAME, revision)
    _load_safetensors_into(net, weights)
    return ImageClassifier(net.eval(), preprocessing_config(net), net.pretrained_cfg.get("label_names"),
                           source="timm", name=f"timm/{name}")


def load_classifier(spec: str, revision: str | None = None, trust_remote_code: bool = False,
                    console=None) -> ImageClassifier:
    """Resolve and load a MODEL spec into an ImageClassifier in eval mode, saying how it was resolved."""
    resolved = resolve_model_spec(spec, revision)
    if console is not None:
        from rich.markup import escape

        console.print(escape(f"model {spec!r} -> {resolved.describe()}"))
    if resolved.kind == "timm":
        return require_forward_at_input_size(load_timm_pretrained(resolved.location, revision))
    if resolved.kind.startswith("hub-"):
        folder = hub_snapshot(resolved.location, revision, with_code=trust_remote_code)
    else:
        folder = Path(resolved.location)
    if resolved.library == "timm":
        return require_forward_at_input_size(load_timm_folder(folder, name=spec))
    from .models_transformers import load_transformers_folder

    return load_transformers_folder(folder, name=spec, trust_remote_code=trust_remote_code)


def require_forward_at_input_size(classifier: ImageClassifier) -> ImageClassifier:
    """Refuse, in one line naming the size, a timm model that cannot classify one image at the input size its config
    gives (a ConvNeXt configured for 24x32 images: "Calculated padded input size per channel: (1 x 2)").
    transformers classes get their own line (require_pixels_to_logits)."""
    size = "x".join(str(side) for side in classifier.input_size)
    require_class_logits(classifier, classifier.name,
                         lambda reason: f"{classifier.name} cannot classify an image at the input size its config "
                                        f"gives, {size} ({reason}): give it an input_size it runs at")
    return classifier
