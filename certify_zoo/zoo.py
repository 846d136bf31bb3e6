"""The zoo: find published certified models by their card metadata, describe one, compare several.

Everything here reads the convention the card sets (tag ``certify-zoo``, a ``certify_zoo`` metadata block and a
model-index with one metric per certificate and radius); a number a card lacks is shown as missing, never guessed.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .card import ZOO_TAG, at_other_sigma, calibration_text, controller_text, fmt, learning_rate_text
from .certificate_names import CERTIFICATE_LABELS
from .errors import CertifyZooError, require_at_least_one
from .export import AUDIT_NAME, CERTIFICATION_NAME, METADATA_NAME, read_json, run_record
from .wording import counted, numbered

LIST_RADII = (0.25, 0.5, 1.0)
LIST_CERTIFICATES = ("monte_carlo", "deterministic")


@dataclass
class ZooEntry:
    """One published model as its card describes it."""

    repo_id: str
    base_model: str | None = None
    architecture: str | None = None
    sigma: float | None = None
    clean_accuracy: float | None = None  # percent
    certified: dict[str, dict[float, float]] = field(default_factory=dict)  # certificate -> radius -> percent
    counterexamples: int | None = None
    audited_images: int | None = None
    downloads: int | None = None

    def value(self, key: str) -> float | None:
        """A sort key: clean, downloads, sigma, certified@R (Monte-Carlo) or deterministic@R."""
        if key in ("clean", "downloads", "sigma"):
            return {"clean": self.clean_accuracy, "downloads": self.downloads, "sigma": self.sigma}[key]
        name, _, radius = key.partition("@")
        certificate = {"certified": "monte_carlo", "monte-carlo": "monte_carlo",
                       "deterministic": "deterministic"}.get(name)
        try:
            return self.certified.get(certificate, {}).get(float(radius)) if certificate else None
        except ValueError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "base_model": self.base_model, "architecture": self.architecture,
                "sigma": self.sigma, "clean_accuracy": self.clean_accuracy,
                "certified_accuracy": {c: {f"{r:g}": v for r, v in by_r.items()} for c, by_r in self.certified.items()},
                # null where no audit of a deterministic radius stands behind the card (none ran, or kappa 0)
                "audit": (None if self.audited_images is None and self.counterexamples is None else
                          {"attacked": self.audited_images, "counterexamples": self.counterexamples}),
                "downloads": self.downloads}


def entry_from_card(repo_id: str, card_data: Any, downloads: int | None = None) -> ZooEntry:
    """Read a card's metadata (ModelCardData or dict) into a ZooEntry."""
    from huggingface_hub import ModelCardData

    if isinstance(card_data, dict):
        card_data = ModelCardData(**card_data, ignore_metadata_errors=True)
    data = card_data.to_dict() if card_data is not None else {}
    zoo = data.get("certify_zoo") or {}
    entry = ZooEntry(repo_id, base_model=zoo.get("base_model") or data.get("base_model"),
                     architecture=zoo.get("architecture"), sigma=zoo.get("sigma"), downloads=downloads)
    for result in (getattr(card_data, "eval_results", None) or []):
        args = result.metric_args or {}
        if result.metric_type == "accuracy" and entry.clean_accuracy is None:
            entry.clean_accuracy = result.metric_value
        elif result.metric_type == "certified_accuracy" and "certificate" in args and "radius" in args:
            entry.certified.setdefault(args["certificate"], {})[float(args["radius"])] = result.metric_value
            audit = args.get("audit")
            if isinstance(audit, dict):
                entry.counterexamples, entry.audited_images = audit.get("counterexamples"), audit.get("attacked")
    return entry


def list_certified(search: str | None = None, architecture: str | None = None, sigma: float | None = None,
                   sort: str = "certified@0.5", limit: int | None = None) -> list[ZooEntry]:
    """Published certified models (tag certify-zoo), filtered and sorted by a card number (missing ones last)."""
    from huggingface_hub import HfApi

    from .hub_files import hub_errors

    require_at_least_one(("--limit", limit))  # 0 listed nothing as if the Hub had nothing; below 0, a ValueError
    if sort and not _known_sort(sort):
        raise CertifyZooError(f"--sort {sort!r} is not a column: use clean, downloads, sigma, certified@R "
                              "(Monte-Carlo) or deterministic@R")
    with hub_errors("list models on", "the Hub"):
        models = list(HfApi().list_models(filter=ZOO_TAG, search=search, cardData=True, limit=limit))
    entries = [entry_from_card(m.id, m.card_data, m.downloads) for m in models]
    if architecture:
        entries = [e for e in entries if e.architecture and architecture.lower() in e.architecture.lower()]
    if sigma is not None:
        entries = [e for e in entries if e.sigma is not None and abs(e.sigma - sigma) < 1e-9]
    if sort:
        entries.sort(key=lambda e: (e.value(sort) is None, -(e.value(sort) or 0.0)))
    return entries


