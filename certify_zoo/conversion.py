"""The conversion loop: one label-free epoch of the Boot Camp objective on Accelerate.

Shaped like accelerate's own examples, so the same code runs on CPU, one GPU, and under
``accelerate launch`` / ``torchrun``: only the main process prints and writes.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import platform
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.markup import escape

from . import __version__
from .card import write_card
from .certificate_names import (FROM_CHECK_DATA, FROM_CONVERSION_DATA, MIN_CALIBRATION_IMAGES,
                                count_held_out, too_few_to_calibrate)
from .checkpoints import (UNREADABLE_NAMES_KEPT, CheckpointPolicy, CheckpointStore, RunPosition, generator_state,
                          set_generator_state)
from .clipping import MedianNormClip, fixed_clip_threshold
from .data import stop_if_strict
from .data_sources import (DEFAULT_CHECK_DATA, DEFAULT_DATA, CheckImages, Loader, check_images, conversion_loader,
                           require_local_data)
from .distributed import (gather_per_process, gather_seen, lockstep, main_process_alone, make_accelerator,
                          one_process_of_several_note, sum_waiting_long)
from .draws import draw_key, keyed_draws
from .errors import (ConversionInterrupted, CertifyZooError, StoppedWithNothingKept, alike_on_every_process,
                     disk_errors, require_at_least_one, require_known_settings, require_sigma, require_workers)
from .export import METADATA_NAME, SCHEMA_VERSION, OutputLock, write_json_atomic
from .forward_modes import (BN_MODES, RECOMPUTE_BATCHES, FrozenRunningStatistics, batch_norms, resolve_bn_mode,
                            running_statistics_kept, set_conversion_mode, stochastic_layers, uses_batch_statistics)
from .guards import (CONVERT_MEMORY_ADVICE, CONVERT_WORKER_ADVICE, dataloader_workers_died, deterministic_algorithms,
                     out_of_memory, require_finite_loss, require_readable_images)
from .models import load_classifier, local_model_spec
from .objective import (PENALTY_ESTIMATORS, PROBE_DISTRIBUTIONS, ObjectiveSettings, boot_camp_step, effective_gamma,
                        lazy_weight, penalty_due, stated_gamma)
from .progress import RunProgress
from .recipes import LR_SCALING_RULES, RecipeChoice, choose_recipe, load_recipe, scaled_learning_rate
from .rollback import LastGoodState
from .selfcheck import BaseAnswers, one_class_warning, self_check, top_class_share, without_held_out_images
from .smoothness import ALONE, GammaController, Shard, rho_at_probe_points
from .stopping import StopSignals
from .wording import counted, skipped_unreadable

OPTIMIZERS = ("sgd", "adamw")
SEEN_NAME = "seen_images.json"
AUTO = "auto"
MIN_STEPS_BETWEEN_CHECKS = 10
# one epoch of a small folder is a few dozen steps: the gamma study's BatchNorm CNN and EfficientNet-style network,
# converted by their recipes for 280 steps (10 epochs), ended less accurate and less certified than over 840 (30
# epochs; its rows 'defaults' and '30 epochs'), as many as the demo recipe takes. So a recipe's passes over the data
# are raised until a run has at least this many steps (--min-steps); an ImageNet epoch is far longer already.
MIN_STEPS = 840
COLLAPSE_WINDOW = 20  # steps averaged by the collapse guard on runs of 100 steps or more (see collapse_window)


@dataclass
class ConvertSettings:
    model: str
    data: str
    out: str
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    recipe: str = "generic"
    epochs: int = 1
    max_steps: int | None = None
    min_steps: int = MIN_STEPS  # the recipe's epochs are raised to give at least this many steps; 0: off
    batch_size: int = 32
    lr: float = 0.01  # peak lr at `reference_batch` images per optimiser step
    lr_min: float = 0.001
    optimizer: str = "sgd"
    lr_scaling: str = "none"  # how lr follows the global batch: linear, sqrt or none
    reference_batch: int | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: float = 0.1
    clip_grad_norm: float = 0.0  # largest L2 norm of the weight gradient per step; 0: off (the paper does not clip)
    # clip at this multiple of the running median gradient norm (penalty and fidelity-only steps apart); 0: off
    clip_grad_median_multiple: float = 0.0
    precision: str = "no"
    grad_accum: int = 1
    seed: int = 0
    # only deterministic kernels (guards.deterministic_algorithms): one seed, one GPU, the same weights
    deterministic: bool = False
    bn_mode: str = "auto"
    # --gamma auto: where the controller starts, as the effective weight on the penalty (not scaled by C/1000)
    gamma_start: float = 0.0005
    check_images: int = 128  # conversion images set aside (at most a tenth) for the gamma controller and self-check
    # where those images come from instead (data_sources.check_images): images the base did not train on; None: a
    # slice of the conversion data, except for the default ImageNet-1k, whose unlabelled test split is used
    check_data: str | None = None
    # --gamma auto halves gamma whenever the student's top-1 agreement with the base on those images is below this
    agreement_floor: float = GammaController.agreement_floor
    # --gamma auto with AdamW: the largest factor the controller may put on the schedule's lr (1: gamma only)
    max_lr_scale: float = GammaController.max_lr_scale
    collapse_threshold: float = 0.5
    overwrite: bool = False
    revision: str | None = None
    record_seen: bool = False  # write seen_images.json: the dataset indices each process trained on
    workers: int | None = None  # DataLoader processes decoding images, per process (None: data.dataloader_workers)
    trust_remote_code: bool = False
    image_column: str | None = None
    strict: bool = False
    resume: bool = False
    checkpoint_every: int = 0  # steps; 0: off
    checkpoint_minutes: float = 10.0  # 0: off
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.check_data is None and self.data == DEFAULT_DATA:
            self.check_data = DEFAULT_CHECK_DATA

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], model: str, data: str, out: str, **overrides) -> "ConvertSettings":
        """Recipe values, then every override that is not None (the command line wins)."""
        chosen = {**recipe, **{k: v for k, v in overrides.items() if v is not None}}
        if overrides.get("epochs") is not None and overrides.get("min_steps") is None:
            chosen["min_steps"] = 0  # passes chosen on the command line are taken as given
        if overrides.get("lr") is not None and overrides.get("lr_min") is None and "lr_min" in recipe:
            # the schedule keeps its shape: a lower peak must not decay towards a higher floor
            chosen["lr_min"] = recipe["lr_min"] * overrides["lr"] / recipe["lr"] if recipe.get("lr") else 0.0
        objective = ObjectiveSettings(**{k: chosen[k] for k in ObjectiveSettings.__dataclass_fields__ if k in chosen})
        own = {k: chosen[k] for k in cls.__dataclass_fields__
               if k in chosen and k not in ("model", "data", "out", "objective", "recipe")}
        return cls(model=model, data=data, out=out, objective=objective, recipe=recipe.get("name", "custom"), **own)

    def validate(self) -> None:
        o = self.objective
        for settings in (self, o):
            for setting in dataclasses.fields(settings):
                value = getattr(settings, setting.name)
                # a recipe file's values arrive untyped ("fast" for lr would fail in a comparison), and nan passes
                # every comparison below
                require_type(setting.name, value, setting.type)
                if isinstance(value, float) and not math.isfinite(value):
                    raise CertifyZooError(f"--{setting.name.replace('_', '-')} must be a finite number, got {value}")
        require_sigma(o.sigma)
        if o.gamma != AUTO and (isinstance(o.gamma, str) or o.gamma < 0):
            raise CertifyZooError(f"--gamma must be a number >= 0 or auto, got {o.gamma!r}")
        if not 0 < o.penalty_share <= 1 or (o.penalty_share < 1 and o.estimator != "jl"):
            raise CertifyZooError(f"--penalty-share must be in (0, 1] and below 1 only with --estimator jl, got "
                                  f"{o.penalty_share} with {o.estimator}")
        if o.penalty_every < 1 or self.clip_grad_median_multiple < 0:
            raise CertifyZooError(f"--penalty-every must be >= 1 and --clip-grad-median-multiple >= 0, got "
                                  f"{o.penalty_every} and {self.clip_grad_median_multiple}")
        if self.check_images < 0:
            raise CertifyZooError(f"--check-images must be >= 0, got {self.check_images}")
        require_workers(self.workers)
        if self.gamma_start <= 0:
            raise CertifyZooError(f"the recipe's gamma_start must be > 0, got {self.gamma_start}")
        if not 0 <= self.agreement_floor <= 1:
            raise CertifyZooError(f"--agreement-floor must be in [0, 1] (a share of held-out images), got "
                                  f"{self.agreement_floor}")
        if not self.max_lr_scale >= 1:
            raise CertifyZooError(f"--max-lr-scale must be at least 1 (1: the controller moves gamma only), got "
                                  f"{self.max_lr_scale}")
        if o.estimator not in PENALTY_ESTIMATORS:
            raise CertifyZooError(f"--estimator must be one of {', '.join(PENALTY_ESTIMATORS)}, got {o.estimator!r}")
        if o.probe_distribution not in PROBE_DISTRIBUTIONS:
            raise CertifyZooError(f"--probe-distribution must be one of {', '.join(PROBE_DISTRIBUTIONS)}, "
                                  f"got {o.probe_distribution!r}")
        if o.reps < 0 or not 1 <= o.probes <= max(1, o.reps):
            raise CertifyZooError(f"--reps must be >= 0 and --probes between 1 and reps, got {o.reps} and {o.probes}")
        if self.batch_size < 1:
            raise CertifyZooError(f"--batch-size must be at least 1, got {self.batch_size}")
        require_at_least_one(("--epochs", self.epochs), ("--max-steps", self.max_steps))
        if self.min_steps < 0:
            raise CertifyZooError(f"--min-steps must be at least 0, got {self.min_steps}")
        if self.lr < 0:  # checked alone: an --lr below 0 also scales the recipe's lr_min below 0
            raise CertifyZooError(f"--lr must be >= 0 (0: no weight update), got {self.lr}")
        if not 0 <= self.lr_min <= self.lr:
            raise CertifyZooError(f"--lr-min must be in [0, lr] (the schedule's floor), got {self.lr_min} at lr "
                                  f"{self.lr}")
        if not 0 <= self.warmup < 1:
            raise CertifyZooError(f"--warmup must be in [0, 1) (a share of the steps), got {self.warmup}")
        if self.clip_grad_norm < 0:
            raise CertifyZooError(f"--clip-grad-norm must be >= 0 (0: off), got {self.clip_grad_norm}")
        if not 0 <= o.noise_prob <= 1:
            raise CertifyZooError(f"--noise-prob must be in [0, 1] (the share of each batch that gets noise), got "
                                  f"{o.noise_prob}")
        if not o.h > 0:
            raise CertifyZooError(f"--h must be > 0 (the penalty's finite-difference step, in pixels), got {o.h}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise CertifyZooError(f"--weight-decay must be >= 0 and the recipe's momentum in [0, 1), got "
                                  f"{self.weight_decay} and {self.momentum}")
        if self.precision not in ("no", "bf16", "fp16"):
            raise CertifyZooError(f"--precision must be no, bf16 or fp16, got {self.precision}")
        if self.precision != "no" and o.reps > 0 and o.gamma != 0:
            raise CertifyZooError(f"--precision {self.precision} is refused with the penalty on: its finite difference "
                                  f"(a logit difference divided by h = {o.h}) is computed in float32 only, a "
                                  "half-precision logit near 10 is rounded by up to 0.06; pass --precision no (half "
                                  "precision only with --gamma 0)")
        if self.bn_mode not in BN_MODES:
            raise CertifyZooError(f"--bn-mode must be one of {', '.join(BN_MODES)}, got {self.bn_mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise CertifyZooError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer}")
        if self.lr_scaling not in LR_SCALING_RULES or (self.reference_batch is not None and self.reference_batch < 1):
            raise CertifyZooError(f"lr_scaling must be one of {', '.join(LR_SCALING_RULES)} and reference_batch at "
                                  f"least 1, got {self.lr_scaling} and {self.reference_batch}")
        self.checkpoint_policy().validate()
        for source in (self.data, self.check_data):
            if source:
                require_local_data(source)  # a mistyped folder says so before the model is downloaded

    def checkpoint_policy(self) -> CheckpointPolicy:
        return CheckpointPolicy(self.checkpoint_every, self.checkpoint_minutes, self.keep_checkpoints)

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["objective"] = self.objective.to_dict()
        for how_it_runs in ("overwrite", "record_seen", "resume", "workers"):  # not what the conversion is
            record.pop(how_it_runs)
        return record


@dataclass
class ConversionResult:
    """What a conversion did; its records are in ``out`` (certify_zoo.json)."""
    out: Path  # the output folder
    steps: int  # optimiser steps taken
    images_seen: int  # training images read, over every process and pass
    skipped_images: int  # unreadable images skipped (reads)
    seconds: float  # converting, the self-check not included
    final_agreement: float  # the student's top-1 agreement with the base on its last clean training images


def planned_steps(steps_per_epoch: int, epochs: int, max_steps: int | None, min_steps: int = 0) -> tuple[int, int]:
    """(optimiser steps, passes over the data) of a conversion: ``epochs`` passes, as many more as reach
    ``min_steps`` steps, or with ``max_steps`` exactly that many steps, the data repeated or cut short as needed
    (``--max_train_steps`` in Accelerate's examples and ``max_steps`` in transformers' Trainer override the epochs
    the same way): a 20-step run on 11 images at batch 4 takes 20 steps over 7 passes, not the 3 steps of one pass."""
    steps_per_epoch = max(1, steps_per_epoch)
    if max_steps is None:
        epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
        return steps_per_epoch * epochs, epochs
    return max_steps, math.ceil(max_steps / steps_per_epoch)


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}


def require_type(name: str, value: Any, annotation: str) -> None:
    """One line where a setting's value is not of its declared type ("int | None", "float | str"); annotations
    of other types (nested settings) are not checked. A bool is no number here, though Python counts it one."""
    kinds = [kind.strip() for kind in str(annotation).split("|")]
    if not all(kind in _TYPES for kind in kinds):
        return
    allowed = tuple(t for kind in kinds for t in _TYPES[kind])
    if isinstance(value, allowed) and not (isinstance(value, bool) and "bool" not in kinds):
        return
    wanted = " or ".join({"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                          "None": "unset"}[kind] for kind in kinds)
    raise CertifyZooError(f"{name} must be {wanted}, got {value!r} (a recipe file's value?)")


def unreadable_line(position: RunPosition) -> str:
    """The line after a conversion that skipped unreadable images: each file once, and the reads when the passes
    over the data read them again (the count had been of reads, beside each file named once)."""
    return skipped_unreadable(position.unreadable_files, position.skipped_images,
                              more=len(position.unreadable_files) >= UNREADABLE_NAMES_KEPT)


def raised_passes_note(recipe_epochs: int, epochs: int, steps_per_epoch: int, min_steps: int) -> str | None:
    """A line before a conversion whose recipe's passes were raised to reach ``min_steps`` steps, else None."""
    if epochs <= recipe_epochs:
        return None
    steps_per_epoch = max(1, steps_per_epoch)
    recipe_steps = recipe_epochs * steps_per_epoch
    return (f"the recipe's {counted(recipe_epochs, 'pass')} over this data would be "
            f"{counted(recipe_steps, 'step')}, fewer than --min-steps {min_steps}: {epochs} "
            f"passes, {epochs * steps_per_epoch} steps (--epochs takes passes as given)")


