"""The certify-zoo command line: parse, call the library, print. Errors end in one line and a non-zero exit."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import CertifyZooError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Turn a pretrained image classifier into a certifiably robust one (Adversarial Boot Camp, "
                       "arXiv 2010.02508), certify it, and publish it.")
console = Console()
error_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def friendly_errors(command):
    """Turn a CertifyZooError (or anything unexpected) into one line on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CertifyZooError as exc:
            if _state["debug"]:
                raise
            error_console.print(f"[bold red]Error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            error_console.print("[bold red]Interrupted.[/]")
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug or an environment problem: still one line unless --debug
            if _state["debug"]:
                raise
            message = str(exc).splitlines()[0] if str(exc) else ""
            error_console.print(f"[bold red]Error:[/] {type(exc).__name__}: {message} (rerun with --debug for details)",
                                highlight=False)
            raise typer.Exit(1)

    return wrapper


def parse_radii(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise CertifyZooError(f"--radii must be comma-separated numbers, got {text!r}") from exc


@app.command()
@friendly_errors
def convert(
    model: str = typer.Argument(..., help="timm name (timm/convnext_base or convnext_base) or a local timm folder."),
    data: str = typer.Option(..., "--data", help="Folder of images (any depth, labels ignored) or 'demo'."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    recipe: str = typer.Option("generic", "--recipe", help="Settings file from certify_zoo/recipes/."),
    sigma: Optional[float] = typer.Option(None, help="Noise std in [0,1] pixel space (recipe: 0.25)."),
    gamma: Optional[float] = typer.Option(None, help="Penalty weight, pixel space, stated at 1000 classes "
                                                     "(scaled by C/1000; reference code's gamma 1 = 0.05)."),
    reps: Optional[int] = typer.Option(None, help="Johnson-Lindenstrauss repetitions of the penalty (paper: 6)."),
    estimator: Optional[str] = typer.Option(None, help="Penalty estimator: paper (all reps terms, bit-faithful) or "
                                                       "jl (only --probes of the paper's terms, scaled to reps: same "
                                                       "expected penalty, cheaper, noisier). Recipe default."),
    probes: Optional[int] = typer.Option(None, help="Terms drawn per step by --estimator jl (cost vs variance; "
                                                    "the penalty's scale stays reps). Default 2."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the data (default: 1)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimiser steps."),
    batch_size: Optional[int] = typer.Option(None, help="Images per device per step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (SGD momentum 0.9, cosine to lr_min)."),
    warmup: Optional[float] = typer.Option(None, help="Fraction of steps over which lr and gamma ramp up (0.1)."),
    precision: Optional[str] = typer.Option(None, help="no, bf16 or fp16."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps."),
    seed: int = typer.Option(0, help="Random seed."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Fine-tune a student copy of MODEL without labels for one epoch so that its own radii become meaningful."""
    from .convert import ConvertSettings, convert as run_convert
    from .recipes import load_recipe

    settings = ConvertSettings.from_recipe(load_recipe(recipe), model=model, data=data, out=str(out), sigma=sigma,
                                           gamma=gamma, reps=reps, estimator=estimator,
                                           probes=probes, epochs=epochs, max_steps=max_steps,
                                           batch_size=batch_size, lr=lr, warmup=warmup, precision=precision,
                                           grad_accum=grad_accum, seed=seed, revision=revision, overwrite=overwrite)
    settings.validate()
    run_convert(settings, console=console)


@app.command()
@friendly_errors
def evaluate(
    model: str = typer.Argument(..., help="A converted output folder, a timm folder or a timm name."),
    data: str = typer.Option(..., "--data", help="Labelled folder (one sub-folder per class) or 'demo'."),
    sigma: Optional[float] = typer.Option(None, help="Noise std in [0,1] pixel space (default: the model's own)."),
    radii: str = typer.Option("0,0.25,0.5,0.75,1.0", help="Comma-separated L2 radii, ascending."),
    method: str = typer.Option("deterministic", help="deterministic, monte-carlo or all."),
    max_images: Optional[int] = typer.Option(None, help="Certify only the first N images."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    n0: int = typer.Option(100, help="Monte-Carlo selection samples."),
    n: int = typer.Option(10_000, help="Monte-Carlo estimation samples."),
    alpha: float = typer.Option(0.001, help="Monte-Carlo failure probability."),
    seed: int = typer.Option(0, help="Random seed for the noise."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model."),
) -> None:
    """Certify MODEL on labelled data; write certification.json when MODEL is a local folder."""
    from .evaluate import EvaluateSettings, evaluate as run_evaluate
    from .report import certification_table

    settings = EvaluateSettings(model=model, data=data, sigma=sigma, radii=parse_radii(radii), method=method,
                                max_images=max_images, batch_size=batch_size, n0=n0, n=n, alpha=alpha, seed=seed,
                                revision=revision)
    settings.validate()
    result = run_evaluate(settings, console=console)
    console.print(certification_table([result.record], [Path(model).name or model]))


@app.command()
@friendly_errors
def demo(
    out: Path = typer.Option(Path("certify-zoo-demo"), "--out", help="Output folder."),
    n: int = typer.Option(2_000, help="Monte-Carlo samples per image (evaluate's default is 10,000)."),
    seed: int = typer.Option(0, help="Random seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Fully offline: train a base on 8x8 digits, convert it, certify base and converted side by side."""
    from .demo import run_demo
    from .report import certification_table

    result = run_demo(out, overwrite=overwrite, n=n, seed=seed, console=console)
    console.print(certification_table([result.base_record, result.converted_record], ["base", "converted"],
                                      title="Demo: base vs converted, certified accuracy (%)"))
    console.print(f"Converted model: {result.converted_dir}  (load with timm.create_model("
                  f"'local-dir:{result.converted_dir}', pretrained=True))")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
