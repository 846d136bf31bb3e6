"""predict: class names, probabilities and a radius for a few images: the deterministic radius of one forward pass
each, or (``monte_carlo``) the smoothed classifier's class and Cohen et al.'s CERTIFY radius, which needs no
calibration and holds for a model whose deterministic radius was withdrawn."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .certificate_names import monte_carlo_reach, reach_clause
from .certificates import ABSTAIN, Calibration, Smooth, noisy_batch_size
from .data import IMAGE_EXTENSIONS, list_image_files, open_rgb
from .errors import CertifyZooError, require_at_least_one, require_failure_probability, require_sigma
from .evaluation import no_stored_sigma, stored_metadata
from .export import CERTIFICATION_NAME, read_json
from .models import load_classifier
from .progress import RunProgress


@dataclass
class PredictSettings:
    model: str
    inputs: Sequence[str]
    top_k: int = 5
    sigma: float | None = None
    batch_size: int = 64
    revision: str | None = None
    monte_carlo: bool = False  # CERTIFY (Cohen et al.) per image instead of the deterministic radius
    n0: int = 100
    n: int = 1_000
    alpha: float = 0.001
    seed: int = 0

    def validate(self) -> None:
        require_at_least_one(("--top-k", self.top_k), ("--batch-size", self.batch_size),
                             *((("--mc-samples", self.n), ("--n0", self.n0)) if self.monte_carlo else ()))
        if self.monte_carlo:
            require_failure_probability(self.alpha)
        require_sigma(self.sigma)


@dataclass
class Predictions:
    rows: list[dict[str, Any]]
    sigma: float | None
    converted: bool
    audit: str | None = None  # the model's stored audit sentence, if it was audited
    notes: list[str] = field(default_factory=list)
    calibration: str | None = None  # how the radii were calibrated ("calibration x0.72"), for the table's caption
    monte_carlo: str | None = None  # the Monte-Carlo certificate and its settings, where it made the radii


def image_files(inputs: Sequence[str]) -> list[Path]:
    """Files named directly, and every image below each named folder, in the order given."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = list_image_files(path)
            if not found:
                raise CertifyZooError(f"no image files in {path} (looked for {', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif "://" in item:  # timm and transformers users pass URLs to their pipelines; nothing is fetched here
            raise CertifyZooError(f"{item} is a URL: predict reads local image files only; download it first")
        else:
            raise CertifyZooError(f"image {item} does not exist: pass image files or folders of images")
    return files


def _load(file: Path, transform) -> tuple[torch.Tensor | None, str | None]:
    """The image at the model's input size, or None and why it cannot be read: reported in its row, and the other
    images still get predictions."""
    try:
        return transform(open_rgb(file)), None
    except Exception as exc:
        return None, (str(exc).splitlines() or [type(exc).__name__])[0]


def _unreadable_row(file: Path, reason: str | None) -> dict[str, Any]:
    return {"file": str(file), "error": "unreadable image", "reason": reason}


def require_a_readable_image(rows: Sequence[dict[str, Any]]) -> None:
    """Not one readable image is bad input, not a table of errors: one line, naming the first file and why."""
    unreadable = [row for row in rows if "error" in row]
    if rows and len(unreadable) == len(rows):
        first = unreadable[0]
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise CertifyZooError(f"no readable image: {first['file']}{more} cannot be read as an image "
                              f"({first['reason']})")


def predict(settings: PredictSettings, console=None) -> Predictions:
    """Top-k classes and the deterministic radius (Gaussian bound at the model's sigma) for each image.

    Progress goes to ``console`` where the run is long: Monte-Carlo (n0 + n forwards an image), or more images than
    one batch."""
    from .hub import evaluation_folder

    settings.validate()
    files = image_files(settings.inputs)
    # a Hub repo is read from its snapshot, whose records (sigma, calibration, audit) make its radius a certificate
    with evaluation_folder(settings.model, settings.revision) as (folder, _):
        predictions = _predict(replace(settings, model=folder), files, console)
    require_a_readable_image(predictions.rows)
    return predictions


def _progress(files: Sequence[Path], console, long: bool) -> RunProgress:
    return RunProgress("predict", len(files), console if long else None, unit="image")


def _predict(settings: PredictSettings, files: Sequence[Path], console=None) -> Predictions:
    metadata = stored_metadata(settings.model)
    sigma = settings.sigma if settings.sigma is not None else metadata.get("sigma")
    calibration = Calibration.of(metadata)
    model = load_classifier(settings.model, settings.revision).eval()
    names = model.class_names() or [str(i) for i in range(model.num_classes)]
    transform = model.transform()
    top_k = min(settings.top_k, model.num_classes)
    if settings.monte_carlo:
        if sigma is None:
            raise no_stored_sigma(settings.model)
        with _progress(files, console, long=True) as progress:
            return _predict_smoothed(settings, files, model, transform, names, sigma, top_k, metadata, progress)
    audit = read_json(Path(settings.model) / CERTIFICATION_NAME).get("audit", {}).get("statement") \
        if Path(settings.model).is_dir() else None
    certificate = (f"deterministic (Gaussian bound, calibrated: kappa {calibration.kappa:g}, temperature "
                   f"{calibration.temperature:g}); audit: " + (audit or "not audited") if metadata
                   else "none: deterministic radius of a model certify-zoo did not convert, not a certificate")
    rows: list[dict[str, Any]] = []
    with _progress(files, console, long=len(files) > settings.batch_size) as progress:
        for start in range(0, len(files), settings.batch_size):
            rows += _predict_batch(model, files[start:start + settings.batch_size], transform, names, top_k,
                                   calibration, sigma, certificate)
            progress.update(len(rows), len(rows))
    notes = []
    if not metadata:
        notes.append("this model was not converted by certify-zoo: its deterministic radii are not certificates "
                     "(certify it with `certify-zoo evaluate --method monte-carlo`)")
    if sigma is None:
        notes.append("no radius: the model has no stored sigma (pass --sigma)")
    elif metadata and sigma != metadata.get("sigma"):  # as evaluate warns
        notes.append(f"this model was converted (and its radius calibrated) at sigma {metadata.get('sigma')}: radii "
                     f"at sigma {sigma} are not the ones its conversion trained for")
    stored = bool((metadata or {}).get("calibration"))
    if stored and calibration.withdrawn:
        from .card import withdrawal_text

        notes.append(withdrawal_text(metadata, "certify-zoo predict MODEL IMAGES --method monte-carlo"))
    return Predictions(rows, sigma, bool(metadata), audit, notes,
                       f"calibration {calibration.short()}" if stored else "raw (no calibration stored)")


def _predict_batch(model, chunk: Sequence[Path], transform, names: list[str], top_k: int, calibration: Calibration,
                   sigma: float | None, certificate: str) -> list[dict[str, Any]]:
    """One forward for a batch of files: each readable one's top-k and radius; an unreadable one's row says why."""
    rows: list[dict[str, Any]] = []
    loaded = [_load(file, transform) for file in chunk]
    readable = [image for image, _ in loaded if image is not None]
    if readable:
        with torch.no_grad():
            logits = model(torch.stack(readable))
        probabilities = logits.softmax(-1)
        top = probabilities.topk(top_k, dim=-1)
        radii = calibration.certify(logits, sigma).radius if sigma is not None else None
    position = 0
    for file, (image, reason) in zip(chunk, loaded):
        if image is None:
            rows.append(_unreadable_row(file, reason))
            continue
        values, indices = top.values[position].tolist(), top.indices[position].tolist()
        rows.append({"file": str(file), "class": names[indices[0]], "class_index": indices[0],
                     "probability": values[0],
                     "radius": float(radii[position]) if radii is not None else None, "sigma": sigma,
                     "certificate": certificate,
                     "top_k": [{"class": names[i], "probability": p} for i, p in zip(indices, values)]})
        position += 1
    return rows


def _predict_smoothed(settings: PredictSettings, files: Sequence[Path], model, transform, names: list[str],
                      sigma: float, top_k: int, metadata: dict, progress: RunProgress) -> Predictions:
    """Per image, CERTIFY of the Gaussian-smoothed model: its class (or abstain) and radius, a proof with
    probability 1 - alpha; "probability" is the lower confidence bound on that class's share of the noisy votes,
    and the top-k the mean softmax over the noisy copies."""
    smooth = Smooth(model, model.num_classes, sigma)
    generator = torch.Generator().manual_seed(settings.seed)
    reach = monte_carlo_reach(sigma, settings.n, settings.alpha)  # a radius there: every one of the n draws agreed
    certificate = (f"Monte-Carlo (Cohen et al. CERTIFY, n0 {settings.n0}, n {settings.n}, alpha {settings.alpha:g}; "
                   f"{reach_clause(reach)})")
    rows: list[dict[str, Any]] = []
    for file in files:  # one image at a time: its noise batch is what fills the forward
        rows.append(_certify_file(file, settings, smooth, generator, transform, names, sigma, top_k, certificate))
        progress.update(len(rows), len(rows))
    notes = [] if metadata else ["this model was not converted by certify-zoo: its smoothed classifier is certified "
                                 "all the same, but it may abstain on most images"]
    return Predictions(rows, sigma, bool(metadata), None, notes, monte_carlo=certificate)


def _certify_file(file: Path, settings: PredictSettings, smooth: Smooth, generator: torch.Generator, transform,
                  names: list[str], sigma: float, top_k: int, certificate: str) -> dict[str, Any]:
    """CERTIFY of one image file's smoothed prediction, as its row; an unreadable file's row says why."""
    image, reason = _load(file, transform)
    if image is None:
        return _unreadable_row(file, reason)
    batch = noisy_batch_size(settings.batch_size, image.shape, image.device.type)
    result = smooth.certify_with_mean(image.unsqueeze(0), settings.n0, settings.n, settings.alpha, batch, generator)
    index = int(result.prediction[0])
    top = result.mean_probabilities[0].topk(top_k)
    abstained = index == ABSTAIN
    return {"file": str(file), "class": "abstain" if abstained else names[index],
            "class_index": None if abstained else index, "probability": float(result.p_a_lower[0]),
            "radius": float(result.radius[0]), "sigma": sigma, "certificate": certificate,
            "top_k": [{"class": names[i], "probability": p} for i, p in zip(top.indices.tolist(), top.values.tolist())]}