def short_run_warning(total_steps: int, steps_per_epoch: int, epochs: int, max_steps: int | None) -> str | None:
    """A line before a conversion whose epochs (not --max-steps, which is a choice of steps) give fewer steps than the
    study's models needed, with the --epochs that gives enough."""
    if max_steps is not None or total_steps >= MIN_STEPS:
        return None
    passes = math.ceil(MIN_STEPS / max(1, steps_per_epoch))
    return (f"{counted(total_steps, 'step')} ({counted(epochs, 'pass')} over the data): the gamma study's "
            f"BatchNorm networks ended less accurate and less certified after 280 steps than after {MIN_STEPS} "
            f"(docs: gamma study); --epochs {passes} gives {passes * max(1, steps_per_epoch)} steps")


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


def build_optimizer(model: torch.nn.Module, settings: ConvertSettings) -> torch.optim.Optimizer:
    groups = _parameter_groups(model, settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)


# rho and agreement: the gamma controller's last check on the held-out images (what its floor reads); batch agreement:
# the clean half of the recent training batches (what the collapse guard reads), near 100% while the held-out one falls
CONVERT_PROGRESS_FIELDS = (("loss", ".4f"), ("fidelity", ".4f"), ("penalty", ".4g"), ("gamma", ".4g"),
                           ("rho", ".2f"), ("agreement", ".1%"), ("batch_agreement", ".1%"), ("lr", ".4g"))
