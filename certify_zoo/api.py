"""The Python API: ``certify_zoo.load(REPO_ID_OR_DIR)``, ``certify_zoo.certify(model, images)`` (one forward pass)
and ``certify_zoo.certify_monte_carlo(model, images)`` (Cohen et al.'s CERTIFY, the provable certificate); and the
commands ``convert`` and ``evaluate`` as functions (``certify_zoo.convert(MODEL, OUT, data=...)``).

    import certify_zoo
    model = certify_zoo.load("user/convnext_base-certified")   # or a local output folder
    result = certify_zoo.certify(model, images)                 # N x 3 x H x W floats in [0,1], or PIL images
    result.prediction, result.top_probabilities, result.radius
    proof = certify_zoo.certify_monte_carlo(model, images, n=10_000)
    proof.prediction, proof.radius                              # -1 (ABSTAIN) where CERTIFY abstains
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import (CertifyZooError, is_main_process, require_at_least_one, require_failure_probability,
                     require_known_settings, require_sigma)
from .export import CERTIFICATION_NAME, METADATA_NAME, read_json


# evaluate's and predict's default --batch-size: the API forwards in the pieces (certificates.noisy_batch_size) they
# take, so that its answers are theirs
BATCH_SIZE = 64


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

    def class_names(self) -> list[str] | None:
        """Names to show per class: the label names, or ImageNet's for a timm model of 1000 classes without them."""
        return self.classifier.class_names()

    def transform(self):
        """The model's own eval preprocessing: PIL image -> [0,1] tensor at input_size (no normalisation)."""
        return self.classifier.transform()


