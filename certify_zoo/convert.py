"""The conversion loop: one label-free epoch of the Boot Camp objective on Accelerate.

Shaped like accelerate's own examples, so the same code runs on CPU, one GPU, and under
``accelerate launch`` / ``torchrun``: only the main process prints and writes.
"""
from __future__ import annotations

import copy
import math
import platform
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import __version__
from .data import collate_skipping_unreadable, dataloader_workers, unlabelled_images
from .errors import CertifyZooError
from .export import METADATA_NAME, SCHEMA_VERSION, prepare_output_folder, save_timm_model, write_json_atomic
from .models import load_classifier
from .objective import PENALTY_ESTIMATORS, ObjectiveSettings, boot_camp_loss, effective_gamma


@dataclass
class ConvertSettings:
    model: str
    data: str
    out: str
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    recipe: str = "generic"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: float = 0.1
    precision: str = "no"
    grad_accum: int = 1
    seed: int = 0
    bn_mode: str = "train"
    collapse_threshold: float = 0.5
    overwrite: bool = False
    revision: str | None = None

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], model: str, data: str, out: str, **overrides) -> "ConvertSettings":
        """Recipe values, then every override that is not None (the command line wins)."""
        chosen = {**recipe, **{k: v for k, v in overrides.items() if v is not None}}
        objective = ObjectiveSettings(**{k: chosen[k] for k in ObjectiveSettings.__dataclass_fields__ if k in chosen})
        own = {k: chosen[k] for k in cls.__dataclass_fields__
               if k in chosen and k not in ("model", "data", "out", "objective", "recipe")}
        return cls(model=model, data=data, out=out, objective=objective, recipe=recipe.get("name", "custom"), **own)

    def validate(self) -> None:
        o = self.objective
        if not 0 < o.sigma <= 2:
            raise CertifyZooError(f"--sigma must be in (0, 2] (pixel L2 noise on [0,1] images), got {o.sigma}")
        if o.gamma < 0:
            raise CertifyZooError(f"--gamma must be >= 0, got {o.gamma}")
        if o.estimator not in PENALTY_ESTIMATORS:
            raise CertifyZooError(f"--estimator must be one of {', '.join(PENALTY_ESTIMATORS)}, got {o.estimator!r}")
        if o.reps < 0 or o.probes < 1:
            raise CertifyZooError(f"--reps must be >= 0 and --probes >= 1, got {o.reps} and {o.probes}")
        if self.batch_size < 1:
            raise CertifyZooError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise CertifyZooError("--epochs and --max-steps must be at least 1")
        if self.lr <= 0 or not 0 <= self.warmup < 1:
            raise CertifyZooError("--lr must be > 0 and --warmup in [0, 1)")
        if self.precision not in ("no", "bf16", "fp16"):
            raise CertifyZooError(f"--precision must be no, bf16 or fp16, got {self.precision}")
        if self.bn_mode not in ("train", "eval"):
            raise CertifyZooError(f"bn_mode must be train or eval, got {self.bn_mode}")

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["objective"] = self.objective.to_dict()
        record.pop("overwrite")
        return record


@dataclass
class ConversionResult:
    out: Path
    steps: int
    images_seen: int
    skipped_images: int
    seconds: float
    final_agreement: float


def warmup_factor(step: int, total_steps: int, warmup: float) -> float:
    """Linear ramp from ~0 to 1 over the first `warmup` fraction of steps (for both lr and gamma)."""
    warm_steps = max(1, int(math.ceil(warmup * total_steps))) if warmup > 0 else 0
    return min(1.0, (step + 1) / warm_steps) if warm_steps else 1.0


def learning_rate(step: int, total_steps: int, settings: ConvertSettings) -> float:
    """Warm-up, then cosine decay from lr to lr_min over the rest of the run."""
    warm_steps = int(math.ceil(settings.warmup * total_steps))
    if step < warm_steps:
        return settings.lr * warmup_factor(step, total_steps, settings.warmup)
    progress = (step - warm_steps) / max(1, total_steps - warm_steps)
    return settings.lr_min + 0.5 * (settings.lr - settings.lr_min) * (1 + math.cos(math.pi * min(1.0, progress)))


def _parameter_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases and norm scales, as in the reference code."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _set_bn_eval(module: torch.nn.Module) -> None:
    for child in module.modules():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            child.eval()