HELD_OUT_FIELDS = ("rho", "agreement")  # shown only where the controller measures them (--gamma auto)


# what conversion_settings takes besides MODEL, OUT, DATA and the recipe: every field of the two settings classes
SETTING_NAMES = tuple(sorted(({f.name for f in dataclasses.fields(ConvertSettings)}
                              - {"model", "data", "out", "objective", "recipe"})
                             | {f.name for f in dataclasses.fields(ObjectiveSettings)}))


def conversion_settings(model: str, out: str, data: str | None = None, recipe: str = AUTO,
                        revision: str | None = None, **options) -> tuple[RecipeChoice, ConvertSettings]:
    """What ``certify-zoo convert`` runs with: MODEL's recipe (chosen from its architecture unless ``recipe`` names
    one), then every option that is not None; checked before any weights are read. ``data`` None streams
    ImageNet-1k's training split from the Hub. A name outside SETTING_NAMES is refused (it would be ignored)."""
    require_known_settings("convert", options, SETTING_NAMES)
    local_model_spec(model)  # a missing folder says so before a recipe is guessed from its name
    choice = choose_recipe(model, recipe, revision)
    settings = ConvertSettings.from_recipe(load_recipe(choice.spec, options.get("sigma")), model=model,
                                           data=data or DEFAULT_DATA, out=str(out), revision=revision, **options)
    settings.validate()
    return choice, settings


def convert(settings: ConvertSettings, console=None, log_interval: int | None = None) -> ConversionResult:
    """Fine-tune a student copy of MODEL on DATA with the Boot Camp objective and save it to OUT.

    Checkpoints go to OUT/checkpoints (see checkpoints.py); with ``settings.resume`` the run continues from the
    newest valid one. SIGINT/SIGTERM save a checkpoint and raise ConversionInterrupted (exit code 3).
    Progress goes to ``console``: a live bar on a terminal, else a line every ``log_interval`` steps (default: ~5%, and
    at least once a minute).
    ``settings.deterministic``: only deterministic kernels throughout (guards.deterministic_algorithms).
    """
    settings.validate()
    with deterministic_algorithms(settings.deterministic), OutputLock() as output_lock:
        return _convert(settings, console, log_interval, output_lock)


def _convert(settings: ConvertSettings, console, log_interval: int | None,
             output_lock: OutputLock) -> ConversionResult:
    run = _open_run(settings, console, output_lock)
    if isinstance(run, ConversionResult):  # finished before, with these settings: nothing to do
        return run
    main_console = console if run.accelerator.is_main_process else None
    progress = RunProgress("convert", run.plan.total_steps, main_console,
                           fields=[field for field in CONVERT_PROGRESS_FIELDS
                                   if run.plan.auto_gamma or field[0] not in HELD_OUT_FIELDS],
                           interval=log_interval, completed=run.position.step, images=run.position.images_seen)
    with (progress, StopSignals() as signals, out_of_memory(CONVERT_MEMORY_ADVICE),
          dataloader_workers_died(CONVERT_WORKER_ADVICE)):
        _train(run, progress, signals)
        return _finish(run, signals)


