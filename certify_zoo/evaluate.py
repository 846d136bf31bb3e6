"""Evaluation: certify a model on labelled images and write certification.json beside it."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from . import __version__
from .certify import (Smooth, average_certified_radius, certified_accuracy, certify_deterministic)
from .data import collate_skipping_unreadable, dataloader_workers, labelled_images
from .errors import CertifyZooError
from .export import CERTIFICATION_NAME, METADATA_NAME, SCHEMA_VERSION, read_json, write_json_atomic
from .models import ImageClassifier, load_classifier

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
METHODS = ("deterministic", "monte-carlo", "all")

# What each certificate proves: printed on every report and card next to its numbers.
CERTIFICATE_MEANING = {
    "deterministic": "one forward pass; radius sigma/2 (PhiInv(p1) - PhiInv(p2)) of softmax v(x). A proof only for "
                     "the exact Gaussian average of v, which the converted model approximates",
    "deterministic_lipschitz": "one forward pass; the paper's looser Lipschitz bound (p1 - p2) sigma / sqrt(2/pi), "
                               "same caveat as deterministic",
    "monte-carlo": "Cohen et al. 2019 CERTIFY on v under N(0, sigma^2) pixel noise: holds with probability >= 1 - "
                   "alpha (Clopper-Pearson); abstentions count as wrong",
}


@dataclass
class EvaluateSettings:
    model: str
    data: str
    sigma: float | None = None
    radii: Sequence[float] = DEFAULT_RADII
    method: str = "deterministic"
    max_images: int | None = None
    batch_size: int = 64
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    mc_batch_size: int = 10_000
    seed: int = 0
    revision: str | None = None
    write: bool = True

    def validate(self) -> None:
        radii = list(self.radii)
        if not radii or any(r < 0 for r in radii) or radii != sorted(radii):
            raise CertifyZooError(f"--radii must be non-negative and sorted ascending, got {','.join(map(str, radii))}")
        if self.method not in METHODS:
            raise CertifyZooError(f"--method must be one of {', '.join(METHODS)}, got {self.method}")
        if self.sigma is not None and not 0 < self.sigma <= 2:
            raise CertifyZooError(f"--sigma must be in (0, 2] (pixel L2 noise on [0,1] images), got {self.sigma}")
        if self.batch_size < 1 or self.n < 1 or self.n0 < 1 or not 0 < self.alpha < 1:
            raise CertifyZooError("--batch-size, --n and --n0 must be at least 1 and --alpha in (0, 1)")
        if self.max_images is not None and self.max_images < 1:
            raise CertifyZooError(f"--max-images must be at least 1, got {self.max_images}")


@dataclass
class Evaluation:
    record: dict[str, Any]
    per_image: dict[str, torch.Tensor] = field(default_factory=dict)


def stored_metadata(model_spec: str) -> dict:
    folder = Path(model_spec).expanduser()
    return read_json(folder / METADATA_NAME) if folder.is_dir() else {}


def summarise(radii: torch.Tensor, correct: torch.Tensor, thresholds: Sequence[float], **extra) -> dict[str, Any]:
    """The numbers a certificate reports: certified accuracy at each radius (fractions) and ACR."""
    accuracies = certified_accuracy(radii, correct, thresholds)
    return {**extra, "certified_accuracy": [{"radius": float(r), "accuracy": a} for r, a in zip(thresholds, accuracies)],
            "acr": average_certified_radius(radii, correct)}


def evaluate(settings: EvaluateSettings, console=None, classifier: ImageClassifier | None = None) -> Evaluation:
    """Certify MODEL on labelled DATA with the chosen certificates; write certification.json into a local output."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    settings.validate()
    metadata = stored_metadata(settings.model)
    sigma = settings.sigma if settings.sigma is not None else metadata.get("sigma")
    if sigma is None:
        raise CertifyZooError(f"{settings.model} has no stored sigma (not converted by certify-zoo): pass --sigma")
    accelerator = Accelerator()
    say = console.print if (console is not None and accelerator.is_main_process) else (lambda *a, **k: None)
    set_seed(settings.seed)
    model = classifier if classifier is not None else load_classifier(settings.model, settings.revision)
    dataset = labelled_images(settings.data, model.transform(), model.label_names, model.num_classes)
    if settings.max_images is not None and settings.max_images < len(dataset):
        dataset = Subset(dataset, range(settings.max_images))
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=dataloader_workers(),
                        collate_fn=collate_skipping_unreadable)
    model = model.to(accelerator.device).eval()
    loader = accelerator.prepare(loader)
    if not metadata:
        say("[yellow]This model was not converted by certify-zoo: its deterministic radii are not certificates; "
            "see the Monte-Carlo numbers.[/]")

    want_mc = settings.method in ("monte-carlo", "all")
    smooth = Smooth(model, model.num_classes, sigma)
    generator = torch.Generator(device=accelerator.device).manual_seed(settings.seed + accelerator.process_index)
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("label", "prediction", "p1", "p2", "radius",
                                                            "radius_lipschitz", "mc_prediction", "mc_radius")}
    skipped = 0
    from rich.progress import Progress

    with Progress(console=console, disable=console is None or not accelerator.is_main_process) as progress:
        task = progress.add_task("certifying", total=len(loader))
        for batch in loader:
            skipped += int(accelerator.gather(torch.tensor([batch.skipped], device=accelerator.device)).sum())
            if batch.images.numel() == 0:
                progress.advance(task)
                continue
            with torch.inference_mode():  # one forward; softmax, top-2 and PhiInv on the whole batch, on device
                cert = certify_deterministic(model(batch.images), sigma)
            row = {"label": batch.labels, "prediction": cert.prediction, "p1": cert.p1, "p2": cert.p2,
                   "radius": cert.radius, "radius_lipschitz": cert.radius_lipschitz}
            if want_mc:
                prediction, radius, _ = smooth.certify(batch.images, settings.n0, settings.n, settings.alpha,
                                                       settings.mc_batch_size, generator)
                row["mc_prediction"], row["mc_radius"] = prediction.to(accelerator.device), radius.to(accelerator.device)
            for key, value in accelerator.gather_for_metrics(row).items():
                columns[key].append(value.cpu())
            progress.advance(task)
    per_image = {k: torch.cat(v) for k, v in columns.items() if v}
    if "label" not in per_image:
        raise CertifyZooError(f"no readable images in {settings.data} ({skipped} unreadable)")
    labels = per_image["label"]
    correct = per_image["prediction"] == labels
    radii = list(settings.radii)
    certificates: dict[str, Any] = {
        "deterministic": summarise(per_image["radius"], correct, radii, bound="gaussian",
                                   proves=CERTIFICATE_MEANING["deterministic"]),
        "deterministic_lipschitz": summarise(per_image["radius_lipschitz"], correct, radii, bound="lipschitz",
                                             proves=CERTIFICATE_MEANING["deterministic_lipschitz"]),
    }
    if want_mc:
        mc_correct = per_image["mc_prediction"] == labels
        certificates["monte_carlo"] = summarise(
            per_image["mc_radius"], mc_correct, radii, n0=settings.n0, n=settings.n, alpha=settings.alpha,
            seed=settings.seed, abstentions=int((per_image["mc_prediction"] < 0).sum()),
            proves=CERTIFICATE_MEANING["monte-carlo"])
    record = {
        "schema_version": SCHEMA_VERSION,
        "certify_zoo_version": __version__,
        "model": settings.model,
        "converted_by_certify_zoo": bool(metadata),
        "data": settings.data,
        "num_images": int(labels.numel()),
        "skipped_images": skipped,
        "sigma": sigma,
        "norm": "l2",
        "space": f"[0,1] pixels at {'x'.join(map(str, model.input_size))}",
        "radii": radii,
        "clean_accuracy": float(correct.double().mean()),
        "certificates": certificates,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    folder = Path(settings.model).expanduser()
    if settings.write and folder.is_dir() and accelerator.is_main_process:
        write_json_atomic(folder / CERTIFICATION_NAME, record)
    return Evaluation(record, per_image)
