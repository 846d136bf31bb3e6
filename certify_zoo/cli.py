"""The certify-zoo command line: parse, call the library, print. Errors end in one line and a non-zero exit."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import CertifyZooError
from .security import redact

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Turn a pretrained image classifier into a certifiably robust one (Adversarial Boot Camp, "
                       "arXiv 2010.02508), certify it, and publish it.")
# Piped output (logs, CI) has no terminal width to respect: give the certification tables room to stay whole.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
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
            error_console.print(f"[bold red]Error:[/] {escape(redact(str(exc)))}", markup=True, highlight=False)
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
            error_console.print(f"[bold red]Error:[/] {type(exc).__name__}: {escape(redact(message))} "
                                "(rerun with --debug for details)", highlight=False)
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
    model: str = typer.Argument(..., help="Local folder (timm or transformers), timm name (timm/convnext_base), "
                                          "or Hub repo (hf-hub:ORG/NAME, ORG/NAME)."),
    data: Optional[str] = typer.Option(None, "--data", help="Folder of images (any depth, labels ignored), "
                             "hf:ORG/NAME[:SPLIT], parquet/arrow files, or 'demo' (default: ImageNet-1k train, "
                             "streamed; gated: needs HF_TOKEN)."),
    image_column: Optional[str] = typer.Option(None, help="Image column of a datasets source (default: detected)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image instead of skipping it."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow a transformers repo to run its own Python code."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not exist unless --overwrite)."),
    recipe: str = typer.Option("auto", "--recipe", help="Recipe name (`certify-zoo recipes`), or auto: chosen "
                                                       "from the model's architecture."),
    sigma: Optional[float] = typer.Option(None, help="Noise std in [0,1] pixel space (recipe: 0.25)."),
    gamma: Optional[float] = typer.Option(None, help="Penalty weight, pixel space, stated at 1000 classes "
                                                     "(scaled by C/1000; reference code's gamma 1 = 0.05)."),
    reps: Optional[int] = typer.Option(None, help="Johnson-Lindenstrauss repetitions of the penalty (paper: 6)."),
    estimator: Optional[str] = typer.Option(None, help="Penalty estimator: paper (all reps terms, bit-faithful) or "
                                                       "jl (only --probes of the paper's terms, scaled to reps: same "
                                                       "expected penalty, noisier; backpropagated one graph at a "
                                                       "time: 1 probe ~2.4-3.1x a plain step's time, 1.3-1.5x its "
                                                       "memory). Recipe default."),
    probes: Optional[int] = typer.Option(None, help="Terms drawn per step by --estimator jl, 1..reps (cost vs "
                                                    "variance; the penalty's scale stays reps). Default 1."),
    probe_distribution: Optional[str] = typer.Option(None, help="The w of --estimator jl: gaussian (the paper's) "
                                                                "or rademacher (+-1/sqrt(C): same expected penalty, "
                                                                "lower variance)."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the data (default: 1)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimiser steps."),
    batch_size: Optional[int] = typer.Option(None, help="Images per device per step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate at the recipe's reference batch (scaled to "
                                                  "the global batch by its rule), cosine to lr_min."),
    lr_min: Optional[float] = typer.Option(None, help="Final learning rate at the reference batch."),
    optimizer: Optional[str] = typer.Option(None, help="sgd or adamw."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (not on biases and norm scales)."),
    lr_scaling: Optional[str] = typer.Option(None, help="How lr follows the global batch: linear, sqrt or none."),
    reference_batch: Optional[int] = typer.Option(None, help="Global batch at which --lr is stated."),
    h: Optional[float] = typer.Option(None, help="Finite-difference step of the penalty, in pixels (0.01)."),
    noise_prob: Optional[float] = typer.Option(None, help="Fraction of each batch that gets noise (0.5)."),
    bn_mode: Optional[str] = typer.Option(None, help="BatchNorm during conversion: train (paper) or eval."),
    warmup: Optional[float] = typer.Option(None, help="Fraction of steps over which lr and gamma ramp up (0.1)."),
    clip_grad_norm: Optional[float] = typer.Option(None, help="Clip the weight gradient's L2 norm per step (0: off, "
                                                              "the paper's and most recipes' choice)."),
    precision: Optional[str] = typer.Option(None, help="no, bf16 or fp16. The penalty's finite difference is "
                                                         "computed in float32 only: half precision is refused unless "
                                                         "--gamma 0."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps."),
    seed: int = typer.Option(0, help="Random seed."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest valid checkpoint "
                                                        "(a finished run is not redone)."),
    checkpoint_every: int = typer.Option(0, help="Save a checkpoint every N optimiser steps (0: off)."),
    checkpoint_minutes: float = typer.Option(10.0, help="Save a checkpoint every M minutes (0: off)."),
    keep_checkpoints: int = typer.Option(2, help="Checkpoints kept in OUT/checkpoints (older ones are deleted)."),
    record_seen: bool = typer.Option(False, "--record-seen", help="Write seen_images.json: the dataset indices "
                                                                  "each process trained on (audits sharding)."),
    push_to: Optional[str] = typer.Option(None, "--push-to", help="Then push the output to this Hub repo."),
) -> None:
    """Fine-tune a student copy of MODEL without labels for one epoch so that its own radii become meaningful.

    Out of memory ends in one line naming the setting to change. A process the operating system's OOM killer ends
    (SIGKILL, exit 137) cannot report anything: its last checkpoint stays; --resume continues it (--estimator jl
    needs less memory), a smaller --batch-size needs a new run (--overwrite).
    """
    from .convert import ConvertSettings, convert as run_convert
    from .data_sources import DEFAULT_DATA
    from .recipes import choose_recipe, load_recipe

    choice = choose_recipe(model, recipe)
    settings = ConvertSettings.from_recipe(load_recipe(choice.name, sigma), model=model, data=data or DEFAULT_DATA,
                                           out=str(out), sigma=sigma, gamma=gamma, reps=reps, epochs=epochs,
                                           max_steps=max_steps, batch_size=batch_size, lr=lr, lr_min=lr_min,
                                           optimizer=optimizer, weight_decay=weight_decay, lr_scaling=lr_scaling,
                                           reference_batch=reference_batch, h=h, noise_prob=noise_prob,
                                           bn_mode=bn_mode, estimator=estimator, probes=probes,
                                           probe_distribution=probe_distribution, warmup=warmup,
                                           clip_grad_norm=clip_grad_norm,
                                           precision=precision, grad_accum=grad_accum,
                                           seed=seed, revision=revision, overwrite=overwrite, record_seen=record_seen,
                                           image_column=image_column, strict=strict,
                                           trust_remote_code=trust_remote_code, resume=resume,
                                           checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes,
                                           keep_checkpoints=keep_checkpoints)
    settings.validate()
    if _is_main_process():
        console.print(escape(redact(choice.describe())))
    run_convert(settings, console=console)
    if push_to and _is_main_process():
        _push_and_report(out, push_to)


def _is_main_process() -> bool:
    """Under torchrun / accelerate launch only rank 0 prints (before Accelerate itself is started)."""
    import os

    return os.environ.get("RANK", "0") == "0"


recipes_app = typer.Typer(help="Conversion recipes per model family: list them, or show one.",
                          invoke_without_command=True, no_args_is_help=False)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
@friendly_errors
def recipes_list(ctx: typer.Context) -> None:
    """List the recipes, what each is for, and its main settings."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from .recipes import available_recipes, load_recipe

    table = Table(title="Recipes (certify-zoo recipes show NAME; convert --recipe NAME)")
    table.add_column("name", no_wrap=True)
    for column in ("family", "sigma", "optimizer", "lr @ global batch", "batch/device"):
        table.add_column(column)
    for name in available_recipes():
        r = load_recipe(name)
        table.add_row(name, r.get("description", "").split(":")[0], ", ".join(map(str, r.get("sigma_choices", []))),
                      r.get("optimizer", "sgd"), f"{r['lr']:g} @ {r.get('reference_batch', r['batch_size'])} "
                      f"({r.get('lr_scaling', 'none')})", str(r["batch_size"]))
    console.print(table)