@dataclass
class _Run:
    """One conversion between its start and its save: what the loop, the gamma checks and the end share."""
    settings: ConvertSettings
    accelerator: Any
    say: Callable[..., None]
    out: Path
    store: CheckpointStore
    student: torch.nn.Module  # prepared by Accelerate (DDP-wrapped on several processes)
    base: torch.nn.Module
    num_classes: int
    optimizer: torch.optim.Optimizer
    loader: Any
    data: Loader
    checked: CheckImages | None  # None: the held-out images are a slice of the conversion data
    holdout: torch.Tensor | None
    base_answers: BaseAnswers | None  # the frozen base's answers on ``holdout``: what every check compares to
    bn_mode: str
    batch_statistics: bool
    stochastic: dict[str, int]
    frozen_statistics: FrozenRunningStatistics | None
    check_shard: Shard
    plan: ConversionPlan
    controller: GammaController
    median_clip: MedianNormClip | None
    position: RunPosition  # where the run stands: step 0, or the newest valid checkpoint
    resumed_at: int
    recent_agreement: deque
    started: float
    seen: list[int] = field(default_factory=list)
    last_good: LastGoodState | None = None  # in memory only: a resumed run rolls back to its first good check at most

    def checkpoint(self) -> Path:
        """Save the run's state now: weights, optimiser, random states, controller, clip statistics, position."""
        self.position.recent_agreement = list(self.recent_agreement)
        self.position.gamma_controller = self.controller.state_dict()
        self.position.clip_state = self.median_clip.state_dict() if self.median_clip is not None else {}
        self.position.seconds = time.perf_counter() - self.started
        self.position.generator_state = generator_state(self.loader)
        return self.store.save(self.position, self.student)


def _open_run(settings: ConvertSettings, console, output_lock: OutputLock) -> _Run | ConversionResult:
    """Load the model and the data, refuse what cannot run, claim OUT and restore the newest checkpoint: the run
    ready for its first step, or the result of a run that had finished already."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(mixed_precision=settings.precision, gradient_accumulation_steps=settings.grad_accum)
    say = console.print if (console is not None and accelerator.is_main_process) else (lambda *a, **k: None)
    out = Path(settings.out).expanduser()
    store = CheckpointStore(accelerator, out, settings.checkpoint_policy(), say)
    store.lock(output_lock)  # one run at a time writes OUT
    if not (settings.resume or settings.overwrite):
        store.refuse_new_run()  # fail fast, before any download, changing nothing
    set_seed(settings.seed)

    with alike_on_every_process():  # a model every process fails to load: one line, not one per process
        student = load_classifier(settings.model, settings.revision, settings.trust_remote_code, console=console
                                  if accelerator.is_main_process else None)
    base = copy.deepcopy(student).eval().requires_grad_(False)
    num_classes = student.num_classes  # read before accelerate wraps the student
    # the loader counts micro-batches: --max-steps N with --grad-accum A reads N x A of them
    max_batches = settings.max_steps * settings.grad_accum if settings.max_steps else None
    with alike_on_every_process():  # data every process reads alike: one line under torchrun, not one per process
        data = conversion_loader(settings.data, student.transform(), settings.batch_size, settings.seed,
                                 settings.image_column, max_batches,
                                 holdout=0 if settings.check_data else settings.check_images, workers=settings.workers)
        checked = (check_images(settings.check_data, student.transform(), settings.check_images, settings.seed,
                                settings.image_column, trained_files=data.files, trained_stream=data.spec)
                   if settings.check_data and settings.check_images else None)
        held_out = checked.images if checked is not None else data.holdout
        bn_mode = resolve_bn_mode(settings.bn_mode, student, data.num_images, settings.batch_size)
        batch_statistics = uses_batch_statistics(bn_mode, student, settings.batch_size, held_out)
    say(escape(f"data {settings.data!r} -> {data.spec.describe()}"))
    if checked is not None and checked.left_out_trained:
        say(escape(f"--check-data {settings.check_data}: {checked.left_out_trained} of its images are conversion "
                   "data too; the check draws only from the others (it needs images the conversion never sees)"))
    # model and data are valid: only now may an old folder be replaced (--overwrite) or a run be resumed
    finished = store.begin({**settings.to_record(), "processes": accelerator.num_processes}, settings.resume,
                           settings.overwrite)
    if finished:
        return ConversionResult(out, finished.get("steps", 0), finished.get("images_seen", 0),
                                finished.get("skipped_images", 0), finished.get("seconds", 0.0),
                                _or_nan(finished.get("final_agreement_with_base")))
    stochastic = stochastic_layers(student)
    if bn_mode == "train" and batch_norms(student):
        say("[bold yellow]WARNING: --bn-mode train: every forward of the conversion, noisy and finite-difference ones "
            "included, moves BatchNorm's running statistics away from what the model sees at test time (a real "
            "ImageNet model lost its top-1 on most photos in two steps). Prefer eval (default) or recompute.[/]")
    frozen_statistics = FrozenRunningStatistics(student) if bn_mode == "recompute" else None
    optimizer = build_optimizer(student, settings)
    student, optimizer, loader = accelerator.prepare(student, optimizer, data.loader)  # a stream passes through
    base = base.to(accelerator.device)
    holdout = held_out.to(accelerator.device) if held_out is not None else None
    plan = plan_conversion(settings, len(loader), accelerator.num_processes, num_classes, holdout is not None)
    # AdamW's step does not grow with the loss: past the point where the penalty is most of it, the controller
    # raises the lr instead of gamma (smoothness.GammaController)
    controller = GammaController(plan.gamma_start, agreement_floor=settings.agreement_floor,
                                 steers_lr=settings.optimizer == "adamw" and settings.max_lr_scale > 1,
                                 max_lr_scale=settings.max_lr_scale)
    base_answers = None
    if holdout is not None:
        with torch.no_grad():
            base_answers = BaseAnswers.of(torch.cat([base(chunk) for chunk in holdout.split(settings.batch_size)]))
    _say_plan(say, settings, plan, controller, out=out, images=data.num_images, accelerator=accelerator,
              held_out=holdout, base_answers=base_answers, stochastic=stochastic, bn_mode=bn_mode,
              num_classes=num_classes)

    position = store.restore()
    if position.gamma_controller:
        controller.load_state_dict(position.gamma_controller)
    median_clip = MedianNormClip(settings.clip_grad_median_multiple) if settings.clip_grad_median_multiple else None
    if median_clip is not None and position.clip_state:
        median_clip.load_state_dict(position.clip_state)
    return _Run(settings=settings, accelerator=accelerator, say=say, out=out, store=store, student=student, base=base,
                num_classes=num_classes, optimizer=optimizer, loader=loader, data=data, checked=checked,
                holdout=holdout, base_answers=base_answers, bn_mode=bn_mode, batch_statistics=batch_statistics,
                stochastic=stochastic, frozen_statistics=frozen_statistics, check_shard=check_shard_of(accelerator),
                plan=plan, controller=controller, median_clip=median_clip, position=position,
                resumed_at=position.step,
                recent_agreement=deque(position.recent_agreement, maxlen=collapse_window(plan.total_steps)),
                started=time.perf_counter() - position.seconds)


def _train(run: _Run, progress: RunProgress, signals: StopSignals) -> None:
    """The steps left to take, epoch by epoch: the plain loop of accelerate's examples."""
    position, total_steps = run.position, run.plan.total_steps
    while position.epoch < run.plan.epochs and position.step < total_steps:
        set_conversion_mode(run.student, run.bn_mode)
        for batch, layout in lockstep(run.store.epoch_batches(run.loader, position), run.accelerator):
            if position.step >= total_steps:
                break
            position.batches_in_epoch += 1
            position.micro_steps += 1
            if _no_step_on(run, batch, layout):
                continue
            _step(run, batch, layout, progress, signals)
        require_readable_images(position.images_seen, position.skipped_images, run.settings.data, finished=True)
        if position.step < total_steps:
            position.next_epoch()