@dataclass
class Certificates:
    """Per image: predicted class (and its name), the top probabilities of softmax v(x), certified L2 radius."""

    prediction: torch.Tensor  # N, class index
    labels: list[str] | None  # N class names when the model has them (model.class_names())
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
    returns radius 0 for every image, and the Monte-Carlo certificate is what certifies the model. Warns too for a
    model certify-zoo did not convert (loaded with ``sigma=``): its deterministic radii are not certificates."""
    from .hub import is_hub_repo_spec, snapshot
    from .models import load_classifier

    spec = _spec_of(repo_id_or_dir)
    folder = snapshot(spec, revision) if is_hub_repo_spec(spec) else Path(spec).expanduser()
    if not folder.is_dir():
        raise CertifyZooError(f"{spec} is neither a local folder nor a Hub repo id (NAMESPACE/NAME)")
    metadata = read_json(folder / METADATA_NAME)
    sigma = sigma if sigma is not None else metadata.get("sigma")
    if sigma is None:
        raise CertifyZooError(f"{spec} was not converted by certify-zoo (no {METADATA_NAME} with sigma): pass sigma=")
    from .certificates import Calibration

    if not metadata:  # as `predict` says "NOT a certificate" beside such a radius
        warnings.warn(f"{spec} was not converted by certify-zoo: the radii certify() gives it are not certificates "
                      "(its softmax is not the Gaussian average they assume); certify_monte_carlo() certifies its "
                      "smoothed version", UserWarning, stacklevel=2)
    elif Calibration.of(metadata).withdrawn:  # a library warns, as timm and transformers do: certify() still answers
        from .card import evaluate_command, withdrawal_text

        command = f"{evaluate_command(spec)} --method monte-carlo"
        warnings.warn(f"{spec}: {withdrawal_text(metadata, command)} "
                      "certify() returns radius 0 for every image; certify_monte_carlo() certifies it.", UserWarning,
                      stacklevel=2)
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
    from .certificates import Calibration, certify_deterministic, noisy_batch_size

    top_k = _whole("top_k", top_k)
    require_at_least_one(("top_k", top_k))
    sigma = _sigma_of(model, sigma)
    images = _as_batch(images, model)
    # in the pieces evaluate forwards (a CPU's cache-sized ones, a GPU's large ones): a batch of thousands of images
    # in one forward would hold all their activations at once
    pieces = noisy_batch_size(BATCH_SIZE, images.shape[1:], images.device.type)
    logits = torch.cat([model(piece) for piece in images.split(pieces)])
    raw = certify_deterministic(logits, sigma)
    calibration = Calibration.of(getattr(model, "metadata", {}))
    cert = calibration.certify(logits, sigma)
    top = logits.float().softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
    names = model.class_names()
    labels = [names[i] for i in cert.prediction.tolist()] if names else None
    return Certificates(cert.prediction, labels, top.values, top.indices, cert.radius, cert.radius_lipschitz,
                        float(sigma), calibration.kappa, raw.radius, calibration.temperature)


@dataclass
class MonteCarloCertificates:
    """Per image: the Gaussian-smoothed model's class (ABSTAIN, -1, where CERTIFY abstains) and its certified L2
    radius, each true with probability at least 1 - alpha over the noise; the lower confidence bound on the class's
    share of the noisy votes, and the mean softmax over the noisy copies (which plays no part in the proof)."""

    prediction: torch.Tensor  # N, class index or ABSTAIN (-1)
    labels: list[str] | None  # N class names when the model has them ("abstain" where it abstains)
    radius: torch.Tensor  # N, sigma * PhiInv(p_a_lower), 0 where it abstains; [0,1] pixel L2
    p_a_lower: torch.Tensor  # N
    mean_probabilities: torch.Tensor  # N x C
    sigma: float
    n0: int
    n: int
    alpha: float


@torch.no_grad()
def certify_monte_carlo(model: CertifiedModel, images, n: int = 1_000, n0: int = 100, alpha: float = 0.001,
                        seed: int | None = 0, sigma: float | None = None) -> MonteCarloCertificates:
    """CERTIFY (Cohen et al. 2019) of the Gaussian-smoothed model, per image: the certificate that needs no
    calibration, and the one that stands for a model whose deterministic radius was withdrawn (kappa 0).

    ``n0`` noisy copies choose the class, ``n`` more bound its probability (Clopper-Pearson); with probability at
    least 1 - ``alpha`` the smoothed model returns that class everywhere within the radius. The largest radius n
    draws can give is sigma * PhiInv(alpha ** (1 / n)): raise ``n`` for larger ones (Cohen et al. use 100,000).
    ``images`` as for ``certify``; ``seed`` makes the noise repeatable (None: fresh). Costs n0 + n forward passes
    per image, the defaults those of ``certify-zoo predict --method monte-carlo``."""
    from .certificates import ABSTAIN, Smooth, noisy_batch_size

    n, n0 = _whole("n", n), _whole("n0", n0)
    require_at_least_one(("n", n), ("n0", n0))
    require_failure_probability(alpha, "alpha")
    sigma = _sigma_of(model, sigma)
    images = _as_batch(images, model)
    generator = torch.Generator(device=images.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    per_forward = noisy_batch_size(BATCH_SIZE, images.shape[1:], images.device.type)
    smooth = Smooth(model, model.num_classes, sigma)
    # at most per_forward images at a time: the noisy copies of all images at once would not fit (10,000 images at
    # 224 px are 6 GB per noise draw)
    parts = [smooth.certify_with_mean(chunk, n0, n, alpha, per_forward, generator)
             for chunk in images.split(per_forward)]
    prediction = torch.cat([part.prediction for part in parts])
    names = model.class_names()
    labels = ["abstain" if i == ABSTAIN else names[i] for i in prediction.tolist()] if names else None
    return MonteCarloCertificates(prediction, labels, torch.cat([part.radius for part in parts]),
                                  torch.cat([part.p_a_lower for part in parts]),
                                  torch.cat([part.mean_probabilities for part in parts]), float(sigma), n0, n, alpha)


def convert(model: str | Path, out: str | Path, data: str | None = None, *, recipe: str = "auto",
            revision: str | None = None, console=None, log_interval: int | None = None, **settings):
    """``certify-zoo convert`` in Python: fine-tune a student copy of ``model`` without labels and save it to
    ``out``; returns what the run did (``.out``, ``.steps``, ``.images_seen``, ``.final_agreement``).

    ``model`` and ``data`` are the command's MODEL and --data specs (``data`` None streams ImageNet-1k's gated
    training split). ``settings`` are the command's options by their field names (``sigma=0.5``, ``max_steps=20``,
    ``overwrite=True``; ``conversion.SETTING_NAMES`` lists them); each given one replaces the recipe's value. Log and
    progress go to ``console`` (a rich Console; default stderr, as the command's; where it is no terminal, a line
    every ``log_interval`` steps). Under ``accelerate launch`` or torchrun every process calls it, as in accelerate's
    examples. Errors raise CertifyZooError."""
    from .conversion import conversion_settings, convert as run_convert
    from .progress import log_console

    with _named_as_keywords("convert"):
        choice, chosen = conversion_settings(_spec_of(model), str(out), data, recipe, revision, **settings)
        console = console if console is not None else log_console()
        if is_main_process():
            console.print(choice.describe(), markup=False, highlight=False)
        return run_convert(chosen, console=console, log_interval=log_interval)


def evaluate(model: str | Path, data: str | None = None, *, console=None, log_interval: int | None = None,
             **settings) -> dict[str, Any]:
    """``certify-zoo evaluate`` in Python: certify ``model`` (a local folder or a Hub repo) on labelled ``data`` and
    return its record, as ``certification.json`` holds it; a folder certify-zoo made gets that file, the plot and
    a regenerated card (``write=False``: nothing is written), a Hub repo is read from the cache.

    ``settings`` are EvaluateSettings' fields (``method="all"``, ``max_images=100``, ``radii=(0.25, 0.5)``,
    ``n=10_000``); progress goes to ``console`` (default stderr; a line every ``log_interval`` batches where it is no
    terminal). Errors raise CertifyZooError; records that do not fit on the disk raise its RecordsNotWritten, whose
    ``record`` holds this run's numbers (the folder keeps the earlier run's records)."""
    import dataclasses

    from .data_sources import DEFAULT_DATA
    from .evaluation import EvaluateSettings, evaluate as run_evaluate
    from .hub import evaluation_folder
    from .progress import log_console

    require_known_settings("evaluate", settings, [field.name for field in dataclasses.fields(EvaluateSettings)
                                                  if field.name not in ("model", "data")])
    with _named_as_keywords("evaluate"):
        chosen = EvaluateSettings(model=_spec_of(model), data=data or DEFAULT_DATA, **settings)
        chosen.validate()
        console = console if console is not None else log_console()
        with evaluation_folder(chosen.model, chosen.revision, trust_remote_code=chosen.trust_remote_code) as (
                folder, write):
            evaluation = run_evaluate(dataclasses.replace(chosen, model=folder, write=chosen.write and write),
                                      console=console, log_interval=log_interval)
    return evaluation.record


def compare(models, data: str, *, console=None, **settings) -> dict[str, dict[str, Any]]:
    """``certify-zoo compare`` in Python: certify each of ``models`` (local folders or Hub repos) on the same
    labelled ``data``, radii and noise seed, and return their records by model (a model given twice: ``"MODEL #2"``),
    as ``compare --json`` prints them; nothing is written. ``settings`` are the command's options by their field
    names (``radii=(0.25, 0.5)``, ``method="deterministic"``, ``sigma=0.5``, ``max_images=500``, ``n=10_000``)."""
    import inspect

    from .progress import log_console
    from .wording import numbered
    from .zoo import compare as run_compare

    specs = [_spec_of(model) for model in ([models] if isinstance(models, (str, os.PathLike)) else models)]
    require_known_settings("compare", settings, [name for name in inspect.signature(run_compare).parameters
                                                 if name not in ("specs", "data", "console")])
    with _named_as_keywords("compare"):
        records = run_compare(specs, data, console=console if console is not None else log_console(), **settings)
    return dict(zip(numbered(specs), records))


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, create_pr: bool = False):
    """``certify-zoo push`` in Python: an output folder to the Hub repo ``repo_id`` in one commit (weights, configs,
    records, plot and a card written for that repo); returns where it went (``.url``). The token is
    huggingface_hub's own (HF_TOKEN, ``hf auth login``) unless ``token`` is given; ``create_pr`` opens a pull
    request instead of committing to main. Nothing local changes, whether the push succeeds or fails."""
    from .hub import push as run_push

    with _named_as_keywords("push"):
        return run_push(Path(folder), repo_id, private=private, revision=revision, commit_message=commit_message,
                        token=token, create_pr=create_pr)


# the commands' options whose function keyword has another name
_KEYWORD_OF_PARAMETER = {"compile_model": "compile"}


@contextlib.contextmanager
def _named_as_keywords(command: str) -> Iterator[None]:
    """Errors of the command's code name its options (``--mc-samples must be at least 1``); the caller of the
    function passed keywords (``n=0``): its message names those (``n must be at least 1``; a flag as
    ``overwrite=True``). A command line quoted in backticks keeps its options."""
    try:
        yield
    except CertifyZooError as error:
        keywords = option_keywords(command)

        def keyword(match: re.Match) -> str:
            return keywords.get(match.group(0), match.group(0))

        parts = str(error).split("`")  # odd parts: quoted commands, left as they are
        error.args = ("`".join(re.sub(r"(?<![\w-])--[a-z][a-z0-9-]*", keyword, part) if index % 2 == 0 else part
                               for index, part in enumerate(parts)), *error.args[1:])
        raise


def option_keywords(command: str) -> dict[str, str]:
    """``{"--mc-samples": "n", "--n": "n", "--overwrite": "overwrite=True", ...}`` for one command of the CLI."""
    import typer.main

    from .cli import app

    keywords = {}
    for parameter in typer.main.get_command(app).commands[command].params:
        name = _KEYWORD_OF_PARAMETER.get(parameter.name, parameter.name)
        for option in parameter.opts:
            keywords[option] = f"{name}=True" if getattr(parameter, "is_flag", False) else name
        for option in getattr(parameter, "secondary_opts", []):  # --no-strict
            keywords[option] = f"{name}=False"
    return keywords


def _spec_of(model) -> str:
    """A MODEL spec given as text or a path. A model object is refused with the way to a spec: the commands read a
    model's weights and its preprocessing from a folder or the Hub, and record where they came from (its str() had
    been taken for a file name, "File name too long")."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if isinstance(model, CertifiedModel):
        raise CertifyZooError("pass the folder or Hub repo id this model was loaded from, not the loaded model")
    if isinstance(model, nn.Module):
        raise CertifyZooError(f"a {type(model).__name__} object cannot be read from memory: save it as a folder "
                              "first (timm: timm.models.save_for_hf(model, 'base', safe_serialization=True); "
                              "transformers: model.save_pretrained('base') and its image processor's "
                              "save_pretrained('base')) and pass 'base'")
    raise CertifyZooError(f"the model must be a timm name, a Hub repo id or a folder, got a {type(model).__name__}")