@recipes_app.command("show")
@friendly_errors
def recipes_show(name: str = typer.Argument(..., help="Recipe name (see `certify-zoo recipes`).")) -> None:
    """Print one recipe file, with the reasons for its choices."""
    from .recipes import recipe_text

    console.print(recipe_text(name), markup=False, highlight=False, soft_wrap=True)


@app.command()
@friendly_errors
def evaluate(
    model: str = typer.Argument(..., help="A converted output folder, a timm/transformers folder, a timm name or a "
                                          "Hub repo."),
    data: Optional[str] = typer.Option(None, "--data", help="Labelled folder (one sub-folder per class), "
                             "hf:ORG/NAME[:SPLIT], parquet/arrow files, or 'demo' (default: ImageNet-1k validation)."),
    image_column: Optional[str] = typer.Option(None, help="Image column of a datasets source (default: detected)."),
    label_column: Optional[str] = typer.Option(None, help="Label column of a datasets source (default: detected)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image instead of skipping it."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow a transformers repo to run its own Python code."),
    sigma: Optional[float] = typer.Option(None, help="Noise std in [0,1] pixel space (default: the model's own)."),
    radii: str = typer.Option("0,0.25,0.5,0.75,1.0", help="Comma-separated L2 radii, ascending."),
    method: Optional[str] = typer.Option(None, help="deterministic, monte-carlo or all (default: deterministic for "
                                                    "a model certify-zoo converted, monte-carlo for any other)."),
    max_images: Optional[int] = typer.Option(None, help="Certify at most N images (after --subsample)."),
    subsample: int = typer.Option(1, help="Certify every K-th image of the split (Cohen et al.: every 100th)."),
    audit: str = typer.Option("none", help="pgd: attack every correct image inside its claimed deterministic "
                                           "radius with L2 PGD and record counterexamples in audit.json."),
    audit_steps: int = typer.Option(100, help="PGD steps per restart."),
    audit_restarts: int = typer.Option(4, help="PGD restarts (the first from the clean image, others random)."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model first (seconds to a minute "
                                                                "on a CPU; 1.9x / 1.3x / 1.0x inference speed "
                                                                "measured on a CPU ResNet / ConvNeXt / ViT, see "
                                                                "benchmarks/run.py --stack)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="NHWC weights (1.5x faster inference measured "
                                                                     "on a CPU ResNet, no gain on ConvNeXt or ViT)."),
    mc_batch_size: Optional[int] = typer.Option(None, help="Noisy images per Monte-Carlo forward (default: "
                                                           "--batch-size at 224x224, proportionally more for smaller "
                                                           "images, at most 10,000)."),
    n0: int = typer.Option(100, help="Monte-Carlo selection samples."),
    n: int = typer.Option(10_000, help="Monte-Carlo estimation samples."),
    alpha: float = typer.Option(0.001, help="Monte-Carlo failure probability."),
    seed: int = typer.Option(0, help="Random seed for the noise."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the records (certification.json, audit.json) into "
                                                           "this folder. Default: the model's folder when certify-zoo "
                                                           "made it (it holds certify_zoo.json), else nowhere."),
    push_to: Optional[str] = typer.Option(None, "--push-to", help="Then push the model with its new records and "
                                                                  "card to this Hub repo."),
) -> None:
    """Certify MODEL on labelled data; a certify-zoo output gets certification.json, the plot and a regenerated card."""
    from .data_sources import DEFAULT_DATA
    from .evaluate import EvaluateSettings, evaluate as run_evaluate
    from .hub import evaluation_folder
    from .report import audit_lines, certification_table

    with evaluation_folder(model, revision, writable=push_to is not None,
                           trust_remote_code=trust_remote_code) as (folder, write):
        settings = EvaluateSettings(model=folder, data=data or DEFAULT_DATA, sigma=sigma, radii=parse_radii(radii),
                                    method=method, max_images=max_images, subsample=subsample, audit=audit,
                                    audit_steps=audit_steps, audit_restarts=audit_restarts, batch_size=batch_size,
                                    compile=compile_model, channels_last=channels_last, mc_batch_size=mc_batch_size,
                                    n0=n0, n=n, alpha=alpha, seed=seed, revision=revision, image_column=image_column,
                                    label_column=label_column, strict=strict,
                                    trust_remote_code=trust_remote_code, write=write,
                                    out=str(out) if out is not None else None)
        settings.validate()
        result = run_evaluate(settings, console=console)
        if _is_main_process():
            console.print(certification_table([result.record], [Path(model).name or model]))
            for line in audit_lines(result.record):
                console.print(line, highlight=False)
            if push_to:
                _push_and_report(Path(folder), push_to)


def _push_and_report(folder: Path, repo_id: str, private: bool = False, revision: Optional[str] = None,
                     commit_message: Optional[str] = None) -> None:
    from .hub import push as run_push

    result = run_push(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    console.print(f"pushed {len(result.files)} files ({', '.join(result.files)}) in one commit")
    console.print(f"[bold green]{result.url}[/]", highlight=False)


@app.command()
@friendly_errors
def push(
    folder: Path = typer.Argument(..., help="A certify-zoo output folder (convert's --out)."),
    repo_id: str = typer.Argument(..., help="Hub repo id, NAMESPACE/NAME (created if needed)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created if needed)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit message."),
) -> None:
    """Publish an output folder to the Hub in one commit: weights, configs, records, plot and its model card.

    The token comes from HF_TOKEN or `hf auth login`. A failed push leaves the local folder as it was.
    """
    _push_and_report(folder, repo_id, private=private, revision=revision, commit_message=commit_message)


@app.command()
@friendly_errors
def download(
    repo_id: str = typer.Argument(..., help="Hub repo id of a certified model, NAMESPACE/NAME."),
    out: Optional[Path] = typer.Option(None, "--out", help="New or empty folder (default: the Hugging Face cache)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit."),
) -> None:
    """Download a certified model (safetensors weights, configs, records, card; never pickles)."""
    from .hub import download as run_download

    path = run_download(repo_id, out=out, revision=revision)
    console.print(f"downloaded {repo_id} to {path}")
    console.print(f"load it with timm.create_model('local-dir:{path}', pretrained=True) or certify_zoo.load('{path}')",
                  highlight=False)


@app.command("list")
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
    import json

    from .zoo import list_certified, zoo_table

    entries = list_certified(search=search, architecture=architecture, sigma=sigma, sort=sort, limit=limit)
    if as_json:
        print(json.dumps([entry.to_dict() for entry in entries], indent=2))
    else:
        console.print(zoo_table(entries))


@app.command()
@friendly_errors
def info(
    model: str = typer.Argument(..., help="A certify-zoo output folder or Hub repo id."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision."),
) -> None:
    """What a certified model is (base, conversion, certificates, audit), read from its records without weights."""
    from .report import certification_table
    from .zoo import info_lines, model_records

    metadata, certification, audit = model_records(model, revision)
    if not metadata and not certification:
        raise CertifyZooError(f"{model} has no certify-zoo records ({'certify_zoo.json'}, certification.json)")
    for line in info_lines(model, metadata, certification, audit):
        console.print(line, highlight=False)
    if certification:
        console.print(certification_table([certification], [Path(model).name or model]))


@app.command()
@friendly_errors
def compare(
    models: list[str] = typer.Argument(..., help="Output folders and/or Hub repo ids."),
    data: str = typer.Option(..., "--data", help="Labelled data, the same for every model."),
    sigma: Optional[float] = typer.Option(None, help="One sigma for all (default: each model's own)."),
    radii: str = typer.Option("0,0.25,0.5,0.75,1.0", help="Comma-separated L2 radii, ascending."),
    method: str = typer.Option("all", help="deterministic, monte-carlo or all."),
    max_images: Optional[int] = typer.Option(None, help="Certify only the first N images."),
    n0: int = typer.Option(100, help="Monte-Carlo selection samples."),
    n: int = typer.Option(10_000, help="Monte-Carlo estimation samples."),
    alpha: float = typer.Option(0.001, help="Monte-Carlo failure probability."),
    seed: int = typer.Option(0, help="Random seed for the noise (the same for every model)."),
    plot: Path = typer.Option(Path("compare.png"), "--plot", help="Where to write the comparison plot."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
) -> None:
    """Re-evaluate several models on the same data and radii: one table, one plot with a curve per model."""
    import json

    from .report import certification_table
    from .zoo import compare as run_compare, compare_plot

    records = run_compare(models, data, parse_radii(radii), method=method, sigma=sigma, max_images=max_images,
                          n0=n0, n=n, alpha=alpha, seed=seed, console=None if as_json else console)
    names = [Path(m).name if Path(m).exists() else m for m in models]
    certificate = "deterministic" if method == "deterministic" else "monte_carlo"
    compare_plot(list(zip(names, records)), plot, certificate)
    if as_json:  # stdout is the JSON document only
        print(json.dumps(dict(zip(models, records)), indent=2))
    else:
        console.print(certification_table(records, names, title="Comparison: certified accuracy (%)"))
        console.print(f"plot: {plot}")


@app.command()
@friendly_errors
def predict(
    model: str = typer.Argument(..., help="A converted output folder, a timm folder or a timm name."),
    images: list[str] = typer.Argument(..., help="Image files and/or folders of images."),
    top_k: int = typer.Option(5, "--top-k", help="Classes to show per image."),
    json_lines: bool = typer.Option(False, "--json", help="One json object per image instead of a table."),
    sigma: Optional[float] = typer.Option(None, help="Noise std for the radius (default: the model's own)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the model."),
) -> None:
    """Classify images: class names, probabilities and the deterministic radius of each prediction."""
    import json

    from .predict import PredictSettings, predict as run_predict
    from .report import prediction_table

    result = run_predict(PredictSettings(model=model, inputs=images, top_k=top_k, sigma=sigma, revision=revision))
    for note in result.notes:
        error_console.print(f"[yellow]Note:[/] {note}", highlight=False)
    if json_lines:
        for row in result.rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    console.print(prediction_table(result))


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
    from .report import audit_lines, certification_table

    result = run_demo(out, overwrite=overwrite, n=n, seed=seed, console=console)
    console.print(certification_table([result.base_record, result.converted_record], ["base", "converted"],
                                      title="Demo: base vs converted, certified accuracy (%)"))
    for name, record in (("base", result.base_record), ("converted", result.converted_record)):
        for line in audit_lines(record):
            console.print(f"{name}: {line}", highlight=False)
    console.print(f"Converted model: {result.converted_dir}  (load with timm.create_model("
                  f"'local-dir:{result.converted_dir}', pretrained=True))")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