def _no_step_on(run: _Run, batch, layout) -> bool:
    """Count a batch's unreadable images; True when no step can be taken on it (nothing readable on some process, or
    one image where BatchNorm needs batch statistics)."""
    position = run.position
    stop_if_strict(batch, run.settings.strict)
    position.skipped_images += layout.skipped
    if layout.skipped:  # every process knows it: each process's names, gathered on all of them
        position.note_unreadable(gather_per_process(list(batch.unreadable), run.accelerator))
    require_readable_images(position.images_seen, position.skipped_images, run.settings.data, finished=False)
    if layout.any_empty:  # all processes skip together, or DDP's all-reduce would wait forever
        return True
    if run.batch_statistics and layout.smallest < 2:  # the epoch's last batch held a single image
        run.say(f"skipped a step of {counted(layout.global_size, 'image')} in which a process had a single image: "
                "BatchNorm on batch statistics (--bn-mode recompute or train) cannot normalise one image")
        return True
    return False


def _step(run: _Run, batch, layout, progress: RunProgress, signals: StopSignals) -> None:
    """One micro-batch of the objective; on an optimiser step's last micro-batch, the step's bookkeeping too: gamma
    checks, progress, the collapse guard, checkpoints and stop signals."""
    settings, position, plan, controller = run.settings, run.position, run.plan, run.controller
    student, optimizer, total_steps = run.student, run.optimizer, plan.total_steps
    if settings.record_seen:
        run.seen.extend(batch.indices.tolist())
    # noise and projections keyed by position in the global batch: independent of the process count
    draws = keyed_draws(settings.seed, position.micro_steps, layout.offset, layout.global_size, batch.images.shape,
                        run.num_classes, settings.objective, run.accelerator.device)
    if plan.auto_gamma and position.step % plan.check_every == 0 and not _measured_at(controller, position.step):
        run.last_good = _steer_gamma(controller, student, optimizer, run.base_answers, run.holdout,
                                     settings.objective.sigma, settings.seed, position.step, run.last_good,
                                     update=warmup_factor(position.step, total_steps, settings.warmup) >= 1.0,
                                     lr=learning_rate(position.step, total_steps, settings), shard=run.check_shard)
        _say_restoration(run.say, controller, run.num_classes)
    gamma_full = effective_gamma(controller.gamma, run.num_classes)
    ramp = warmup_factor(position.step, total_steps, settings.warmup)
    with run.accelerator.accumulate(student):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(position.step, total_steps, settings) * plan.lr_factor * controller.lr_scale
        # lazy penalty (--penalty-every k): built on every k-th optimiser step with k times the weight
        every = settings.objective.penalty_every
        weight = lazy_weight(gamma_full * ramp, every) if penalty_due(position.step, every) else 0.0
        with run.accelerator.autocast():
            parts = boot_camp_step(student, run.base, batch.images, settings.objective, weight, draws,
                                   run.accelerator.backward)
        require_finite_loss(parts.loss, position.step + 1)  # before the step: no NaN reaches the weights
        if run.median_clip is not None and run.accelerator.sync_gradients:
            run.median_clip(student.parameters(), parts.with_penalty, run.accelerator.clip_grad_norm_)
        if settings.clip_grad_norm > 0 and run.accelerator.sync_gradients:
            run.accelerator.clip_grad_norm_(student.parameters(), fixed_clip_threshold(
                settings.clip_grad_norm, every, parts.with_penalty))
        optimizer.step()
        optimizer.zero_grad()
    position.images_seen += layout.global_size
    if run.accelerator.sync_gradients:
        position.step += 1
        _record_step(run, parts, gamma_full * ramp, ramp, progress)
        save_now, stop_now = run.store.due(position.step, signals.requested is not None)
        if save_now and position.step < total_steps:  # a stop request is a save request too (store.due)
            saved = run.checkpoint()
            if stop_now:
                raise ConversionInterrupted(
                    f"stopped by {signals.requested or 'a signal to another process'} at step {position.step} of "
                    f"{total_steps}; checkpoint saved in {saved}: rerun the same command with --resume to continue")


def _record_step(run: _Run, parts, gamma: float, ramp: float, progress: RunProgress) -> None:
    """A step's numbers, averaged over the processes: the controller's loss history, the progress line, and the
    collapse guard's agreement window (warned once per run)."""
    position, accelerator, recent_agreement = run.position, run.accelerator, run.recent_agreement
    agreement = accelerator.gather(parts.agreement.mean().reshape(1)).float().mean().item()
    if not math.isnan(agreement):
        recent_agreement.append(agreement)
    mean_agreement = _mean_or_nan(recent_agreement)
    step_losses = torch.stack([parts.loss.detach(), parts.fidelity.mean()]).float().reshape(1, 2)
    loss, fidelity_part = accelerator.gather(step_losses).mean(0).tolist()
    run.controller.record_step(loss, fidelity_part)
    progress.update(position.step, position.images_seen, loss=loss, fidelity=parts.fidelity.mean().item(),
                    penalty=parts.penalty.mean().item() if parts.with_penalty else float("nan"),
                    gamma=gamma, rho=_last_check(run.controller, "rho_quantile"),
                    agreement=_last_check(run.controller, "agreement"), batch_agreement=mean_agreement,
                    lr=run.optimizer.param_groups[0]["lr"])
    if (not position.collapse_warned and ramp >= 1.0 and len(recent_agreement) == recent_agreement.maxlen
            and mean_agreement < run.settings.collapse_threshold):
        position.collapse_warned = True
        run.say(f"[bold red]WARNING: the student agrees with the base on only {mean_agreement:.0%} of clean images "
                f"at step {position.step}: the penalty is collapsing it. Lower --gamma or --lr.[/]")