def _known_sort(key: str) -> bool:
    name, _, radius = key.partition("@")
    if key in ("clean", "downloads", "sigma"):
        return True
    try:
        float(radius)
    except ValueError:
        return False
    return name in ("certified", "monte-carlo", "deterministic")


def zoo_table(entries: Sequence[ZooEntry]):
    from rich.table import Table

    table = Table(title=f"Certified models on the Hub (tag {ZOO_TAG})",
                  caption="certified accuracy in % at L2 radius r ([0,1] pixels); MC = Monte-Carlo (provable), "
                          "det = deterministic (one forward pass); '-' = not on the card")
    for heading in ("repo", "base", "architecture", "sigma", "clean",
                    *[f"{'MC' if c == 'monte_carlo' else 'det'} r={r:g}"
                      for c in LIST_CERTIFICATES for r in LIST_RADII],
                    "PGD counterex.", "downloads"):
        table.add_column(heading, justify="left" if heading in ("repo", "base", "architecture") else "right")
    for e in entries:
        audit = f"{e.counterexamples}/{e.audited_images}" if e.counterexamples is not None else "-"
        table.add_row(e.repo_id, e.base_model or "-", e.architecture or "-", _fmt(e.sigma), _fmt(e.clean_accuracy),
                      *[_fmt(e.certified.get(c, {}).get(r)) for c in LIST_CERTIFICATES for r in LIST_RADII],
                      audit, _fmt(e.downloads))
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def model_records(spec: str, revision: str | None = None) -> tuple[dict, dict, dict]:
    """(certify_zoo.json, certification.json, audit.json) of a local output or Hub repo, without the weights;
    an audit.json that certification.json does not list as its run's is left out (a stale one)."""
    metadata, certification, audit = _record_files(spec, revision)
    return metadata, certification, run_record(certification, AUDIT_NAME, audit)


def _record_files(spec: str, revision: str | None) -> tuple[dict, dict, dict]:
    from .hub import is_hub_repo_spec
    from .hub_files import hub_errors

    if not is_hub_repo_spec(spec):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise CertifyZooError(f"{spec} is neither a local folder nor a Hub repo id (NAMESPACE/NAME)")
        return read_json(folder / METADATA_NAME), read_json(folder / CERTIFICATION_NAME), read_json(folder / AUDIT_NAME)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id = spec.removeprefix("hf-hub:")
    found = []
    with hub_errors("read", repo_id):
        for name in (METADATA_NAME, CERTIFICATION_NAME, AUDIT_NAME):
            try:
                found.append(read_json(Path(hf_hub_download(repo_id, name, revision=revision))))
            except LocalEntryNotFoundError:  # not in the cache, offline or with the Hub unreachable
                if name == METADATA_NAME:  # nothing of the repo is here: hub_errors says why, not "no records"
                    raise
                found.append({})  # a model not evaluated, or one whose cache holds only some of its records
            except EntryNotFoundError:
                found.append({})
    return found[0], found[1], found[2]


def compare_plot(curves: Sequence[tuple[str, dict]], path: Path, certificate: str) -> Path:
    """One curve per model for one certificate: the side-by-side view for picking a backbone."""
    from .plot import certified_accuracy_plot, record_curves

    lines, notes = [], []
    for index, (name, record) in enumerate(curves):
        if certificate not in record["certificates"]:
            continue
        one = {**record, "certificates": {certificate: record["certificates"][certificate]}}
        drawn, said = record_curves(f"{name} (sigma {record['sigma']:g}, clean {100 * record['clean_accuracy']:.1f}%)",
                                    one)
        lines += [replace(line, colour=f"C{index % 10}") for line in drawn]
        notes += said
    first = curves[0][1]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return certified_accuracy_plot(lines, Path(path), f"{counted(first['num_images'], 'image')} of {first['data']}; "
                                   "abstentions count as wrong", f"L2 radius ({first.get('space', '[0,1] pixels')})",
                                   notes)


