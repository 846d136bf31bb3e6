"""The certify-zoo command line: parse, call the library, print.

Streams, as the Hugging Face tools have them: results (tables, JSON, a path, a URL) on stdout; logs, progress and
errors on stderr. So ``evaluate ... --json > record.json`` holds the record only and ``2> run.log`` keeps the log.
Every error is one line on stderr and a non-zero exit; a wrong command line (an unknown choice, a missing option)
fails while it is parsed, before any model or data is touched.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from . import __version__
from .certificate_names import MIN_CALIBRATION_IMAGES
from .errors import (CertifyZooError, RecordsNotWritten, alike_on_every_process, disk_errors, is_main_process,
                     os_error_line)
from .progress import log_console as progress_log_console
from .security import redact
from .wording import counted


# ---------------------------------------------------------------- choices (str Enums: their values are plain strings)

class Estimator(str, Enum):
    paper = "paper"
    jl = "jl"


class ProbeDistribution(str, Enum):
    gaussian = "gaussian"
    rademacher = "rademacher"


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class LrScaling(str, Enum):
    linear = "linear"
    sqrt = "sqrt"
    none = "none"


class BnMode(str, Enum):
    auto = "auto"
    eval = "eval"
    recompute = "recompute"
    train = "train"


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class Method(str, Enum):
    deterministic = "deterministic"
    monte_carlo = "monte-carlo"
    all = "all"


class PredictMethod(str, Enum):
    deterministic = "deterministic"
    monte_carlo = "monte-carlo"


class Audit(str, Enum):
    pgd = "pgd"
    none = "none"


def _value(choice: Optional[Enum]) -> Optional[str]:
    """The plain string that settings and records hold."""
    return None if choice is None else choice.value


def parse_gamma(value: str | float) -> float | str:
    """--gamma: a number >= 0, or `auto` (the recipe chooses it for the model)."""
    if isinstance(value, (float, int)) or value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither a number nor 'auto'") from None
    if not number >= 0:
        raise typer.BadParameter(f"{value!r} must be >= 0 (or 'auto')")
    return number


# ---------------------------------------------------------------- the app: one-line errors, --debug anywhere

_state = {"debug": False}
DEBUG_HELP = "Show full tracebacks on errors (also after the command name, or CERTIFY_ZOO_DEBUG=1)."
# click's exceptions: click's own, or the copy that newer Typer releases vendor
_click_errors = importlib.import_module(typer.BadParameter.__module__)


def _debugging() -> bool:
    return _state["debug"] or os.environ.get("CERTIFY_ZOO_DEBUG", "").lower() not in ("", "0", "false", "no")


def debug_first(args: list[str]) -> list[str]:
    """`certify-zoo convert ... --debug` means `certify-zoo --debug convert ...` (no command has its own --debug)."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug", *[a for a in args[:end] if a != "--debug"], *args[end:]]


def tolerant_stdout() -> None:
    """A character stdout's encoding lacks (PYTHONIOENCODING=ascii, a latin-1 locale, a Windows code page; a file
    name's undecodable bytes under a UTF-8 locale) is written as an escape, \\xf6, as Python's stderr writes it,
    instead of failing: `info` of a folder named cönv ended in UnicodeEncodeError, and so did `convert --help`,
    where rich cut a word with '…'."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


class OneLineErrors(TyperGroup):
    """Click's usage errors (a bad choice, a missing option) as one line on stderr and exit 2, like every other
    error of certify-zoo, instead of a usage block and a boxed panel; and --debug anywhere on the line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = debug_first(list(sys.argv[1:] if args is None else args))
        tolerant_stdout()
        if not standalone_mode:  # a caller that handles exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except getattr(_click_errors, "NoArgsIsHelpError", ()) as exc:  # the help is already printed
            sys.exit(exc.exit_code)
        except _click_errors.ClickException as exc:
            log_console.print(f"Error: {usage_error_line(exc)}", markup=False, highlight=False)
            sys.exit(exc.exit_code)
        except (typer.Abort, getattr(_click_errors, "Abort", typer.Abort)):
            log_console.print("Aborted.", markup=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def usage_error_line(exc) -> str:
    """Click's message on one line, with where to find the right usage."""
    message = " ".join(redact(exc.format_message()).split()).replace(": Value error, ", ": ")  # Typer's wording
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see `{ctx.command_path} -h`)" if ctx is not None else message


app = typer.Typer(cls=OneLineErrors, add_completion=True, pretty_exceptions_enable=False, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode="rich",
                  help="Turn a pretrained image classifier into a certifiably robust one (Adversarial Boot Camp, "
                       "arXiv 2010.02508), certify it, and publish it.")
# Results: piped output has no terminal width to respect, so the certification tables get room to stay whole.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160, emoji=False)
# Logs, progress and errors: never wrapped, so that a log line stays one line in a file.
log_console = progress_log_console()


def _print_version(value: bool) -> None:
    if value:
        print(f"certify-zoo {__version__}")
        raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
         version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    _state["debug"] = debug