def _finish(run: _Run, signals: StopSignals) -> ConversionResult:
    """After the last step: the final gamma check, BatchNorm statistics, the self-check, then the save of weights,
    records and card by the main process."""
    settings, position, controller, plan, say = run.settings, run.position, run.controller, run.plan, run.say
    accelerator, loader, holdout, out = run.accelerator, run.loader, run.holdout, run.out
    if plan.auto_gamma and not _measured_at(controller, position.step):
        # the last interval is checked too: a student that breached the floor after the last check goes back
        _steer_gamma(controller, run.student, run.optimizer, run.base_answers, holdout, settings.objective.sigma,
                     settings.seed, position.step, run.last_good, update=False, final=True, shard=run.check_shard)
        _say_restoration(say, controller, run.num_classes)
    # The end (BatchNorm statistics, self-check, save) has no step boundary to stop at and takes minutes at
    # ImageNet sizes on a CPU: the trained state is saved first (when checkpoints are on and a resume did not
    # just load it), and a signal now stops at once, pointing at it, instead of being held for a boundary that
    # never comes (SLURM's SIGKILL followed, and the steps since the last periodic checkpoint were lost).
    if run.store.restored is not None and position.step == run.resumed_at:
        final_checkpoint = run.store.restored  # a resumed run whose steps were all done: the end only
        # BatchNorm statistics draw what the uninterrupted run drew: from its last epoch (a stream's order
        # follows the epoch), with its generator
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(position.epoch)
        set_generator_state(loader, position.generator_state)
    else:
        final_checkpoint = run.checkpoint() if run.store.policy.every_steps or run.store.policy.every_minutes else None
    signals.raise_at_once(lambda name: _stopped_at_the_end(name, final_checkpoint))
    seconds = time.perf_counter() - run.started
    final_agreement = _mean_or_nan(run.recent_agreement)
    seen_per_process = gather_seen(run.seen, accelerator) if settings.record_seen else None
    unwrapped = accelerator.unwrap_model(run.student)
    recomputed = None
    if run.frozen_statistics is not None:
        recomputed = run.frozen_statistics.recompute(unwrapped, _clean_batches(loader, RECOMPUTE_BATCHES), accelerator)
    unwrapped.eval()
    check, check_started = None, time.perf_counter()
    if holdout is not None:  # minutes on CPUs: every process takes its share
        check = self_check(unwrapped, run.base_answers, holdout, settings.objective.sigma, settings.seed,
                           source=FROM_CHECK_DATA if settings.check_data else FROM_CONVERSION_DATA,
                           report=lambda line: say(escape(line)), shard=run.check_shard)
    check_seconds = time.perf_counter() - check_started
    forwards = {"deterministic": True, "stochastic_layers_disabled": run.stochastic, "batch_norm": run.bn_mode,
                "batch_norm_setting": settings.bn_mode, "batch_norm_layers": len(batch_norms(unwrapped)),
                **({"batch_norm_recomputed_from_images": recomputed} if recomputed is not None else {})}
    with main_process_alone(accelerator) as main:  # the save
        if main:
            stalled = controller.stalled() if plan.auto_gamma else None
            undone = controller.undone() if plan.auto_gamma else None
            if check is not None:
                say(check.summary_line())
                for warning in check.warnings() + [text for text in (stalled, undone) if text]:
                    say(f"[bold red]WARNING: {warning}[/]")
            with disk_errors(f"the converted model to {out}", run.store.resume_advice()):
                unwrapped.save(out)
                try:  # certify_zoo.json marks a finished conversion: only with all of its files
                    write_json_atomic(out / METADATA_NAME, conversion_record(
                        settings, plan, unwrapped, position, controller, stalled=stalled, forwards=forwards,
                        held_out_images=0 if holdout is None else int(holdout.shape[0]), data_split=run.data.spec.split,
                        check_images_drawn=run.checked.drawn if run.checked is not None else None,
                        clipping=run.median_clip.summary() if run.median_clip is not None else None, check=check,
                        final_agreement=final_agreement,
                        device=str(accelerator.device), processes=accelerator.num_processes, seconds=seconds,
                        check_seconds=check_seconds))
                    if seen_per_process is not None:
                        write_json_atomic(out / SEEN_NAME, {"dataset_size": run.data.num_images,
                                                            "per_process": seen_per_process})
                    write_card(out)  # "not evaluated yet" until evaluate measures something
                except BaseException:  # --resume then runs the end again, which writes them
                    (out / METADATA_NAME).unlink(missing_ok=True)
                    raise
            run.store.finish()
            say(f"saved {out} ({counted(position.step, 'step')}, {position.images_seen} images seen, "
                f"{position.skipped_images} unreadable skipped, {seconds:.1f}s converting"
                + (f" + {check_seconds:.1f}s self-check" if check is not None else "") + ", "
                + (f"agreement with base on its last clean training images {final_agreement:.1%})"
                   if math.isfinite(final_agreement) else
                   "no clean image to measure agreement with the base: --noise-prob 1 noised them all)"))
            if position.skipped_images:
                say(escape(unreadable_line(position)))
    return ConversionResult(out, position.step, position.images_seen, position.skipped_images, seconds, final_agreement)


@dataclass(frozen=True)
class ConversionPlan:
    """The run's shape, fixed once its data and its processes are known."""
    steps_per_epoch: int  # optimiser steps in one pass over the data
    total_steps: int
    epochs: int  # passes begun over the data (raised to reach --min-steps)
    global_batch: int  # images per optimiser step, all processes together
    lr_factor: float  # the lr scaling rule's factor at that batch (a factor, so that --lr 0 needs no division)
    peak_lr: float
    auto_gamma: bool  # the rho controller steers gamma (False: --gamma N, or no held-out image to measure rho on)
    gamma_start: float  # gamma at 1000 classes where the run starts
    check_every: int  # steps between the controller's measurements