def convert(settings: ConvertSettings, console=None) -> ConversionResult:
    """Fine-tune a student copy of MODEL on DATA with the Boot Camp objective and save it to OUT."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    settings.validate()
    accelerator = Accelerator(mixed_precision=settings.precision, gradient_accumulation_steps=settings.grad_accum)
    say = console.print if (console is not None and accelerator.is_main_process) else (lambda *a, **k: None)
    out = Path(settings.out).expanduser()
    if accelerator.is_main_process:
        prepare_output_folder(out, settings.overwrite)
    accelerator.wait_for_everyone()
    set_seed(settings.seed)

    student = load_classifier(settings.model, settings.revision)
    base = copy.deepcopy(student).eval().requires_grad_(False)
    dataset = unlabelled_images(settings.data, student.transform())
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, drop_last=len(dataset) >= settings.batch_size,
                        num_workers=dataloader_workers(), collate_fn=collate_skipping_unreadable,
                        generator=torch.Generator().manual_seed(settings.seed), persistent_workers=False)
    optimizer = torch.optim.SGD(_parameter_groups(student, settings.weight_decay), lr=settings.lr,
                                momentum=settings.momentum)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    base = base.to(accelerator.device)

    steps_per_epoch = max(1, len(loader) // settings.grad_accum)
    total_steps = steps_per_epoch * settings.epochs
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    gamma_full = effective_gamma(settings.objective.gamma, student_num_classes(student, accelerator))
    say(f"[bold]convert[/] {settings.model} -> {out}  ({len(dataset)} images, {total_steps} steps, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, recipe {settings.recipe})")
    say(f"sigma {settings.objective.sigma} (pixel L2), gamma {settings.objective.gamma} at 1000 classes "
        f"= {gamma_full:.4g} effective, reps {settings.objective.reps}, h {settings.objective.h}, "
        f"estimator {settings.objective.estimator}"
        + (f" ({settings.objective.probes} probe(s))" if settings.objective.estimator != "paper" else ""))

    step, images_seen, skipped = 0, 0, 0
    recent_agreement: deque[float] = deque(maxlen=20)
    collapse_warned = False
    started = time.perf_counter()
    progress = _progress(accelerator.is_main_process and console is not None, console)
    task = progress.add_task("converting", total=total_steps, loss=float("nan"), lr=0.0, agree=float("nan"), ips=0.0)
    with progress:
        for epoch in range(settings.epochs):
            student.train()
            if settings.bn_mode == "eval":
                _set_bn_eval(student)
            for batch in loader:
                if step >= total_steps:
                    break
                skipped += int(accelerator.gather(torch.tensor([batch.skipped], device=accelerator.device)).sum())
                if batch.images.numel() == 0:
                    continue
                with accelerator.accumulate(student):
                    ramp = warmup_factor(step, total_steps, settings.warmup)
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(step, total_steps, settings)
                    with accelerator.autocast():
                        parts = boot_camp_loss(student, base, batch.images, settings.objective, gamma_full * ramp)
                    if not torch.isfinite(parts.loss):
                        raise CertifyZooError(f"loss is {parts.loss.item()} at step {step + 1}: lower --lr or --gamma "
                                              "(no weights were written)")
                    accelerator.backward(parts.loss)
                    optimizer.step()
                    optimizer.zero_grad()
                count = int(accelerator.gather(torch.tensor([batch.images.shape[0]], device=accelerator.device)).sum())
                images_seen += count
                if accelerator.sync_gradients:
                    step += 1
                    agreement = accelerator.gather(parts.agreement.mean().reshape(1)).float().mean().item()
                    if not math.isnan(agreement):
                        recent_agreement.append(agreement)
                    mean_agreement = sum(recent_agreement) / max(1, len(recent_agreement))
                    loss = accelerator.gather(parts.loss.detach().reshape(1)).mean().item()
                    elapsed = time.perf_counter() - started
                    progress.update(task, advance=1, loss=loss, lr=optimizer.param_groups[0]["lr"],
                                    agree=mean_agreement, ips=images_seen / max(elapsed, 1e-9))
                    if (not collapse_warned and ramp >= 1.0 and len(recent_agreement) == recent_agreement.maxlen
                            and mean_agreement < settings.collapse_threshold):
                        collapse_warned = True
                        say(f"[bold red]WARNING: the student agrees with the base on only {mean_agreement:.0%} of "
                            f"clean images at step {step}: the penalty is collapsing it. Lower --gamma or --lr.[/]")
            if step >= total_steps:
                break

    seconds = time.perf_counter() - started
    final_agreement = sum(recent_agreement) / max(1, len(recent_agreement))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(student)
        save_timm_model(unwrapped.net, out, unwrapped.label_names)
        write_json_atomic(out / METADATA_NAME, {
            "schema_version": SCHEMA_VERSION,
            "certify_zoo_version": __version__,
            "method": "adversarial-boot-camp",
            "paper": "arXiv:2010.02508",
            "base_model": settings.model,
            "sigma": settings.objective.sigma,
            "num_classes": unwrapped.num_classes,
            "input_size": list(unwrapped.input_size),
            "data": settings.data,
            "steps": step,
            "images_seen": images_seen,
            "skipped_images": skipped,
            "settings": settings.to_record(),
            "effective_gamma": gamma_full,
            "final_agreement_with_base": final_agreement,
            "collapse_warning": collapse_warned,
            "hardware": {"device": str(accelerator.device), "processes": accelerator.num_processes,
                         "platform": platform.platform(), "torch": torch.__version__},
            "seconds": round(seconds, 2),
        })
        say(f"saved {out} ({step} steps, {images_seen} images seen, {skipped} unreadable skipped, "
            f"{seconds:.1f}s, agreement with base {final_agreement:.1%})")
    accelerator.wait_for_everyone()
    return ConversionResult(out, step, images_seen, skipped, seconds, final_agreement)


def student_num_classes(student, accelerator) -> int:
    return accelerator.unwrap_model(student).num_classes


def _progress(enabled: bool, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.4g}  "
                               "agree {task.fields[agree]:.0%}  {task.fields[ips]:.0f} img/s"),
                    TimeRemainingColumn(), console=console, disable=not enabled, transient=False)