def compared_names(specs: Sequence[str]) -> list[str]:
    """A row name per compared model: a local folder's name, or as many of its last path parts as tell it from the
    others (runs/seed0/converted and runs/seed1/converted are seed0/converted and seed1/converted, where both had been
    'converted'); a Hub repo id as given; a model given twice gets '#2'."""
    parts = [Path(spec).parts if Path(spec).exists() else (spec,) for spec in specs]
    depth = [1] * len(specs)
    while True:
        names = [Path(*p[-d:]).as_posix() for p, d in zip(parts, depth)]
        clashing = [i for i, name in enumerate(names) if depth[i] < len(parts[i])
                    and any(other == name and parts[j] != parts[i] for j, other in enumerate(names))]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    return numbered(names)


def compare(specs: Sequence[str], data: str, radii: Sequence[float] | None = None, method: str = "all",
            sigma: float | None = None, max_images: int | None = None, n0: int = 100, n: int = 10_000,
            alpha: float = 0.001, seed: int = 0, batch_size: int = 64, workers: int | None = None,
            console=None) -> list[dict]:
    """Re-evaluate each model (local or Hub) on the same data, radii (default evaluate's) and seed; records are
    returned, not written."""
    from .evaluation import DEFAULT_RADII, EvaluateSettings, evaluate, no_stored_sigma, stored_metadata
    from .hub import evaluation_folder
    from .models import require_model_spec

    settings = EvaluateSettings(model="", data=data, sigma=sigma, radii=list(DEFAULT_RADII if radii is None else radii),
                                method=method, max_images=max_images, batch_size=batch_size, n0=n0, n=n, alpha=alpha,
                                seed=seed, workers=workers, write=False, resumable=False)
    settings.validate()  # before the first model is downloaded or certified
    for spec in specs:
        require_model_spec(spec)
    with ExitStack() as folders:  # every model fetched before any is certified: a missing one fails in seconds
        local = [folders.enter_context(evaluation_folder(spec))[0] for spec in specs]
        unknown = [spec for spec, folder in zip(specs, local) if sigma is None
                   and stored_metadata(folder).get("sigma") is None]
        if unknown:  # said before the others are certified, not after
            raise no_stored_sigma(unknown[0])
        return [evaluate(replace(settings, model=folder), console=console).record for folder in local]


def info_lines(spec: str, metadata: dict, certification: dict, audit: dict) -> list[str]:
    """What a certified model is, from its records: base, conversion, gamma, calibration of the radius,
    certificates, audit."""
    if not metadata:
        return [f"{spec}: no {METADATA_NAME}, so not converted by certify-zoo (its deterministic radii are not "
                "certificates; evaluate it with --method monte-carlo)"]
    settings = metadata.get("settings", {})
    objective = ", ".join(f"{k} {v}" for k, v in settings.get("objective", {}).items())
    hardware = metadata.get("hardware", {})
    lines = [f"[bold]{spec}[/]: {metadata.get('method', 'adversarial-boot-camp')} ({metadata.get('paper', '')}) of "
             f"{metadata.get('base_model')}",
             f"sigma {metadata.get('sigma')} in [0,1] pixel L2 at input {metadata.get('input_size')}, "
             f"{metadata.get('num_classes')} classes",
             f"conversion: {metadata.get('steps')} steps, {metadata.get('images_seen')} images seen from "
             f"{metadata.get('data')} (labels not read), recipe {settings.get('recipe')}, "
             f"{learning_rate_text(metadata)}; objective {objective}",
             f"gamma: {fmt(metadata.get('effective_gamma'))} effective{controller_text(metadata.get('gamma', {}))}",
             f"reported deterministic radius: {calibration_text(metadata)}",
             f"ran {metadata.get('seconds')} s on {counted(hardware.get('processes', 1), 'process')}, "
             f"{hardware.get('device')}"]
    if certification:
        certificates = ", ".join(CERTIFICATE_LABELS.get(k, k) for k in certification["certificates"])
        own = " (the images it was converted on)" if certification.get("on_conversion_images") else ""
        if at_other_sigma(certification, metadata):
            own += f" at sigma {certification.get('sigma')}, not its conversion's"
        lines.append(f"evaluated on {counted(certification.get('num_images'), 'image')} of "
                     f"{certification.get('data')}{own}: certificates {certificates}")
        statement = (certification.get("audit") or audit or {}).get("statement")
        lines.append(f"audit of the deterministic radii: {statement or 'not audited'}")
    else:
        lines.append("not evaluated yet (certify-zoo evaluate MODEL --data DATA)")
    return lines