def plan_conversion(settings: ConvertSettings, batches_per_epoch: int, processes: int, num_classes: int,
                    held_out: bool) -> ConversionPlan:
    """Steps, passes, batch and lr scaling, and how gamma is chosen, from the settings and the run's counts."""
    global_batch = processes * settings.batch_size * settings.grad_accum
    lr_factor = scaled_learning_rate(1.0, global_batch, settings.reference_batch, settings.lr_scaling)
    steps_per_epoch = batches_per_epoch // settings.grad_accum
    total_steps, epochs = planned_steps(steps_per_epoch, settings.epochs, settings.max_steps, settings.min_steps)
    auto = settings.objective.gamma == AUTO
    # the controller starts low and climbs by doubling, but a start too high does its harm before the first check can
    # lower it. The harm follows the effective weight, whatever the class count: an effective 0.05 flattened a real
    # 1000-class EfficientNet-Lite2 within 20 steps and 0.2 cost a 10-class BatchNorm CNN its agreement with the
    # base, while 0.0005 kept both (8 seeds of the first). So gamma_start is the effective weight (scaled by C/1000
    # as --gamma, one start had been 100 times higher at 1000 classes than at 10); the controller counts at 1000.
    start = stated_gamma(settings.gamma_start, num_classes) if auto else float(settings.objective.gamma)
    return ConversionPlan(steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs=epochs,
                          global_batch=global_batch, lr_factor=lr_factor, peak_lr=settings.lr * lr_factor,
                          auto_gamma=auto and held_out, gamma_start=start,
                          check_every=controller_check_every(total_steps))


def conversion_record(settings: ConvertSettings, plan: ConversionPlan, model, position, controller: GammaController,
                      *, stalled: str | None, forwards: dict[str, Any], held_out_images: int, data_split: str | None,
                      check_images_drawn: int | None, clipping: dict | None, check,
                      final_agreement: float, device: str, processes: int, seconds: float,
                      check_seconds: float) -> dict[str, Any]:
    """certify_zoo.json: what was converted, how, and what the conversion measured (gamma's trajectory, the
    self-check and its calibration, which every later certificate reads)."""
    num_classes = model.num_classes
    return {
        "schema_version": SCHEMA_VERSION,
        "certify_zoo_version": __version__,
        "method": "adversarial-boot-camp",
        "paper": "arXiv:2010.02508",
        "base_model": settings.model,
        "sigma": settings.objective.sigma,
        "num_classes": num_classes,
        "input_size": list(model.input_size),
        "data": settings.data,
        "data_split": data_split,  # the split of a datasets source it read (None: a folder of images)
        "steps": position.step,
        "epochs_run": position.epoch + 1,  # passes begun over the data (--max-steps may repeat it)
        "images_seen": position.images_seen,
        "skipped_images": position.skipped_images,
        "unreadable_files": position.unreadable_files,  # each file once, over every pass and process
        "source_library": model.source,
        "settings": settings.to_record(),
        "effective_gamma": effective_gamma(controller.gamma, num_classes),
        "gamma": {"mode": AUTO if plan.auto_gamma else "fixed", "final": controller.gamma,
                  "stated_at_classes": 1000, "effective_final": effective_gamma(controller.gamma, num_classes),
                  **({"controller": controller.settings(), "start_effective": settings.gamma_start,
                      "check_every_steps": plan.check_every,
                      "trajectory": controller.history, "stalled": stalled,
                      "restorations": controller.restorations(),
                      # the last check went back to step 0: the output is the base
                      "undone_entirely": controller.undone_entirely()}
                     if plan.auto_gamma else {})},
        "conversion_forwards": forwards,
        "held_out_images": held_out_images,
        **({"check_images_drawn": check_images_drawn} if check_images_drawn is not None else {}),
        **({"clipping": clipping} if clipping is not None else {}),
        **({"self_check": check.to_record(), "calibration": check.calibration()} if check else
           {"calibration": without_held_out_images()}),
        "final_agreement_with_base": final_agreement if math.isfinite(final_agreement) else None,
        "collapse_warning": position.collapse_warned,
        "hardware": {"device": device, "processes": processes, "platform": platform.platform(),
                     "torch": torch.__version__},
        "scale_out": {"processes": processes, "global_batch": plan.global_batch, "peak_lr": plan.peak_lr,
                      "lr_min": settings.lr_min * plan.lr_factor},
        "seconds": round(seconds, 2),
        "self_check_seconds": round(check_seconds, 2),
    }


def _say_plan(say, settings: ConvertSettings, plan: ConversionPlan, controller: GammaController, *, out: Path,
              images: int | None, accelerator, held_out: torch.Tensor | None, base_answers: BaseAnswers | None,
              stochastic: dict[str, int], bn_mode: str, num_classes: int) -> None:
    """What the run will do, said before its first step: data, steps, gamma, forwards, lr; and what may spoil it."""
    image_count = images if images is not None else "unknown number of"
    say(f"[bold]convert[/] {settings.model} -> {out}  ({image_count} images, {counted(plan.total_steps, 'step')} "
        f"over {counted(plan.epochs, 'pass')}, {counted(accelerator.num_processes, 'process')} on "
        f"{accelerator.device}, recipe {settings.recipe})")
    one_process = one_process_of_several_note(accelerator)
    if one_process:
        say(f"[yellow]{one_process}[/]")
    short_run = short_run_warning(plan.total_steps, plan.steps_per_epoch, plan.epochs, settings.max_steps)
    raised = None if settings.max_steps else raised_passes_note(settings.epochs, plan.epochs, plan.steps_per_epoch,
                                                                 settings.min_steps)
    for line in (short_run, raised):
        if line:
            say(f"[yellow]{line}[/]")
    if settings.objective.gamma == AUTO and held_out is None:  # the start value stays, and the record says so
        why = "--check-images 0" if settings.check_images == 0 else "the data has fewer than 2 readable images"
        say(f"[yellow]no held-out image could be set aside ({why}): gamma stays at {plan.gamma_start:.4g} at 1000 "
            f"classes ({settings.gamma_start:.4g} effective), no self-check runs, and no deterministic radius will be "
            "reported, only Monte-Carlo[/]")
    if held_out is not None and held_out.shape[0] < MIN_CALIBRATION_IMAGES:  # said now, not after the whole run
        say(f"[yellow]{too_few_to_calibrate(held_out.shape[0], MIN_CALIBRATION_IMAGES)}: this conversion will report "
            "no deterministic radius, only Monte-Carlo; --check-data with more unseen images calibrates one[/]")
    if base_answers is not None:
        # a class-ordered source (a stream's first rows) gives a slice of one class; images unlike the base's data
        # give near-ties, which any fine-tuning changes
        near_ties = base_answers.near_tie_warning(settings.agreement_floor) if plan.auto_gamma else None
        for warning in (one_class_warning(top_class_share(base_answers.top1), held_out.shape[0], num_classes),
                        near_ties):
            if warning:
                say(f"[yellow]{warning}[/]")
    gamma_text = (f"gamma auto (controller from {plan.gamma_start:g} at 1000 classes = "
                  f"{effective_gamma(plan.gamma_start, num_classes):.4g} effective; target: 99th percentile of "
                  f"rho <= {controller.target:g} on {count_held_out(0 if held_out is None else held_out.shape[0])} and "
                  "points near them)" if plan.auto_gamma else
                  f"gamma {controller.gamma:g} at 1000 classes = {effective_gamma(controller.gamma, num_classes):.4g} "
                  "effective")
    objective = settings.objective
    say(f"sigma {objective.sigma} (pixel L2), {gamma_text}, reps {objective.reps}, h {objective.h}, "
        f"estimator {objective.estimator}"
        + (f" ({counted(objective.probes, 'probe')})" if objective.estimator != "paper" else ""))
    disabled = ", ".join(f"{v} {k}" for k, v in stochastic.items()) or "none in this model"
    say(f"forwards deterministic: dropout / drop-path off ({disabled}), "
        f"BatchNorm {bn_mode}" + (" (auto)" if settings.bn_mode == "auto" else ""))
    say(f"{settings.optimizer} lr {plan.peak_lr:.4g} for a global batch of {plan.global_batch} "
        f"({accelerator.num_processes} x {settings.batch_size} x {settings.grad_accum} accumulation; recipe lr "
        f"{settings.lr:.4g} at {settings.reference_batch or plan.global_batch}, {settings.lr_scaling} scaling)")