def friendly_errors(command):
    """Turn a CertifyZooError (or anything unexpected) into one line on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CertifyZooError as exc:
            if _debugging():
                raise
            if exc.raised_by_every_process and not is_main_process():  # the main process prints it
                from .distributed import wait_for_the_main_process_to_say_the_error

                wait_for_the_main_process_to_say_the_error(MAIN_PROCESS_GRACE_SECONDS)
                raise typer.Exit(exc.exit_code)
            log_console.print(f"[bold red]Error:[/] {escape(redact(str(exc)))}", markup=True, highlight=False)
            if exc.raised_by_every_process and "torch" in sys.modules:  # no process group without torch
                from .distributed import main_process_said_the_error

                main_process_said_the_error()
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            log_console.print("[bold red]Interrupted.[/]")
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug or an environment problem: still one line unless --debug
            if _debugging():
                raise
            died = _worker_death(exc)
            if died:  # outside the loops' guard: torch's SIGCHLD check raises wherever the main process is
                log_console.print(f"[bold red]Error:[/] {escape(died)}; what the run kept stays: --resume continues "
                                  "it", highlight=False)
                raise typer.Exit(CertifyZooError.exit_code)
            said = os_error_line(exc) if isinstance(exc, OSError) else None
            if said:  # the user's files, wherever they were read or written: what it is and what to do
                log_console.print(f"[bold red]Error:[/] {escape(redact(said))}", highlight=False)
                raise typer.Exit(CertifyZooError.exit_code)
            message = str(exc).splitlines()[0] if str(exc) else ""
            log_console.print(f"[bold red]Error:[/] {type(exc).__name__}: {escape(redact(message))} "
                              "(rerun with --debug for details)", highlight=False)
            raise typer.Exit(1)

    return wrapper


def _worker_death(exc: Exception) -> str | None:
    """guards.said_worker_death, where torch is loaded (no DataLoader worker without it)."""
    if "torch" not in sys.modules:
        return None
    from .guards import said_worker_death

    return said_worker_death(exc)


def _print_json(data: Any) -> None:
    """A JSON document on stdout and nothing else there (tokens scrubbed, as in every record written)."""
    from .security import scrub

    sys.stdout.write(json.dumps(scrub(data), indent=2) + "\n")


MAIN_PROCESS_GRACE_SECONDS = 30.0


MC_SAMPLES_TORCHRUN = ("Under torchrun spell it --mc-samples: torchrun reads --n as an ambiguous abbreviation of its "
                       "own options and stops.")
MC_SAMPLES_HELP = "Monte-Carlo estimation samples. " + MC_SAMPLES_TORCHRUN


def parse_radii(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise CertifyZooError(f"--radii must be comma-separated numbers, got {text!r}") from exc


IMAGENET_TRAIN_IMAGES = 1_281_167  # rows of ILSVRC/imagenet-1k's train split


def default_data_notice(batch_size: int, grad_accum: int, epochs: int, max_steps: Optional[int],
                        processes: int, min_steps: int = 0) -> str:
    """What `convert` without --data is about to do, said before it starts (the same count as the loop's:
    each process drops its last incomplete batch of the stream)."""
    from .conversion import planned_steps
    from .data_sources import DEFAULT_CHECK_DATA, DEFAULT_DATA

    global_batch = processes * batch_size * grad_accum
    steps, epochs = planned_steps(IMAGENET_TRAIN_IMAGES // processes // batch_size // grad_accum, epochs, max_steps,
                                  min_steps)
    return (f"no --data: streaming ImageNet-1k's train split from the Hub ({DEFAULT_DATA}; gated: accept its terms "
            f"on the Hub and set HF_TOKEN), {IMAGENET_TRAIN_IMAGES:,} images: {steps:,} steps of {global_batch:,} "
            f"images ({counted(epochs, 'epoch')}{', set by --max-steps' if max_steps is not None else ''}). "
            f"Its calibration's held-out images: the first of the unlabelled test split ({DEFAULT_CHECK_DATA}). "
            "Pass --data DIR to convert on your own images.")


WORKERS_HELP = ("Processes that decode images, per process (0: the process decodes them itself; the batches are "
                "the same either way). Default: this machine's cores shared among its processes, less one for each, "
                "at most 8.")


# ---------------------------------------------------------------- convert

DATA, OBJECTIVE, OPTIMISER, CHECKPOINTS, HUB, MODEL, LOGGING = (
    "Data", "Objective", "Optimiser and schedule", "Output and checkpoints", "Hub", "Model", "Logging")
FROM_RECIPE = "Default: from the recipe."
LOG_INTERVAL_HELP = ("When stderr is not a terminal (a log file, SLURM, CI): print a progress line every N {unit} "
                     "(default: about every 5% of the run, and at least once a minute). On a terminal a live bar is "
                     "shown instead.")


@app.command(rich_help_panel="Convert and certify")
@friendly_errors
def convert(
    model: str = typer.Argument(..., metavar="MODEL",
                                help="Local folder (timm or transformers), timm name (timm/convnext_base), or Hub repo "
                                     "(hf-hub:ORG/NAME, ORG/NAME)."),
    recipe: str = typer.Option("auto", "--recipe", help="auto (chosen from the model's architecture), a recipe "
                                                       "name (`certify-zoo recipes`) or a TOML file of your own.",
                               rich_help_panel=MODEL),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model.", rich_help_panel=MODEL),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", rich_help_panel=MODEL,
                                           help="Allow a transformers repo to run its own Python code."),
    data: Optional[str] = typer.Option(None, "--data", rich_help_panel=DATA,
                                       help="Folder of images (any depth, labels ignored), hf:ORG/NAME[:SPLIT], "
                                            "parquet/arrow files[:SPLIT], or 'demo'. Default: ImageNet-1k train, "
                                            "streamed (gated: needs HF_TOKEN)."),
    image_column: Optional[str] = typer.Option(None, help="Image column of a datasets source (default: detected).",
                                               rich_help_panel=DATA),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image instead of skipping it.",
                                rich_help_panel=DATA),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP, rich_help_panel=DATA),
    sigma: Optional[float] = typer.Option(None, help=f"Noise std in [0,1] pixel space. {FROM_RECIPE}",
                                          rich_help_panel=OBJECTIVE),
    gamma: Optional[str] = typer.Option(None, parser=parse_gamma, metavar="FLOAT|auto", rich_help_panel=OBJECTIVE,
                                        help="Penalty weight, pixel space, stated at 1000 classes (scaled by C/1000; "
                                             f"the reference code's gamma 1 = 0.05), or auto. {FROM_RECIPE}"),
    check_images: Optional[int] = typer.Option(None, rich_help_panel=OBJECTIVE,
                                               help="Conversion images set aside (at most a tenth) for the gamma "
                                                    "controller and the final self-check and calibration; below "
                                                    f"{MIN_CALIBRATION_IMAGES} no deterministic radius is reported. "
                                                    f"{FROM_RECIPE}"),
    check_data: Optional[str] = typer.Option(None, rich_help_panel=OBJECTIVE, metavar="SOURCE",
                                             help="Take those --check-images from here instead (a folder or a "
                                                  "datasets source, its validation split by default; labels not "
                                                  "read; all the conversion data then trains): images the base did "
                                                  "not train on (evaluate leaves them out of the same source). The "
                                                  "conversion data are often the base's own training images, which "
                                                  "it is surer of than of unseen ones: a calibration measured on "
                                                  "them can promise more than holds elsewhere. Default: a slice of "
                                                  "the conversion data; without --data, ImageNet-1k's unlabelled "
                                                  "test split."),
    agreement_floor: Optional[float] = typer.Option(None, rich_help_panel=OBJECTIVE,
                                                    help="--gamma auto: whenever the student's top-1 agreement "
                                                         "with the base on the held-out images falls below this, go "
                                                         "back to the last check that met it and cap gamma at half "
                                                         "the weight that breached (accuracy first). Higher keeps "
                                                         "clean accuracy nearer the base's but may leave the model "
                                                         "too rough for a "
                                                         "deterministic radius (kappa 0: only Monte-Carlo stands); "
                                                         "see docs, gamma study. Default: 0.85."),
    max_lr_scale: Optional[float] = typer.Option(None, rich_help_panel=OBJECTIVE,
                                                 help="--gamma auto with AdamW (whose step does not grow with "
                                                      "gamma): while the held-out images are rougher than the "
                                                      "target and the penalty is at least half the loss, the "
                                                      "controller raises the learning rate instead of gamma, up to "
                                                      "this factor on the schedule (1: gamma only). Default: 32."),
    penalty_every: Optional[int] = typer.Option(None, rich_help_panel=OBJECTIVE,
                                                help="Lazy penalty: built every K-th step with K times its weight, the "
                                                     f"fidelity every step (1: every step). {FROM_RECIPE}"),
    penalty_share: Optional[float] = typer.Option(None, rich_help_panel=OBJECTIVE,
                                                  help="Share of a penalty step's images that carry the penalty "
                                                       "(at least one; jl only), its mean over them standing for the "
                                                       f"batch's; the fidelity on every image (1: all). {FROM_RECIPE}"),
    reps: Optional[int] = typer.Option(None, help=f"Johnson-Lindenstrauss repetitions of the penalty (the paper: 6). "
                                                  f"{FROM_RECIPE}", rich_help_panel=OBJECTIVE),
    estimator: Optional[Estimator] = typer.Option(None, rich_help_panel=OBJECTIVE,
                                                  help="Penalty estimator: paper (all reps terms, as the paper) or "
                                                       "jl (only --probes of the paper's terms, scaled to reps: the "
                                                       "same expected penalty, noisier, cheaper; costs measured in "
                                                       f"the docs' benchmarks). {FROM_RECIPE}"),
    probes: Optional[int] = typer.Option(None, rich_help_panel=OBJECTIVE,
                                         help="Terms drawn per step by --estimator jl, 1..reps (cost vs variance; "
                                              f"the penalty's scale stays reps). {FROM_RECIPE}"),
    probe_distribution: Optional[ProbeDistribution] = typer.Option(
        None, rich_help_panel=OBJECTIVE, help="The w of --estimator jl: gaussian (the paper's) or rademacher "
                                              f"(+-1/sqrt(C): same expected penalty, lower variance). {FROM_RECIPE}"),
    h: Optional[float] = typer.Option(None, "--fd-step", "--h", rich_help_panel=OBJECTIVE,
                                      help=f"Finite-difference step of the penalty, in pixels. {FROM_RECIPE}"),
    noise_prob: Optional[float] = typer.Option(None, help=f"Fraction of each batch that gets noise. {FROM_RECIPE}",
                                               rich_help_panel=OBJECTIVE),
    bn_mode: Optional[BnMode] = typer.Option(None, rich_help_panel=OBJECTIVE,
                                             help="BatchNorm during conversion: eval (frozen with the base's "
                                                  "statistics), recompute (batch statistics, running statistics "
                                                  "re-estimated on clean images at the end), auto (recompute with "
                                                  "at least 1,000 images in batches of 16 or more, else eval) or "
                                                  f"train (the paper's; moves the statistics; legacy). {FROM_RECIPE}"),
    epochs: Optional[int] = typer.Option(None, help="Passes over the data, taken as given. Default: the recipe's, "
                                                    "raised on small data to reach --min-steps steps.",
                                         rich_help_panel=OPTIMISER),
    min_steps: Optional[int] = typer.Option(None, rich_help_panel=OPTIMISER,
                                            help="Raise the recipe's passes over the data until the run has at least "
                                                 "this many steps (0: the recipe's passes; an explicit --epochs is "
                                                 "not raised). Default: 840, after which the gamma study's BatchNorm "
                                                 "networks kept their base's accuracy (docs: gamma study)."),
    max_steps: Optional[int] = typer.Option(None, help="Train for exactly this many optimiser steps, repeating the "
                                                       "data or stopping within it (overrides --epochs; the lr "
                                                       "schedule spans these steps).",
                                            rich_help_panel=OPTIMISER),
    batch_size: Optional[int] = typer.Option(None, help=f"Images per device per step. {FROM_RECIPE}",
                                             rich_help_panel=OPTIMISER),
    optimizer: Optional[Optimizer] = typer.Option(None, help=f"The optimiser. {FROM_RECIPE}",
                                                  rich_help_panel=OPTIMISER),
    lr: Optional[float] = typer.Option(None, rich_help_panel=OPTIMISER,
                                       help="Peak learning rate at --reference-batch (scaled to the global batch by "
                                            f"--lr-scaling), cosine to --lr-min. {FROM_RECIPE}"),
    lr_min: Optional[float] = typer.Option(None, help=f"Final learning rate at the reference batch. {FROM_RECIPE}",
                                           rich_help_panel=OPTIMISER),
    lr_scaling: Optional[LrScaling] = typer.Option(None, metavar="RULE", rich_help_panel=OPTIMISER,
                                                   help="How lr follows the global batch: linear, sqrt or none. "
                                                        f"{FROM_RECIPE}"),
    reference_batch: Optional[int] = typer.Option(None, help=f"Global batch at which --lr is stated. {FROM_RECIPE}",
                                                  rich_help_panel=OPTIMISER),
    weight_decay: Optional[float] = typer.Option(None, rich_help_panel=OPTIMISER,
                                                 help=f"Weight decay (not on biases and norm scales). {FROM_RECIPE}"),
    warmup: Optional[float] = typer.Option(None, rich_help_panel=OPTIMISER,
                                           help=f"Fraction of steps over which lr and gamma ramp up. {FROM_RECIPE}"),
    clip_grad_median_multiple: Optional[float] = typer.Option(
        None, rich_help_panel=OPTIMISER, help="Clip the weight gradient at this multiple of its running median norm, "
                                              f"penalty and fidelity-only steps apart (0: off). {FROM_RECIPE}"),
    clip_grad_norm: Optional[float] = typer.Option(None, rich_help_panel=OPTIMISER,
                                                   help=f"Clip the weight gradient's L2 norm per step (0: off); a "
                                                        f"lazy penalty step at K times it. {FROM_RECIPE}"),
    precision: Optional[Precision] = typer.Option(None, metavar="MODE", rich_help_panel=OPTIMISER,
                                                  help="Mixed precision: no, bf16 or fp16; the penalty's finite "
                                                       "difference needs float32, so bf16/fp16 are refused unless "
                                                       f"--gamma 0. {FROM_RECIPE}"),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps.", rich_help_panel=OPTIMISER),
    seed: int = typer.Option(0, help="Random seed.", rich_help_panel=OPTIMISER),
    deterministic: bool = typer.Option(False, "--deterministic", rich_help_panel=OPTIMISER,
                                       help="Only deterministic kernels (torch's deterministic algorithms), so "
                                            "that two runs of one seed on one GPU give the same weights (without "
                                            "it they differ slightly; the CPU is deterministic either way). A model "
                                            "with an op that has no deterministic kernel stops there, in one line "
                                            "naming it."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite or --resume).",
                             rich_help_panel=CHECKPOINTS),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel=CHECKPOINTS,
                                   help="Replace an existing output folder of an earlier conversion (never a folder "
                                        "certify-zoo did not make)."),
    resume: bool = typer.Option(False, "--resume", rich_help_panel=CHECKPOINTS,
                                help="Continue the run in --out from its newest valid checkpoint (a finished run is "
                                     "not redone)."),
    checkpoint_every: int = typer.Option(0, help="Save a checkpoint every N optimiser steps (0: off).",
                                         rich_help_panel=CHECKPOINTS),
    checkpoint_minutes: float = typer.Option(10.0, help="Save a checkpoint every M minutes (0: off).",
                                             rich_help_panel=CHECKPOINTS),
    keep_checkpoints: int = typer.Option(2, help="Checkpoints kept in OUT/checkpoints (older ones are deleted).",
                                         rich_help_panel=CHECKPOINTS),
    record_seen: bool = typer.Option(False, "--record-seen", rich_help_panel=CHECKPOINTS,
                                     help="Write seen_images.json: the dataset indices each process trained on "
                                          "(audits sharding; a stream's count its rows in the order the seed "
                                          "reads its files, held-out rows left out)."),
    push_to: Optional[str] = typer.Option(None, "--push-to", help="Then push the output to this Hub repo.",
                                          rich_help_panel=HUB),
    log_interval: Optional[int] = typer.Option(None, "--log-interval", min=1, rich_help_panel=LOGGING,
                                               help=LOG_INTERVAL_HELP.format(unit="steps")),
) -> None:
    """Fine-tune a student copy of MODEL without labels so that its own radii become meaningful.

    Prints the output folder on stdout when done; logs and progress go to stderr. Out of memory ends in one line
    naming the setting to change, and so does a DataLoader worker that died; a process the operating system's OOM
    killer ends (SIGKILL, exit 137) cannot report anything: its last checkpoint stays, --resume continues it
    (--estimator jl needs less memory).
    """
    from .conversion import conversion_settings, convert as run_convert

    with alike_on_every_process():  # the arguments' errors: one line, not one per process
        choice, settings = conversion_settings(model, str(out), data, recipe, revision, sigma=sigma, gamma=gamma,
                                               reps=reps, epochs=epochs, max_steps=max_steps, min_steps=min_steps,
                                               batch_size=batch_size, lr=lr, lr_min=lr_min,
                                               optimizer=_value(optimizer), weight_decay=weight_decay,
                                               lr_scaling=_value(lr_scaling), reference_batch=reference_batch, h=h,
                                               noise_prob=noise_prob, bn_mode=_value(bn_mode),
                                               estimator=_value(estimator), probes=probes,
                                               probe_distribution=_value(probe_distribution), warmup=warmup,
                                               clip_grad_norm=clip_grad_norm, precision=_value(precision),
                                               check_images=check_images, check_data=check_data,
                                               agreement_floor=agreement_floor, max_lr_scale=max_lr_scale,
                                               penalty_every=penalty_every, penalty_share=penalty_share,
                                               clip_grad_median_multiple=clip_grad_median_multiple,
                                               grad_accum=grad_accum, seed=seed, deterministic=deterministic,
                                               overwrite=overwrite, record_seen=record_seen, image_column=image_column,
                                               strict=strict, workers=workers, trust_remote_code=trust_remote_code,
                                               resume=resume, checkpoint_every=checkpoint_every,
                                               checkpoint_minutes=checkpoint_minutes,
                                               keep_checkpoints=keep_checkpoints)
    if is_main_process():
        log_console.print(escape(redact(choice.describe())))
        if data is None:
            log_console.print(default_data_notice(settings.batch_size, settings.grad_accum, settings.epochs,
                                                  settings.max_steps, int(os.environ.get("WORLD_SIZE", "1")),
                                                  settings.min_steps),
                              markup=False, highlight=False)
    result = run_convert(settings, console=log_console, log_interval=log_interval)
    if is_main_process():
        print(result.out)
        if push_to:
            _push_and_report(out, push_to)


# ---------------------------------------------------------------- recipes

recipes_app = typer.Typer(help="Conversion recipes per model family: list them, or show one.",
                          invoke_without_command=True, no_args_is_help=False)
app.add_typer(recipes_app, name="recipes", rich_help_panel="Convert and certify")


RECIPES_JSON_HELP = "Every recipe's keys as one JSON document."


@recipes_app.callback()
@friendly_errors
def recipes_default(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help=RECIPES_JSON_HELP)) -> None:
    """List the recipes, what each is for, and its main settings."""
    if ctx.invoked_subcommand is None:
        _print_recipes(as_json)


@recipes_app.command("list")
@friendly_errors
def recipes_list(as_json: bool = typer.Option(False, "--json", help=RECIPES_JSON_HELP)) -> None:
    """List the recipes, what each is for, and its main settings (as `certify-zoo recipes` alone does)."""
    _print_recipes(as_json)


def _print_recipes(as_json: bool) -> None:
    from rich.table import Table

    from .recipes import available_recipes, load_recipe

    recipes = [load_recipe(name) for name in available_recipes()]
    if as_json:
        _print_json(recipes)
        return
    table = Table(title="Recipes (certify-zoo recipes show NAME; convert --recipe NAME or --recipe FILE.toml)")
    table.add_column("name", no_wrap=True)
    for column in ("family", "sigma", "optimizer", "lr @ global batch", "batch/device"):
        table.add_column(column)
    for r in recipes:
        table.add_row(r["name"], r.get("description", "").split(":")[0],
                      ", ".join(map(str, r.get("sigma_choices", []))), r.get("optimizer", "sgd"),
                      f"{r['lr']:g} @ {r.get('reference_batch', r['batch_size'])} ({r.get('lr_scaling', 'none')})",
                      str(r["batch_size"]))
    console.print(table)


# what `recipes show` names as a recipe's penalty step (the rows of the study it prints)
PENALTY_STEP_KEYS = ("estimator", "probes", "probe_distribution", "penalty_every", "penalty_share", "clip_grad_norm",
                     "clip_grad_median_multiple")


@recipes_app.command("show")
@friendly_errors
def recipes_show(name: str = typer.Argument(..., metavar="NAME",
                                            help="Recipe name (see `certify-zoo recipes`) or TOML file.")) -> None:
    """Print one recipe file, with the reasons for its choices, and the measurements behind its penalty step."""
    from .recipes import recipe_text
    from .recipes.evidence import EVIDENCE_FILE, evidence_text, load_evidence

    console.print(recipe_text(name), markup=False, highlight=False, soft_wrap=True)
    evidence = load_evidence()
    if evidence is not None:
        from .recipes import load_recipe

        recipe = load_recipe(name)
        step = ", ".join(f"{key}={recipe[key]}" for key in PENALTY_STEP_KEYS if key in recipe)
        console.print(f"\n# Why this penalty step ({step}): {evidence['title']} ({EVIDENCE_FILE.name}, "
                      f"benchmarks/penalty_cost_study.py)\n", markup=False, highlight=False)
        console.print(evidence_text(evidence), markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- evaluate

@app.command(rich_help_panel="Convert and certify")
@friendly_errors
def evaluate(
    model: str = typer.Argument(..., metavar="MODEL",
                                help="A converted output folder, a timm/transformers folder, a timm name or a Hub "
                                     "repo."),
    data: Optional[str] = typer.Option(None, "--data", rich_help_panel=DATA,
                                       help="Labelled folder (one sub-folder per class), hf:ORG/NAME[:SPLIT], "
                                            "parquet/arrow files[:SPLIT], or 'demo' (the 8x8 digits 0-9, for models "
                                            "of those ten classes). Default: ImageNet-1k validation, streamed (gated: "
                                            "needs HF_TOKEN)."),
    image_column: Optional[str] = typer.Option(None, help="Image column of a datasets source (default: detected).",
                                               rich_help_panel=DATA),
    label_column: Optional[str] = typer.Option(None, help="Label column of a datasets source (default: detected).",
                                               rich_help_panel=DATA),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image instead of skipping it.",
                                rich_help_panel=DATA),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP, rich_help_panel=DATA),
    max_images: Optional[int] = typer.Option(None, help="Certify at most N images (after --subsample).",
                                             rich_help_panel=DATA),
    subsample: int = typer.Option(1, help="Certify every K-th image of the split (Cohen et al.: every 100th).",
                                  rich_help_panel=DATA),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", rich_help_panel=MODEL,
                                           help="Allow a transformers repo to run its own Python code."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model.", rich_help_panel=MODEL),
    sigma: Optional[float] = typer.Option(None, help="Noise std in [0,1] pixel space (default: the model's own)."),
    radii: str = typer.Option("0,0.25,0.5,0.75,1.0", help="Comma-separated L2 radii, ascending."),
    method: Optional[Method] = typer.Option(None, help="Certificates: deterministic (one forward pass per image), or "
                                                       "monte-carlo / all (the same two: Cohen et al.'s CERTIFY "
                                                       "beside the deterministic radius, which costs one forward and "
                                                       "is always reported). Default: deterministic for a model "
                                                       "certify-zoo converted (with a Monte-Carlo check on a "
                                                       "subsample), monte-carlo for any other."),
    audit: Optional[Audit] = typer.Option(None, rich_help_panel="Audit",
                                          help="pgd: attack correct images inside their claimed deterministic radius "
                                               "with L2 PGD and record counterexamples in audit.json (default: "
                                               "pgd, with a quick Monte-Carlo, on --check-images images for a model "
                                               "certify-zoo converted; none for any other)."),
    check_images: int = typer.Option(100, rich_help_panel="Audit",
                                     help="Images (a fixed pseudo-random subsample) that get the default audit and "
                                          "Monte-Carlo cross-check of a converted model (0: none)."),
    audit_steps: int = typer.Option(100, help="PGD steps per restart.", rich_help_panel="Audit"),
    audit_restarts: int = typer.Option(4, help="PGD restarts (the first from the clean image, others random).",
                                       rich_help_panel="Audit"),
    n0: int = typer.Option(100, "--n0", help="Monte-Carlo selection samples.", rich_help_panel="Monte-Carlo"),
    n: Optional[int] = typer.Option(None, "--mc-samples", "--n", rich_help_panel="Monte-Carlo",
                                    help="Monte-Carlo estimation samples (default: 10,000 with --method monte-carlo or "
                                         "all; 1,000 in the quick check of a converted model's subsample). "
                                         + MC_SAMPLES_TORCHRUN),
    alpha: float = typer.Option(0.001, help="Monte-Carlo failure probability.", rich_help_panel="Monte-Carlo"),
    mc_batch_size: Optional[int] = typer.Option(None, rich_help_panel="Monte-Carlo",
                                                help="Noisy images per Monte-Carlo forward (default: on a GPU "
                                                     "--batch-size at 224x224, proportionally more for smaller "
                                                     "images, at most 10,000; on a CPU as many as fit in 2 MiB "
                                                     "of input, 3 at 224x224)."),
    seed: int = typer.Option(0, help="Random seed for the noise."),
    deterministic: bool = typer.Option(False, "--deterministic",
                                       help="Only deterministic kernels (torch's deterministic algorithms), so "
                                            "that two runs on one GPU cannot differ by a kernel's order of "
                                            "summation (the CPU is deterministic either way). A model with an op "
                                            "that has no deterministic kernel stops there, in one line naming it."),
    batch_size: int = typer.Option(64, rich_help_panel="Speed",
                                   help="Images per batch, read, certified and attacked together (a GPU forwards the "
                                        "whole batch; a CPU in pieces: about 2 MiB of input per forward, 8 MiB per "
                                        "PGD forward and backward)."),
    compile_model: bool = typer.Option(False, "--compile", rich_help_panel="Speed",
                                       help="torch.compile the model first (a one-off compilation, seconds to "
                                            "minutes; then faster forwards on some architectures)."),
    channels_last: bool = typer.Option(False, "--channels-last", rich_help_panel="Speed",
                                       help="Store weights and images channels-last (NHWC), which many "
                                            "convolution kernels run faster."),
    as_json: bool = typer.Option(False, "--json", rich_help_panel="Output",
                                 help="Print the certification record as JSON on stdout (nothing else there)."),
    output: Optional[Path] = typer.Option(None, "--output", rich_help_panel="Output",
                                          help="Also write the certification record to this JSON file (for any "
                                               "MODEL, also a Hub repo or a timm name; never over a file "
                                               "certify-zoo did not write)."),
    out: Optional[Path] = typer.Option(None, "--out", rich_help_panel="Output",
                                       help="Write this run's records (certification.json, audit.json) into this "
                                            "folder (never over files of those names it did not write; an earlier "
                                            "run's move to evaluations/). Default: the model's folder when "
                                            "certify-zoo made it (it holds certify_zoo.json), else nowhere."),
    resume: bool = typer.Option(False, "--resume", rich_help_panel="Output",
                                help="Continue a stopped evaluation from the results it kept in its records folder "
                                     "(evaluate-partial/, written every 10 minutes and on Ctrl-C, SIGTERM or SIGHUP; a "
                                     "stream reads on from where it stood); the same command, with as many "
                                     "processes."),
    push_to: Optional[str] = typer.Option(None, "--push-to", rich_help_panel=HUB,
                                          help="Then push the model with its new records and card to this Hub repo."),
    log_interval: Optional[int] = typer.Option(None, "--log-interval", min=1, rich_help_panel=LOGGING,
                                               help=LOG_INTERVAL_HELP.format(unit="batches")),
) -> None:
    """Certify MODEL on labelled data; a local output gets certification.json, the plot and a regenerated card."""
    from .data_sources import DEFAULT_DATA
    from .evaluation import EvaluateSettings, evaluate as run_evaluate
    from .export import check_output_file, is_run_record
    from .hub import evaluation_folder

    if data is None and is_main_process():
        log_console.print(f"no --data: streaming ImageNet-1k's validation split from the Hub ({DEFAULT_DATA}; gated: "
                          "accept its terms on the Hub and set HF_TOKEN)", markup=False, highlight=False)
    chosen_audit = {"audit": audit.value} if audit is not None else {}  # else evaluate's default for this model
    with alike_on_every_process():  # before a Hub model is downloaded
        settings = EvaluateSettings(model=model, data=data or DEFAULT_DATA, sigma=sigma, radii=parse_radii(radii),
                                    method=_value(method), max_images=max_images, subsample=subsample,
                                    check_images=check_images,
                                    audit_steps=audit_steps, audit_restarts=audit_restarts, batch_size=batch_size,
                                    compile=compile_model, channels_last=channels_last, mc_batch_size=mc_batch_size,
                                    n0=n0, n=n, alpha=alpha, seed=seed, deterministic=deterministic,
                                    revision=revision,
                                    image_column=image_column, label_column=label_column, strict=strict,
                                    workers=workers, trust_remote_code=trust_remote_code,
                                    out=str(out) if out is not None else None, resume=resume, **chosen_audit)
        settings.validate()
        if output is not None:
            check_output_file(output, "--output", is_run_record)
    with evaluation_folder(model, revision, writable=push_to is not None,
                           trust_remote_code=trust_remote_code) as (folder, write):
        try:
            result = run_evaluate(dataclasses.replace(settings, model=folder, write=write), console=log_console,
                                  log_interval=log_interval)
        except RecordsNotWritten as exc:  # the records folder's disk is full: the numbers still reach the user
            _report_evaluation(exc.record, model, output, as_json)
            raise
        if not is_main_process():
            return
        _report_evaluation(result.record, model, output, as_json)
        if push_to:
            _push_and_report(Path(folder), push_to, url_on_stdout=not as_json)


def _report_evaluation(record: dict, model: str, output: Optional[Path], as_json: bool) -> None:
    """An evaluation's table (or json) to stdout, then its record to --output: a file that cannot be written loses no
    number."""
    from .export import write_json_atomic
    from .report import audit_lines, certification_table

    if as_json:
        _print_json(record)
    else:
        console.print(certification_table([record], [Path(model).name or model]))
        for line in audit_lines(record):
            console.print(line, highlight=False)
    if output is not None:
        with disk_errors(f"--output {output}", ", or name a file elsewhere (the numbers are printed)"):
            output.expanduser().parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(output.expanduser(), record)


# ---------------------------------------------------------------- Hub

def _push_and_report(folder: Path, repo_id: str, private: bool = False, revision: Optional[str] = None,
                     commit_message: Optional[str] = None, token: Optional[str] = None,
                     create_pr: bool = False, url_on_stdout: bool = True) -> None:
    """Push, then the repo's (or pull request's) URL: the result, on stdout unless stdout holds a JSON document."""
    from .hub import push as run_push

    result = run_push(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                      token=token, create_pr=create_pr)
    log_console.print(f"pushed {len(result.files)} files ({', '.join(result.files)}) in one "
                      f"{'pull request' if result.pr_url else 'commit'}", highlight=False)
    url = result.pr_url or result.url
    print(url) if url_on_stdout else log_console.print(url, markup=False, highlight=False)


def push_arguments(first: str, second: Path) -> tuple[str, Path, bool]:
    """(repo id, folder, old order?) of `push REPO_ID [FOLDER]`, the order of `hf upload`.

    The old order `push FOLDER REPO_ID` is recognised when FIRST is a certify-zoo output folder and SECOND is not
    a folder: no repo id can be both."""
    from .export import METADATA_NAME

    old_folder = Path(first).expanduser()
    if (old_folder / METADATA_NAME).is_file() and not second.expanduser().is_dir():
        return str(second), old_folder, True
    if (old_folder / METADATA_NAME).is_file() and second == Path(".") and not (second / METADATA_NAME).is_file():
        # `push OUT` alone: the folder is there, the repo id is missing (it would have pushed the current folder)
        raise CertifyZooError(f"{first} is a certify-zoo output folder, not a repo id: pass the repo first, "
                              f"`certify-zoo push NAMESPACE/NAME {shlex.quote(first)}`")
    return first, second, False


TOKEN_HELP = "Hub token (default: HF_TOKEN or the one saved by `hf auth login`). Never printed or written."


@app.command(rich_help_panel=HUB)
@friendly_errors
def push(
    repo_id: str = typer.Argument(..., metavar="REPO_ID", help="Hub repo id, NAMESPACE/NAME (created if needed)."),
    folder: Path = typer.Argument(Path("."), metavar="FOLDER",
                                  help="A certify-zoo output folder (convert's --out). Default: the current folder."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created if needed)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit message."),
    create_pr: bool = typer.Option(False, "--create-pr",
                                   help="Open a pull request against main instead of committing."),
    token: Optional[str] = typer.Option(None, "--token", help=TOKEN_HELP),
) -> None:
    """Publish an output folder to the Hub in one commit: weights, configs, records, plot and its model card.

    As `hf upload REPO_ID FOLDER`. Prints the repo's URL (or the pull request's) on stdout. A failed push leaves
    the local folder as it was.
    """
    repo_id, folder, old_order = push_arguments(repo_id, folder)
    if old_order:
        log_console.print(f"Note: `push FOLDER REPO_ID` is deprecated: use `certify-zoo push {repo_id} "
                          f"{shlex.quote(str(folder))}` "
                          "(the order of `hf upload`).", markup=False, highlight=False)
    _push_and_report(folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token,
                     create_pr=create_pr)


@app.command(rich_help_panel=HUB)
@friendly_errors
def download(
    repo_id: str = typer.Argument(..., metavar="REPO_ID", help="Hub repo id of a certified model, NAMESPACE/NAME."),
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", "--out",
                                             help="New or empty folder (default: the Hugging Face cache)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit."),
    token: Optional[str] = typer.Option(None, "--token", help=TOKEN_HELP),
) -> None:
    """Download a certified model (safetensors weights, configs, records, card; never pickles).

    Prints only the local folder, as `hf download` does: load it with certify_zoo.load(PATH) or
    timm.create_model('local-dir:PATH', pretrained=True).
    """
    from .hub import download as run_download

    print(run_download(repo_id, out=local_dir, revision=revision, token=token))


@app.command("list", rich_help_panel=HUB)
@friendly_errors
def list_models(
    search: Optional[str] = typer.Option(None, "--search", help="Text in the repo id."),
    architecture: Optional[str] = typer.Option(None, "--architecture", help="Architecture name (substring)."),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="Only models converted at this sigma."),
    sort: str = typer.Option("certified@0.5", "--sort", help="clean, downloads, sigma, certified@R (Monte-Carlo) "
                                                            "or deterministic@R."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many models from the Hub."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of a table."),
) -> None:
    """Published certified models (tag certify-zoo) with the numbers their cards carry ('-' when missing)."""
    from .zoo import list_certified, zoo_table

    entries = list_certified(search=search, architecture=architecture, sigma=sigma, sort=sort, limit=limit)
    if as_json:
        _print_json([entry.to_dict() for entry in entries])
    else:
        console.print(zoo_table(entries))


@app.command(rich_help_panel=HUB)
@friendly_errors
def info(
    model: str = typer.Argument(..., metavar="MODEL", help="A certify-zoo output folder or Hub repo id."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision."),
    as_json: bool = typer.Option(False, "--json", help="The model's records (certify_zoo.json, certification.json, "
                                                       "audit.json) as one JSON document."),
) -> None:
    """What a certified model is (base, conversion, gamma, calibration of the radius, certificates, audit), read from
    its records without weights."""
    from .card import as_reported
    from .export import CERTIFICATION_NAME, EVALUATIONS_DIR, METADATA_NAME
    from .report import certification_table
    from .zoo import info_lines, model_records

    metadata, certification, audit = model_records(model, revision)
    if not metadata and not certification:
        raise CertifyZooError(f"{model} has no certify-zoo records ({METADATA_NAME}, {CERTIFICATION_NAME})")
    if as_json:
        _print_json({"model": model, "metadata": metadata, "certification": certification, "audit": audit})
        return
    certification = as_reported(certification, metadata)  # raw radii of a calibrated model: the raw claim
    for line in info_lines(model, metadata, certification, audit):
        console.print(line, highlight=False)
    earlier = sorted(Path(model).expanduser().glob(f"{EVALUATIONS_DIR}/*/{CERTIFICATION_NAME}"))
    if earlier:  # a local folder's
        console.print(f"earlier evaluations: {len(earlier)}, their records in {earlier[0].parent.parent} (newest: "
                      f"{earlier[-1].parent.name})", markup=False, highlight=False)
    if certification:
        console.print(certification_table([certification], [Path(model).name or model]))


@app.command(rich_help_panel="Convert and certify")
@friendly_errors
def compare(
    models: list[str] = typer.Argument(..., metavar="MODELS", help="Output folders and/or Hub repo ids."),
    data: str = typer.Option(..., "--data", help="Labelled data, the same for every model."),
    sigma: Optional[float] = typer.Option(None, help="One sigma for all (default: each model's own)."),
    radii: str = typer.Option("0,0.25,0.5,0.75,1.0", help="Comma-separated L2 radii, ascending."),
    method: Method = typer.Option(Method.all, help="Certificates to compute."),
    max_images: Optional[int] = typer.Option(None, help="Certify only the first N images."),
    n0: int = typer.Option(100, "--n0", help="Monte-Carlo selection samples."),
    n: int = typer.Option(10_000, "--mc-samples", "--n", help=MC_SAMPLES_HELP),
    alpha: float = typer.Option(0.001, help="Monte-Carlo failure probability."),
    seed: int = typer.Option(0, help="Random seed for the noise (the same for every model)."),
    batch_size: int = typer.Option(64, help="Images per batch, read and certified together (Monte-Carlo noise is "
                                            "seeded per batch by its first image: records equal evaluate's at the "
                                            "same batch size)."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the comparison plot (PNG) to this file (never "
                                                             "over a file certify-zoo did not write)."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
) -> None:
    """Re-evaluate several models on the same data and radii: one table, and a plot with a curve per model."""
    from .export import check_output_file
    from .plot import is_certify_zoo_plot
    from .report import certification_table
    from .wording import numbered
    from .zoo import compare as run_compare, compare_plot, compared_names

    if plot is not None:
        check_output_file(plot, "--plot", is_certify_zoo_plot)
    records = run_compare(models, data, parse_radii(radii), method=method.value, sigma=sigma, max_images=max_images,
                          n0=n0, n=n, alpha=alpha, seed=seed, batch_size=batch_size, workers=workers,
                          console=log_console)
    names = compared_names(models)
    if as_json:
        _print_json(dict(zip(numbered(models), records)))  # a model given twice: "MODEL #2", not one key
    else:
        console.print(certification_table(records, names, title="Comparison: certified accuracy (%)"))
    if plot is not None:  # after the table: a plot that cannot be written loses no number
        with disk_errors(f"--plot {plot}", ", or name a file elsewhere (the table is printed)"):
            compare_plot(list(zip(names, records)), plot,
                         "deterministic" if method is Method.deterministic else "monte_carlo")
        log_console.print(f"plot: {plot}", markup=False, highlight=False)


@app.command(rich_help_panel="Convert and certify")
@friendly_errors
def predict(
    model: str = typer.Argument(..., metavar="MODEL",
                                help="A converted output folder, a timm folder, a timm name or a Hub repo (a published "
                                     "certified model brings its sigma and calibrated radius)."),
    images: list[str] = typer.Argument(..., metavar="IMAGES", help="Image files and/or folders of images."),
    top_k: int = typer.Option(5, "--top-k", help="Classes to show per image."),
    json_lines: bool = typer.Option(False, "--json", help="One json object per image instead of a table."),
    sigma: Optional[float] = typer.Option(None, help="Noise std for the radius (default: the model's own)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model."),
    method: PredictMethod = typer.Option(PredictMethod.deterministic, case_sensitive=False,
                                         help="deterministic: one forward pass, the calibrated radius; monte-carlo: "
                                              "the smoothed classifier's class (or abstain) and Cohen et al.'s "
                                              "CERTIFY radius, a proof with probability 1 - alpha, n noisy forwards "
                                              "per image (for a model whose deterministic radius was withdrawn)."),
    n: int = typer.Option(1_000, "--mc-samples", "--n", help="Monte-Carlo samples per image."),
    n0: int = typer.Option(100, "--n0", help="Monte-Carlo selection samples."),
    alpha: float = typer.Option(0.001, help="Monte-Carlo failure probability."),
    seed: int = typer.Option(0, help="Random seed of the Monte-Carlo noise."),
) -> None:
    """Classify images: class names, probabilities and the radius of each prediction (deterministic, or Monte-Carlo
    with --method monte-carlo)."""
    from .predict import PredictSettings, predict as run_predict
    from .report import prediction_table

    result = run_predict(PredictSettings(model=model, inputs=images, top_k=top_k, sigma=sigma, revision=revision,
                                         monte_carlo=method is PredictMethod.monte_carlo, n=n, n0=n0, alpha=alpha,
                                         seed=seed), console=log_console)
    for note in result.notes:
        log_console.print(f"[yellow]Note:[/] {note}", highlight=False)
    if json_lines:
        for row in result.rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    console.print(prediction_table(result))


@app.command(rich_help_panel="Convert and certify")
@friendly_errors
def demo(
    out: Path = typer.Option(Path("certify-zoo-demo"), "--out", help="Output folder."),
    n: int = typer.Option(2_000, "--mc-samples", "--n",
                          help="Monte-Carlo samples per image (evaluate's default is 10,000)."),
    seed: int = typer.Option(0, help="Random seed."),
    # kept for scripts that pass it: an earlier demo's folder is replaced without it, and no other folder with it
    overwrite: bool = typer.Option(False, "--overwrite", hidden=True,
                                   help="Not needed: an earlier demo's output folder is replaced without it."),
) -> None:
    """Fully offline: train a base on 8x8 digits, convert it, certify base and converted side by side."""
    from .demo import run_demo
    from .report import audit_lines, certification_table

    result = run_demo(out, overwrite=overwrite, n=n, seed=seed, console=log_console)
    console.print(certification_table([result.base_record, result.converted_record], ["base", "converted"],
                                      title="Demo: base vs converted, certified accuracy (%)"))
    for name, record in (("base", result.base_record), ("converted", result.converted_record)):
        for line in audit_lines(record):
            console.print(f"{name}: {line}", highlight=False)
    console.print(f"Converted model: {result.converted_dir}  (load with timm.create_model("
                  f"'local-dir:{result.converted_dir}', pretrained=True))")


@app.command(rich_help_panel="Help")
@friendly_errors
def env(as_json: bool = typer.Option(False, "--json", help="One JSON document instead of lines.")) -> None:
    """What a bug report needs: versions, devices, Accelerate's config, and the caches with the variables that move
    them (HF_HOME, HF_HUB_CACHE, CERTIFY_ZOO_CACHE, TORCH_HOME), the space left on their disks and whether they can
    be written. Offline."""
    from .environment import environment, environment_lines

    found = environment()
    if as_json:
        _print_json(found)
        return
    for line in environment_lines(found):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _unwrap_help_paragraphs(*typer_apps: typer.Typer) -> None:
    """Each paragraph of a command's docstring on one line, as the terminal wraps it: Typer keeps the source's line
    breaks after the first paragraph, which left ragged lines in --help."""
    for typer_app in typer_apps:
        for command in typer_app.registered_commands:
            doc = inspect.cleandoc(command.callback.__doc__ or "")
            command.callback.__doc__ = "\n\n".join(" ".join(paragraph.split()) for paragraph in doc.split("\n\n"))


_unwrap_help_paragraphs(app, recipes_app)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
