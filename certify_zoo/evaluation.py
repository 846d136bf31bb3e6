"""Evaluation: certify a model on labelled images and write certification.json beside it."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.markup import escape

from . import __version__
from .audit import ATTACKS, AttackResult, PGDSettings, pgd_l2, summarise_audit
from .certificate_names import CERTIFICATE_MEANING, FROM_CHECK_DATA, RAW_RADIUS_SOURCE
from .certificates import (ABSTAIN, Calibration, Smooth, average_certified_radius, certified_accuracy,
                           certify_deterministic, forward_piece, gap_to_gaussian_average,
                           noisy_batch_size)
from .classifier import ImageClassifier
from .data import stop_if_strict
from .data_sources import StreamLoader, evaluation_loader, is_conversion_data, left_out, require_local_data
from .distributed import (decided_by_main, gather_per_process, gather_rows_into, lockstep, make_accelerator,
                          on_any_process, one_process_of_several_note, unique_by_index)
from .draws import draw_key
from .errors import (CertifyZooError, Interrupted, RecordsNotWritten, StoppedWithNothingKept, alike_on_every_process,
                     disk_error_reason, disk_remedy, require_at_least_one, require_failure_probability, require_sigma,
                     require_workers)
from .export import (AUDIT_NAME, CERTIFICATION_NAME, METADATA_NAME, SCHEMA_VERSION, OutputLock, can_write_in,
                     is_run_record, keep_earlier_run, put_back_earlier_run, read_json, require_writable_folder,
                     write_run_records)
from .guards import (EVALUATE_MEMORY_ADVICE, EVALUATE_WORKER_ADVICE, dataloader_workers_died, deterministic_algorithms,
                     out_of_memory)
from .models import load_classifier, require_model_spec
from .partial import PARTIAL_FOLDER, PROCESSES, SAVE_EVERY_MINUTES, PartialEvaluation, model_files
from .progress import RunProgress
from .selfcheck import broken_share_p_value
from .stopping import StopSignals
from .wording import counted, skipped_unreadable

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
METHODS = ("deterministic", "monte-carlo", "all")
PER_IMAGE_NAME = "per_image.json"
RUN_RECORDS = (CERTIFICATION_NAME, AUDIT_NAME, PER_IMAGE_NAME)  # what one run may write (export.write_run_records)
# evaluate warns when its audit broke more calibrated claims than the calibration's bound makes likely at this level
BOUND_SIGNIFICANCE = 0.05
FULL_N = 10_000  # Monte-Carlo samples per image when Monte-Carlo is the certificate asked for
CHECK_N = 1_000  # ... and in the default check of a converted model's subsample (a quick cross-check), unless --n


@dataclass
class EvaluateSettings:
    model: str
    data: str
    sigma: float | None = None
    radii: Sequence[float] = DEFAULT_RADII
    method: str | None = None  # None: deterministic for a certify-zoo model, Monte-Carlo for any other
    max_images: int | None = None
    subsample: int = 1  # every K-th image of the split (Cohen et al. certify every 100th ImageNet val image)
    audit: str | None = None  # None: pgd on the check subsample for a converted model, none for any other
    # default checks of a converted model: PGD audit and Monte-Carlo (n = CHECK_N) on about this many images
    check_images: int = 100
    calibrated: bool = True  # the model's calibrated radii (False: raw radii, as for the studies)
    audit_steps: int = 100
    audit_restarts: int = 4
    batch_size: int = 64
    compile: bool = False  # torch.compile the model (certificates, Monte-Carlo and audit alike)
    channels_last: bool = False  # NHWC weights: convolutions run faster on many CPUs and GPUs
    deterministic: bool = False  # only deterministic kernels (guards.deterministic_algorithms): repeatable on a GPU
    n0: int = 100
    n: int | None = None  # None: FULL_N for --method monte-carlo/all, CHECK_N for the default check; a number: both
    alpha: float = 0.001
    mc_batch_size: int | None = None  # noisy images per forward; None: certificates.noisy_batch_size
    seed: int = 0
    revision: str | None = None
    write: bool = True  # records into the model's folder when certify-zoo made it (False: a Hub cache, a comparison)
    out: str | None = None  # records into this folder instead (created if needed), whatever the model
    trust_remote_code: bool = False
    image_column: str | None = None
    label_column: str | None = None
    strict: bool = False
    workers: int | None = None  # DataLoader processes decoding images, per process (None: data.dataloader_workers)
    resume: bool = False  # continue from the partial results a stopped run kept in its records folder
    resumable: bool = True  # keep partial results for --resume (False: a stop keeps nothing; the demo, compare)

    def validate(self) -> None:
        radii = list(self.radii)
        if not radii or not all(math.isfinite(r) and r >= 0 for r in radii) or radii != sorted(radii):
            raise CertifyZooError(f"--radii must be finite, non-negative and sorted ascending, got "
                                  f"{','.join(map(str, radii))}")
        if self.method is not None and self.method not in METHODS:
            raise CertifyZooError(f"--method must be one of {', '.join(METHODS)}, got {self.method}")
        require_sigma(self.sigma)
        require_at_least_one(("--batch-size", self.batch_size), ("--mc-batch-size", self.mc_batch_size),
                             ("--mc-samples", self.n), ("--n0", self.n0), ("--audit-steps", self.audit_steps),
                             ("--audit-restarts", self.audit_restarts))
        require_failure_probability(self.alpha)
        require_workers(self.workers)
        if self.max_images is not None and self.max_images < 1:
            raise CertifyZooError(f"--max-images must be at least 1, got {self.max_images}")
        if self.subsample < 1:
            raise CertifyZooError(f"--subsample must be at least 1 (every K-th image), got {self.subsample}")
        if self.audit is not None and self.audit not in ATTACKS:
            raise CertifyZooError(f"--audit must be one of {', '.join(ATTACKS)}, got {self.audit}")
        if self.check_images < 0:
            raise CertifyZooError(f"--check-images must be >= 0, got {self.check_images}")
        out = Path(self.out).expanduser() if self.out is not None else None
        if out is not None and os.path.exists(out) and not os.path.isdir(out):  # os.path: see check_output_folder
            raise CertifyZooError(f"--out {self.out} exists and is not a folder")
        if out is not None:  # found now, not after hours of certification
            require_writable_folder(out, f"--out {self.out}", "choose another folder")
        # a run replaces its records and removes stale ones by name: never files of those names someone else wrote
        foreign = [name for name in RUN_RECORDS if (out / name).is_file() and not is_run_record(out / name)] \
            if out is not None else []
        if foreign:
            raise CertifyZooError(f"--out {self.out} holds {', '.join(foreign)} that certify-zoo did not write (this "
                                  "run's records would replace or remove them): move them, or choose another folder")
        if out is not None and (out / METADATA_NAME).is_file() and not _same_folder(out, self.model):
            # its card, and a push of it, would show this run's numbers beside that model's weights
            raise CertifyZooError(f"--out {self.out} is the folder of another converted model (it holds "
                                  f"{METADATA_NAME}): its records must be its own; choose another folder")
        require_local_data(self.data)  # a mistyped folder says so before a Hub model is downloaded

    def pgd(self) -> PGDSettings:
        return PGDSettings(steps=self.audit_steps, restarts=self.audit_restarts)


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
    return {**extra,
            "certified_accuracy": [{"radius": float(r), "accuracy": a} for r, a in zip(thresholds, accuracies)],
            "acr": average_certified_radius(radii, correct)}


def forward_passes(images: int | None, monte_carlo: bool, n0: int, n: int, pgd: PGDSettings | None) -> str:
    """What the chosen certificates will cost, said before they start."""
    per_image = 1 + (n0 + n if monte_carlo else 0)
    count = (f"{counted(f'{images:,}', 'image')} x {per_image:,} = {images * per_image:,}" if images
             else f"{per_image:,} per image")
    what = (f" (1 clean + {n0:,} selection + {n:,} estimation noisy forwards, Monte-Carlo)" if monte_carlo
            else " (deterministic: 1 per image)")
    audit = (f", then up to {pgd.steps * pgd.restarts:,} PGD forward+backward passes per correctly classified image"
             if pgd is not None else "")
    return f"forward passes: {count}{what}{audit}"


def evaluate(settings: EvaluateSettings, console=None, classifier: ImageClassifier | None = None,
             log_interval: int | None = None) -> Evaluation:
    """Certify MODEL on labelled DATA with the chosen certificates; write certification.json into a local output.

    Progress goes to ``console``: a live bar on a terminal, else a line every ``log_interval`` batches.
    ``settings.deterministic``: only deterministic kernels throughout (guards.deterministic_algorithms)."""
    with deterministic_algorithms(settings.deterministic, "evaluate"), OutputLock() as records_lock:
        return _evaluate(settings, console, classifier, log_interval, records_lock)


def _evaluate(settings: EvaluateSettings, console, classifier: ImageClassifier | None,
              log_interval: int | None, records_lock: OutputLock) -> Evaluation:
    from accelerate.utils import set_seed

    with alike_on_every_process():  # the arguments' errors: one line, not one per process
        settings.validate()
        require_model_spec(settings.model)  # a missing folder or unknown name says so, not 'pass --sigma'
        metadata = stored_metadata(settings.model)
        sigma = settings.sigma if settings.sigma is not None else metadata.get("sigma")
        if sigma is None:
            raise no_stored_sigma(settings.model)
    accelerator = make_accelerator()
    say = console.print if (console is not None and accelerator.is_main_process) else (lambda *a, **k: None)
    one_process = one_process_of_several_note(accelerator)
    if one_process:
        say(f"[yellow]{one_process}[/]")
    set_seed(settings.seed)
    with alike_on_every_process():  # a model every process fails to load: one line, not one per process
        model = classifier if classifier is not None else load_classifier(
            settings.model, settings.revision, settings.trust_remote_code,
            console=console if accelerator.is_main_process else None)
    # a conversion calibrated (and steered gamma) on images of this very source (--check-data): not certified here,
    # so that the audit checks the calibration on images independent of it
    leave_out = left_out(metadata.get("settings", {}).get("check_data"), metadata.get("check_images_drawn"),
                         settings.data)
    with alike_on_every_process():  # data every process reads alike: one line under torchrun, not one per process
        data = evaluation_loader(settings.data, model.transform(), model.class_names(), model.num_classes,
                                 settings.batch_size, settings.max_images, settings.image_column,
                                 settings.label_column, settings.subsample, leave_out, workers=settings.workers)
    say(escape(f"data {settings.data!r} -> {data.spec.describe()}"))
    if data.left_out:
        say(f"left out {counted(data.left_out, 'image')}: the conversion's --check-data images, on which its "
            "calibration was measured")
    on_conversion_images = bool(metadata) and is_conversion_data(metadata.get("settings", {}).get("data"), data.spec,
                                                                 metadata.get("data_split"))
    if on_conversion_images:
        say("[yellow]note: these are the images this model was converted on: its certified accuracy on them says "
            "little about images it never saw; certify held-out images for that[/]")
    loader = data.loader
    model = model.to(accelerator.device).eval()
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)  # convolutions then choose NHWC kernels
    if settings.compile:
        model.compile()  # in place: the module keeps its type, attributes and state_dict keys
    loader = accelerator.prepare(loader)
    plan = plan_evaluation(settings, metadata, data.num_images)
    _say_plan(say, settings, metadata, plan, data.num_images, sigma)
    smooth = Smooth(model, model.num_classes, sigma)
    generator = torch.Generator(device=accelerator.device).manual_seed(settings.seed + accelerator.process_index)
    columns: dict[str, list[torch.Tensor]] = {}  # per-image values, one tensor per batch
    unreadable: list[str] = []
    destination, reason = records_folder(settings, metadata)
    if destination is not None:  # one run at a time writes it: a conversion into it, or another evaluation
        decided_by_main(accelerator, lambda: records_lock.acquire(destination))
    keep_in = destination / PARTIAL_FOLDER if destination is not None and settings.resumable else None
    # the fingerprint hashes the model's files: only where results are kept
    partial = PartialEvaluation(keep_in, run_fingerprint(settings, data.num_images, accelerator.num_processes)
                                if keep_in is not None else {})
    batches, first_batch = loader, 1
    # a stream has no batches to skip: it is read on from where this process stood (data_sources.StreamLoader),
    # which is where its own batches so far end
    stream = loader if isinstance(loader, StreamLoader) else None
    stream_batches = 0

    def stream_place() -> dict | None:
        return None if stream is None else {"batches": stream_batches,
                                            "position": stream.position_after(stream_batches)}
    with alike_on_every_process():  # every process reads the same folder
        if not settings.resume and partial.held():  # hours of Monte-Carlo: not replaced by a run without --resume
            raise CertifyZooError(f"{partial.folder} holds the results so far of a stopped evaluation: add --resume "
                                  "to continue it, or delete that folder to start over")
        restored = partial.load() if settings.resume else None
    if settings.resume:
        if restored is None:
            where = escape(str(partial.folder)) if partial.folder else "kept (no records folder)"
            say(f"--resume: no partial results in {where}: from the first image")
        else:
            columns, unreadable = restored.columns, restored.unreadable
            first_batch = restored.batches_done + 1
            if stream is not None:
                place = restored.streams[accelerator.process_index]
                stream.resume(place["position"])
                stream_batches = place["batches"]
            else:
                batches = accelerator.skip_first_batches(loader, restored.batches_done)
            say(f"resuming after batch {restored.batches_done} of {len(loader)} from {escape(str(partial.folder))}")
    images_done = _rows(columns)
    last_save = time.monotonic()
    with (RunProgress("evaluate", len(loader) or None, console if accelerator.is_main_process else None,
                      unit="batch", interval=log_interval, completed=first_batch - 1, images=images_done) as progress,
          out_of_memory(EVALUATE_MEMORY_ADVICE), dataloader_workers_died(EVALUATE_WORKER_ADVICE),
          StopSignals() as signals):
        # every process takes part in every step until all are done: streams or unreadable images may leave them
        # with different numbers of images, and each gathers what it read
        for batches_done, (batch, _) in enumerate(lockstep(batches, accelerator, to_the_end=True), start=first_batch):
            if batch is not None:
                stream_batches += 1
                stop_if_strict(batch, settings.strict)
                unreadable += batch.unreadable
            if batch is None or batch.images.numel() == 0:
                gather_rows_into(columns, None, accelerator)
                progress.update(batches_done, images_done)
                last_save = _keep_or_stop(partial, columns, batches_done, unreadable, stream_place, signals,
                                          last_save, len(loader), settings.resumable, accelerator, say)
                continue
            row = certify_batch(smooth, batch, plan, settings, generator, accelerator.device)
            gather_rows_into(columns, row, accelerator)
            images_done = _rows(columns)
            progress.update(batches_done, images_done)
            last_save = _keep_or_stop(partial, columns, batches_done, unreadable, stream_place, signals, last_save,
                                      len(loader), settings.resumable, accelerator, say)
    # in data order, each image once (a sharded folder repeats images to even out the last batch)
    per_image = unique_by_index({k: torch.cat(v) for k, v in columns.items() if v}) if columns else {}
    # counted by name: a sharded folder repeats the images of its first batches, unreadable ones too
    skipped_names = sorted({name for names in gather_per_process(unreadable, accelerator) for name in names})
    skipped = len(skipped_names)
    if "label" not in per_image:
        raise CertifyZooError(f"no readable images in {settings.data} ({skipped} unreadable)")
    if skipped:  # the record counts them; the table's images are the readable ones
        say(escape(skipped_unreadable(skipped_names, skipped)))
    names = [image_name(data.loader, i) for i in per_image["index"].tolist()] if plan.pgd is not None else []
    record, audit, warning = certification_record(per_image, plan, settings, metadata, names, sigma, model.input_size,
                                                  skipped, data.left_out)
    record["on_conversion_images"] = on_conversion_images  # the card says so: not a measure on unseen images
    if warning:
        say(f"[bold red]WARNING: {warning}[/]")
    if reason:
        say(f"[yellow]{escape(reason)}[/]")
    if destination is not None and accelerator.is_main_process:
        record, earlier = _keep_records(destination, record, audit, per_image, plan, settings, bool(metadata), sigma,
                                        partial, say)
        if earlier is not None:
            say(f"the earlier evaluation's records are kept in {escape(str(earlier))}")
    return Evaluation(record, per_image)


def _say_plan(say, settings: EvaluateSettings, metadata: dict, plan: EvaluationPlan, num_images: int | None,
              sigma: float) -> None:
    """Before the first image: what kind of model this is, what it is certified at, and what the run will cost."""
    if not metadata:
        say("[yellow]This model was not converted by certify-zoo: its deterministic radii are not certificates; "
            f"see the Monte-Carlo numbers{'' if plan.method != 'deterministic' else ' (--method all)'}.[/]")
    elif sigma != metadata.get("sigma"):
        say(f"[yellow]WARNING: {escape(settings.model)} was converted at sigma {metadata.get('sigma')} and is "
            f"certified here at sigma {sigma}: its deterministic radii are then not the ones its conversion trained "
            "for (both sigmas are recorded).[/]")
    if plan.calibration.withdrawn and plan.method == "deterministic":
        from .card import evaluate_command, withdrawal_text

        command = f"{evaluate_command(settings.model, settings.data)} --method monte-carlo"
        say(f"[yellow]{escape(withdrawal_text(metadata, command))}[/]")
    if plan.sampled_audit:
        expected = settings.check_images if num_images is None else round(plan.check_fraction * num_images)
        say(f"checks on ~{expected} of {counted(num_images or '?', 'image')}: PGD audit of the deterministic radii "
            f"({settings.audit_steps} steps x {settings.audit_restarts} restarts, up to "
            f"{(settings.audit_steps + 13) * settings.audit_restarts} forward+backward passes per image)"
            + (f" and Monte-Carlo (n0 {settings.n0} + n {plan.mc_n:,} forwards per image)" if plan.checks else "")
            + "; --audit none skips them")
    say(forward_passes(num_images, plan.want_mc and not plan.checks, settings.n0, plan.mc_n,
                       None if plan.sampled_audit else plan.pgd))


def _keep_records(destination: Path, record: dict, audit: dict | None, per_image: dict, plan: EvaluationPlan,
                  settings: EvaluateSettings, converted: bool, sigma: float,
                  partial: PartialEvaluation, say: Callable[..., None]) -> tuple[dict, Path | None]:
    """Write the run's records into ``destination``, an earlier run's moved to its evaluations/ folder, and drop the
    kept partial results (a converted model's own folder: then its plot and card follow them). Returns the
    certification record with its run id and list of files, and where the earlier run's records went. On a full disk
    the folder keeps the earlier run's records, and RecordsNotWritten carries this run's."""
    files = {CERTIFICATION_NAME: record, PER_IMAGE_NAME: per_image_record(per_image, plan.calibration)}
    if audit is not None:
        files[AUDIT_NAME] = {"model": settings.model, "data": settings.data, "sigma": sigma, **audit}
    earlier = None
    try:
        earlier = keep_earlier_run(destination, CERTIFICATION_NAME)
        written = write_run_records(destination, files, RUN_RECORDS)
    except BaseException as exc:  # a full disk, or Ctrl-C while writing: none of this run's records were kept
        if earlier is not None:
            put_back_earlier_run(destination, earlier)
        reason = disk_error_reason(exc)
        if reason is None:
            raise
        raise RecordsNotWritten(f"cannot write this evaluation's records to {destination}: {reason}: "
                                f"{disk_remedy(reason)} (or pass --out DIR on another disk) and run it again",
                                record) from exc
    partial.remove()
    if converted and _same_folder(destination, settings.model):  # however --out spells it
        from .card import refresh_outputs

        try:
            refresh_outputs(destination)
        except Exception as exc:
            reason = disk_error_reason(exc)
            if reason is None:
                raise
            say(f"[bold red]WARNING: the records are written to {escape(str(destination))}, but its card and plot "
                f"still show the earlier evaluation: {reason} ({disk_remedy(reason)}; push writes the card it uploads "
                "from the records)[/]")
    return written, earlier


@dataclass(frozen=True)
class EvaluationPlan:
    """What one evaluation certifies and checks, decided before its first image."""
    method: str  # deterministic, monte-carlo or all
    calibration: Calibration  # what scales the deterministic radius (Calibration(): the raw radius)
    sampled_audit: bool  # a converted model's default: PGD on a subsample of ~check_images images
    checks: bool  # ... and a quick Monte-Carlo on the same subsample (no --method given)
    want_mc: bool  # Monte-Carlo on some images: all of them, or the subsample
    mc_n: int  # Monte-Carlo estimation samples per image
    check_fraction: float  # the subsample's share of the data (1: every image)
    pgd: PGDSettings | None  # the audit's attack, or None


def plan_evaluation(settings: EvaluateSettings, metadata: dict, num_images: int | None) -> EvaluationPlan:
    """The default for a converted model: its deterministic radii on every image, and on a subsample of
    ~check_images a PGD audit of those radii (unless --audit says otherwise) and, without --method, a quick
    Monte-Carlo cross-check: no deterministic number is shown unchecked. Any other model: Monte-Carlo."""
    method = settings.method or ("deterministic" if metadata else "monte-carlo")
    sampled_audit = bool(metadata) and settings.audit is None and settings.check_images > 0
    checks = sampled_audit and settings.method is None
    audit = settings.audit or ("pgd" if sampled_audit else "none")
    return EvaluationPlan(
        method=method,
        calibration=Calibration.of(metadata) if settings.calibrated else Calibration(),
        sampled_audit=sampled_audit,
        checks=checks,
        want_mc=method in ("monte-carlo", "all") or checks,
        mc_n=settings.n or (FULL_N if method in ("monte-carlo", "all") else CHECK_N),
        check_fraction=min(1.0, settings.check_images / num_images) if sampled_audit and num_images else 1.0,
        pgd=settings.pgd() if audit == "pgd" else None)


def certify_batch(smooth: Smooth, batch, plan: EvaluationPlan, settings: EvaluateSettings,
                  generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch's per-image columns: prediction and deterministic radii from one forward each, and the Monte-Carlo
    certificate and PGD audit where the plan runs them."""
    model, sigma = smooth.base_classifier, smooth.sigma
    # one forward per image, in the pieces a Monte-Carlo forward would take (on a GPU the whole batch; on a CPU what
    # stays in its caches); softmax, top-2 and PhiInv on the whole batch, on device
    pieces = noisy_batch_size(settings.batch_size, batch.images.shape[1:], device.type)
    with torch.inference_mode():
        logits = torch.cat([model(piece) for piece in batch.images.split(pieces)])
    raw = certify_deterministic(logits, sigma)
    cert = plan.calibration.certify(logits, sigma)
    sample = in_check_subsample(batch.indices, settings.seed, plan.check_fraction)
    checked = sample if plan.checks else torch.ones_like(sample)  # the images Monte-Carlo runs on
    row = {"label": batch.labels, "prediction": cert.prediction, "p1": cert.p1, "p2": cert.p2,
           "radius": cert.radius, "radius_raw": raw.radius, "radius_lipschitz": cert.radius_lipschitz,
           "index": batch.indices, "checked": checked, "audit_sample": sample}
    # Monte-Carlo noise and PGD starts seeded by the batch's first image (dataset index or stream position): fresh
    # for every batch, and the same for a batch whatever the number of processes
    generator.manual_seed(draw_key(settings.seed, int(batch.indices[0])))
    if plan.want_mc:
        chunk = settings.mc_batch_size or pieces
        mc_prediction = torch.full_like(batch.labels, ABSTAIN)
        row["mc_radius"] = torch.zeros_like(cert.radius)
        row["gap_max_abs"], row["gap_l1"] = (torch.full_like(cert.radius, float("nan")) for _ in range(2))
        if checked.any():
            mc = smooth.certify_with_mean(batch.images[checked], settings.n0, plan.mc_n, settings.alpha, chunk,
                                          generator)
            mc_prediction[checked] = mc.prediction.to(device)
            row["mc_radius"][checked] = mc.radius.to(device)
            gaps = gap_to_gaussian_average(logits[checked].softmax(-1), mc.mean_probabilities.to(device))
            row["gap_max_abs"][checked], row["gap_l1"][checked] = gaps
        row["mc_prediction"] = mc_prediction
    if plan.pgd is not None:
        piece = forward_piece(settings.batch_size, batch.images.shape[1:], device.type)
        row.update(audit_batch(model, batch.images, batch.labels, cert, plan.pgd, generator, sample, piece))
    return row


def summarise_certificates(per_image: dict[str, torch.Tensor], plan: EvaluationPlan, settings: EvaluateSettings,
                           metadata: dict, names: list[str]) -> tuple[dict[str, Any], dict | None, str | None]:
    """Each certificate's certified accuracies from the per-image columns, the audit's summary, and a warning when
    the audit broke more calibrated claims than the conversion's calibration makes likely."""
    labels = per_image["label"]
    correct = per_image["prediction"] == labels
    radii = list(settings.radii)
    calibration = plan.calibration
    calibrated = calibration != Calibration()
    applied = ({"kappa": calibration.kappa, "temperature": calibration.temperature,
                "source": "certify_zoo.json calibration" if calibrated else RAW_RADIUS_SOURCE} if metadata else None)
    certificates: dict[str, Any] = {
        "deterministic": summarise(per_image["radius"], correct, radii, bound="gaussian",
                                   proves=CERTIFICATE_MEANING["deterministic"],
                                   **({"calibration": applied} if applied else {})),
        "deterministic_lipschitz": summarise(per_image["radius_lipschitz"], correct, radii, bound="lipschitz",
                                             proves=CERTIFICATE_MEANING["deterministic_lipschitz"],
                                             **({"calibration": applied} if applied else {})),
    }
    if calibrated:
        certificates["deterministic_raw"] = summarise(per_image["radius_raw"], correct, radii, bound="gaussian",
                                                      proves=CERTIFICATE_MEANING["deterministic_raw"])
    checked = per_image["checked"].bool()
    audit, warning = None, None
    if plan.pgd is not None:
        attack = AttackResult(per_image["flipped"], per_image["flip_distance"], per_image["adversarial_class"])
        audit = summarise_audit(per_image["radius"], per_image["audited"], attack, per_image["index"], plan.pgd,
                                names=names)
        certificates["deterministic"]["audit"] = audit["statement"]
        bound = (metadata.get("calibration") or {}).get("broken_share_bound") if calibrated else None
        if bound is not None:  # what the calibration promised for images like its held-out slice (selfcheck)
            p_value = broken_share_p_value(audit["counterexamples"], audit["attacked"], bound)
            audit.update(calibration_broken_share_bound=bound, calibration_bound_p_value=round(p_value, 6))
            if p_value < BOUND_SIGNIFICANCE:
                warning = (f"PGD broke {audit['counterexamples']} of {audit['attacked']} calibrated claims "
                           f"({audit['counterexample_rate']:.1%}), more than the {bound:.1%} the calibration expects "
                           f"on images like its held-out images (binomial p = {p_value:.2g}): these images differ "
                           "from them, or the slice was too small; trust the Monte-Carlo certificate"
                           + ("" if metadata["calibration"].get("images_from") == FROM_CHECK_DATA else
                              ", or convert again with --check-data: images the base never trained on"))
    if plan.want_mc:  # over the images it ran on: all of them, or the check subsample
        mc_correct = (per_image["mc_prediction"] == labels)[checked]
        certificates["monte_carlo"] = summarise(
            per_image["mc_radius"][checked], mc_correct, radii, n0=settings.n0, n=plan.mc_n, alpha=settings.alpha,
            seed=settings.seed, abstentions=int((per_image["mc_prediction"][checked] < 0).sum()),
            images=int(checked.sum()), proves=CERTIFICATE_MEANING["monte_carlo"])
        if plan.checks:  # the deterministic numbers on the same subsample, for a like-for-like comparison
            certificates["deterministic"]["on_check_subsample"] = summarise(
                per_image["radius"][checked], correct[checked], radii, images=int(checked.sum()))["certified_accuracy"]
    return certificates, audit, warning


def certification_record(per_image: dict[str, torch.Tensor], plan: EvaluationPlan, settings: EvaluateSettings,
                         metadata: dict, names: list[str], sigma: float, input_size: Sequence[int], skipped: int,
                         left_out: int) -> tuple[dict[str, Any], dict | None, str | None]:
    """certification.json from the per-image columns (each image once), with the audit's summary and the
    calibration's warning (summarise_certificates)."""
    certificates, audit, warning = summarise_certificates(per_image, plan, settings, metadata, names)
    record = {
        "schema_version": SCHEMA_VERSION,
        "certify_zoo_version": __version__,
        "model": settings.model,
        "converted_by_certify_zoo": bool(metadata),
        "data": settings.data,
        "num_images": int(per_image["label"].numel()),
        "skipped_images": skipped,
        "left_out_calibration_images": left_out,
        "sigma": sigma,
        "conversion_sigma": metadata.get("sigma"),  # what the model was trained for (None: not converted by us)
        "norm": "l2",
        "space": f"[0,1] pixels at {'x'.join(map(str, input_size))}",
        "radii": list(settings.radii),
        "clean_accuracy": float((per_image["prediction"] == per_image["label"]).double().mean()),
        "certificates": certificates,
        "deterministic_algorithms": settings.deterministic,  # --deterministic: repeatable on a GPU
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if settings.subsample > 1:
        record["subsample"] = settings.subsample
    if plan.sampled_audit:
        record["checks"] = {"images": int(per_image["audit_sample"].sum()), "audit": "pgd",
                            **({"monte_carlo_n": plan.mc_n} if plan.checks else {}),
                            "meaning": "a subsample of ~check_images images, chosen by a hash of each image's "
                                       "index and the seed, gets the PGD audit (and, without --method, a quick "
                                       "Monte-Carlo) by default"}
    if plan.want_mc:
        record["agreement"] = agreement_record(certificates, per_image, plan.mc_n, per_image["checked"].bool())
    if audit is not None:
        record["audit"] = {k: v for k, v in audit.items() if k != "worst"} | {"file": AUDIT_NAME}
    return record, audit, warning


def no_stored_sigma(model: str) -> CertifyZooError:
    """A certificate of a model certify-zoo did not convert needs the noise level it is asked at."""
    return CertifyZooError(f"{model} has no stored sigma (not converted by certify-zoo): pass --sigma")


def run_fingerprint(settings: EvaluateSettings, images: int | None, processes: int) -> dict:
    """What partial results must share with the run that resumes them: every setting that changes a row or the
    batches (not where records go), the model's files, the number of images, and the number of processes (which
    decides the images each process's batches so far covered: more processes skipping as many batches each would
    leave images out)."""
    fields = {key: value for key, value in dataclasses.asdict(settings).items()
              if key not in ("resume", "resumable", "out", "write", "compile", "channels_last", "deterministic",
                             "workers")}
    return {**fields, "radii": list(settings.radii), "model files": model_files(settings.model, RUN_RECORDS),
            "images": images, PROCESSES: processes}


def _rows(columns: dict[str, list[torch.Tensor]]) -> int:
    return sum(len(labels) for labels in columns.get("label", []))


def _keep_or_stop(partial: PartialEvaluation, columns: dict, batches_done: int, unreadable: list[str],
                  stream_place: Callable[[], dict | None], signals: StopSignals, last_save: float, total: int,
                  resumable: bool, accelerator, say: Callable[..., None]) -> float:
    """After a batch: keep the rows so far (and, reading a stream, where each process stands in it) every
    SAVE_EVERY_MINUTES, and stop where a signal asked to (every process at the same batch: any process's clock or
    signal decides for all). A full disk does not end the run there: it goes on without a safety copy. Returns the
    time of the last save."""
    due = partial.folder is not None and time.monotonic() - last_save >= SAVE_EVERY_MINUTES * 60
    unkept = None  # why the rows so far could not be kept
    stop, save = on_any_process([signals.requested is not None, due], accelerator)
    if partial.folder is not None and (stop or save):  # the same folder, or none, on every process
        names = sorted({name for part in gather_per_process(unreadable, accelerator) for name in part})
        places = gather_per_process(stream_place(), accelerator)
        if accelerator.is_main_process:
            try:
                partial.save(columns, batches_done, names, places if places[0] is not None else None)
            except Exception as exc:
                unkept = disk_error_reason(exc)
                if unkept is None:
                    raise
                say(f"[bold red]WARNING: cannot keep the results so far in {escape(str(partial.folder))}: {unkept} "
                    "(the evaluation goes on; a stop now would lose them)[/]")
        last_save = time.monotonic()
    if stop:
        how = signals.requested or "a signal to another process"
        done = f"after batch {batches_done}" + (f" of {total}" if total else "")
        if unkept is not None:
            raise StoppedWithNothingKept(f"stopped by {how} {done}; nothing kept: the results so far could not be "
                                         f"written to {partial.folder} ({unkept})")
        if partial.folder is None:
            raise StoppedWithNothingKept(f"stopped by {how} {done}; nothing kept"
                                         + (" (no records folder: --out DIR keeps the results so far)"
                                            if resumable else ""))
        raise Interrupted(f"stopped by {how} {done}; results so far in {partial.folder}: rerun the same command "
                          "with --resume to continue")
    return last_save


def _same_folder(folder: Path, model: str) -> bool:
    path = Path(model).expanduser()
    return path.is_dir() and os.path.samefile(folder, path)


def records_folder(settings: EvaluateSettings, metadata: dict) -> tuple[Path | None, str | None]:
    """Where this run's records go (--out, else the model's folder when certify-zoo made it), and why nowhere.

    A folder without certify_zoo.json is someone's own (a checkpoint, a download): nothing is written into it."""
    if settings.out is not None:
        return Path(settings.out).expanduser(), None
    folder = Path(settings.model).expanduser()
    if not settings.write or not folder.is_dir():
        return None, None
    if not metadata:
        return None, (f"records not written: {folder} was not made by certify-zoo (no {METADATA_NAME}); pass "
                      "--out DIR to keep them")
    if not can_write_in(folder):  # a shared or mounted model folder: evaluated all the same
        return None, (f"records not written: {folder} cannot be written (a read-only file system, or no "
                      "permission); pass --out DIR to keep them")
    return folder, None


def in_check_subsample(indices: torch.Tensor, seed: int, fraction: float) -> torch.Tensor:
    """A fixed pseudo-random ``fraction`` of images, by a hash of (seed, index): the same whatever the batch or
    process an image lands in."""
    if fraction >= 1.0:
        return torch.ones_like(indices, dtype=torch.bool)
    keys = torch.tensor([draw_key(seed, 0xC4EC, int(i)) % 1_000_003 for i in indices.tolist()],
                        device=indices.device)
    return keys < fraction * 1_000_003


def per_image_record(per_image: dict[str, torch.Tensor], calibration: Calibration) -> dict[str, Any]:
    """Every image's radii (raw and as reported), for step curves and for checking a card's numbers."""
    columns = {"index": "index", "label": "label", "prediction": "prediction", "radius_raw": "radius_raw",
               "radius": "radius_calibrated", "mc_prediction": "mc_prediction", "mc_radius": "mc_radius",
               "checked": "checked", "flipped": "pgd_counterexample"}
    rows = {name: [round(v, 6) if isinstance(v, float) else v for v in per_image[key].tolist()]
            for key, name in columns.items() if key in per_image}
    return {"kappa": calibration.kappa, "temperature": calibration.temperature,
            "num_images": int(per_image["label"].numel()), **rows}


def audit_batch(model, images: torch.Tensor, labels: torch.Tensor, cert, pgd: PGDSettings,
                generator: torch.Generator | None, chosen: torch.Tensor | None = None,
                piece: int | None = None) -> dict[str, torch.Tensor]:
    """PGD inside the claimed deterministic radius of every correctly classified image with a positive radius
    (of the ``chosen`` ones), ``piece`` images per forward and backward."""
    audited = (cert.prediction == labels) & (cert.radius > 0)
    if chosen is not None:
        audited &= chosen
    flipped = torch.zeros_like(audited)
    distance = torch.full_like(cert.radius, float("nan"))
    adversarial = torch.full_like(labels, -1)
    if audited.any():
        chosen = torch.nonzero(audited).flatten()
        result = pgd_l2(model, images[chosen], labels[chosen], cert.radius[chosen], pgd, generator, piece)
        flipped[chosen] = result.flipped.to(flipped.device)
        distance[chosen] = result.distance.to(distance.device, distance.dtype)
        adversarial[chosen] = result.adversarial_class.to(adversarial.device)
    return {"audited": audited, "flipped": flipped, "flip_distance": distance, "adversarial_class": adversarial}


def agreement_record(certificates: dict[str, Any], per_image: dict[str, torch.Tensor], n: int,
                     checked: torch.Tensor) -> dict[str, Any]:
    """Deterministic vs Monte-Carlo certified accuracy per radius (on the images Monte-Carlo ran on), and how far
    softmax v(x) is from its own Gaussian average E softmax v(x + eta) (estimated from the n Monte-Carlo samples)."""
    deterministic = certificates["deterministic"].get("on_check_subsample",
                                                      certificates["deterministic"]["certified_accuracy"])
    monte_carlo = certificates["monte_carlo"]["certified_accuracy"]
    rows = [{"radius": d["radius"], "deterministic": d["accuracy"], "monte_carlo": m["accuracy"],
             "deterministic_minus_monte_carlo": d["accuracy"] - m["accuracy"]}
            for d, m in zip(deterministic, monte_carlo)]
    gaps, gaps_l1 = per_image["gap_max_abs"][checked].double(), per_image["gap_l1"][checked].double()
    gap = {"mean_max_abs": float(gaps.mean()), "median_max_abs": float(gaps.median()), "mean_l1": float(gaps_l1.mean()),
           "estimated_from": f"{n} Monte-Carlo samples per image",
           "meaning": "|softmax v(x) - E softmax v(x + eta)|, eta ~ N(0, sigma^2 I): how closely the model "
                      "approximates its own Gaussian average, on which the deterministic radius relies"}
    return {"certified_accuracy": rows, "gap_to_gaussian_average": gap,
            "certificates": {"deterministic": "deterministic (Gaussian bound)",
                             "monte_carlo": "Monte-Carlo (Cohen et al.)"}}


def image_name(loader, index: int) -> str:
    """The file behind a dataset index (folders, also through a Subset), or a streamed example's position."""
    if isinstance(loader, StreamLoader):
        return f"stream position {index}"
    dataset = getattr(loader, "dataset", None)
    files = getattr(getattr(dataset, "dataset", dataset), "files", None)
    return str(files[index]) if files is not None and index >= 0 else f"#{index}"