def _stopped_at_the_end(signal_name: str, final_checkpoint: Path | None) -> CertifyZooError:
    """The error a signal raises after the last step: resumable from the final checkpoint, or not (checkpoints off)."""
    if final_checkpoint is not None:
        return ConversionInterrupted(f"stopped by {signal_name} after the last step, before the model was saved; "
                                     f"checkpoint saved in {final_checkpoint}: rerun the same command with --resume to "
                                     "finish (the self-check and the save run again)")
    return StoppedWithNothingKept(f"stopped by {signal_name} after the last step, before the model was saved; "
                                  "checkpoints are off (--checkpoint-minutes 0, no --checkpoint-every), so nothing "
                                  "was kept: convert again")


def collapse_window(total_steps: int) -> int:
    """Steps whose training-batch agreement the collapse guard averages: 20, or a fifth of a shorter run (at least 3).
    A fixed 20 never filled on a 20-step run, so a student that fell to 8% agreement with the base went unwarned."""
    return min(COLLAPSE_WINDOW, max(3, math.ceil(total_steps / 5)))


def controller_check_every(total_steps: int) -> int:
    """Steps between two rho measurements of the gamma controller: ~20 a run, but at least MIN_STEPS_BETWEEN_CHECKS
    apart: the student needs steps to answer a new weight, and a short run checked every step doubled gamma faster
    than rho could follow."""
    return max(MIN_STEPS_BETWEEN_CHECKS, total_steps // 20)


def _measured_at(controller: GammaController, step: int) -> bool:
    return bool(controller.history) and controller.history[-1]["step"] == step


def _last_check(controller: GammaController, key: str) -> float:
    """A number of the controller's last check (nan before the first)."""
    return controller.history[-1][key] if controller.history else float("nan")


def _steer_gamma(controller: GammaController, student, optimizer, base: BaseAnswers, holdout: torch.Tensor,
                 sigma: float, seed: int, step: int, last_good: LastGoodState | None, update: bool,
                 final: bool = False, lr: float | None = None, shard: Shard = ALONE) -> LastGoodState | None:
    """rho on the held-out images and at points near them (smoothness.probe_points), the student's agreement with the
    base's top-1 on the clean ones (``base``: measured once per conversion); the controller
    moves gamma once warm-up is over. After warm-up, a student below the agreement floor goes back to ``last_good``
    (at the ``final`` check too), and one above it becomes the new last good state, which is returned. Every process
    ends with the same numbers (same weights, same images, same keyed neighbours; each measures its ``shard`` of the
    gradients and the parts are summed), so gamma and the restorations stay identical everywhere without a
    broadcast."""
    generator = torch.Generator(device=holdout.device).manual_seed(draw_key(seed, step, 0x6A4D))
    model = getattr(student, "module", student)  # no DDP hooks: this forward trains nothing
    with running_statistics_kept(model):  # a measurement: with --bn-mode train its forwards would move them
        values = rho_at_probe_points(model, holdout, sigma, generator, shard)
        with torch.no_grad():
            agreement = base.agreement(model(holdout))
    if controller.observe(step, values, agreement, update, last_good.step if last_good else None, final, lr):
        last_good.restore(model, optimizer)
        return last_good
    # only states the controller made count as good: a dip while warm-up ramps gamma and lr up is the ramp's (the
    # demo's agreement falls to ~0.75 there and recovers), and going back into the ramp would undo its progress
    if update and controller.meets_floor(agreement):
        return LastGoodState(step, model, optimizer)
    return last_good


def check_shard_of(accelerator) -> Shard:
    """This process's share of the conversion's checks (the gamma controller's rho gradients, the self-check's rho and
    PGD): each of N processes measures every N-th chunk, and an all-reduce sums the parts, so a check costs each
    process 1/N of it instead of all of it. The sum waits as long as one process's share of the self-check on CPUs
    can take (distributed.sum_waiting_long)."""
    total = sum_waiting_long(accelerator)
    return ALONE if total is None else Shard(accelerator.process_index, accelerator.num_processes, total)


def _say_restoration(say, controller: GammaController, num_classes: int) -> None:
    """One line when the last check sent the student back to an earlier state."""
    check = controller.history[-1] if controller.history else {}
    if "restored_to_step" in check:
        say(f"[yellow]step {check['step']}: the student agrees with the base on {check['agreement']:.1%} of the "
            f"held-out images (floor {controller.agreement_floor:.0%}): back to its state at step "
            f"{check['restored_to_step']}" + ("" if check.get("final") else
                                              f", gamma capped at {effective_gamma(check['gamma'], num_classes):.4g}"
                                              " effective") + "[/]")


def _mean_or_nan(values) -> float:
    """Their mean; nan while there are none (no clean image seen: --noise-prob 1 noises them all, nothing to agree
    on)."""
    return sum(values) / len(values) if values else math.nan


def _or_nan(value: float | None) -> float:
    """A recorded number, nan where the record holds none (no clean image was measured)."""
    return math.nan if value is None else float(value)


def _clean_batches(loader, limit: int):
    """Up to ``limit`` batches of clean conversion images (for BatchNorm statistics)."""
    for count, batch in enumerate(loader):
        if count >= limit:
            break
        if batch.images.shape[0] > 1:  # batch statistics of one image fail where a feature map is 1 x 1
            yield batch.images