def _whole(name: str, value) -> int:
    """A count given as a whole number, 1e4 included (how Python writes Cohen et al.'s n = 100,000 as 1e5): it had
    reached torch.randn as a float and failed there, in torch's words."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value):  # numbers.Real: numpy's integers and floats too
        raise CertifyZooError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _sigma_of(model: CertifiedModel, sigma: float | None) -> float:
    sigma = sigma if sigma is not None else getattr(model, "sigma", None)
    if sigma is None:
        raise CertifyZooError("this model has no sigma: load it with certify_zoo.load or pass sigma=")
    require_sigma(sigma, "sigma")
    return sigma


def _as_batch(images, model: CertifiedModel) -> torch.Tensor:
    """The batch the model certifies, on its device: PIL images (one, or a list) with colour as the data pipeline
    reads files (data.as_rgb), then the model's preprocessing; a tensor checked for shape and range."""
    from PIL import Image

    listed = [images] if isinstance(images, Image.Image) else images
    if isinstance(listed, (list, tuple)) and listed and all(isinstance(i, Image.Image) for i in listed):
        from .data import as_rgb

        transform = model.transform()
        images = torch.stack([transform(as_rgb(image)) for image in listed])
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
    if parameter is None:
        return images
    # in the model's dtype too: float64 images (torch.from_numpy of a numpy array) met float32 weights in the first
    # convolution and ended in torch's "Input type (double) and bias type (float) should be the same"
    dtype = parameter.dtype if parameter.is_floating_point() else None
    return images.to(device=parameter.device, dtype=dtype)
