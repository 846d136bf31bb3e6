"""The command line as the Hugging Face tools have it: choices checked while parsing, one-line errors, -h, --version,
env, --debug anywhere; results on stdout, logs and progress on stderr; progress lines that reach a log file."""
from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import REPO, run_cli
from certify_zoo import __version__
from certify_zoo.cli import app
from certify_zoo.progress import RunProgress, default_interval
from certify_zoo.wording import counted

# Imports the CLI, runs it, then says whether torch was imported: proof that nothing was loaded before the error.
NOTHING_LOADED = """
import sys
from certify_zoo.cli import app
try:
    app(sys.argv[1:], prog_name="certify-zoo")
except SystemExit as exc:
    print(f"exit {exc.code} torch {'torch' in sys.modules}")
"""


@pytest.mark.parametrize("args, option, choices", [
    (("convert", "resnet50", "--out", "OUT", "--estimator", "foo"), "--estimator", "'paper', 'jl'"),
    (("convert", "resnet50", "--out", "OUT", "--bn-mode", "baz"), "--bn-mode", "'auto', 'eval', 'recompute', 'train'"),
    (("convert", "resnet50", "--out", "OUT", "--probe-distribution", "normal"), "--probe-distribution",
     "'gaussian', 'rademacher'"),
    (("convert", "resnet50", "--out", "OUT", "--optimizer", "adam"), "--optimizer", "'sgd', 'adamw'"),
    (("convert", "resnet50", "--out", "OUT", "--lr-scaling", "log"), "--lr-scaling", "'linear', 'sqrt', 'none'"),
    (("convert", "resnet50", "--out", "OUT", "--precision", "fp8"), "--precision", "'no', 'bf16', 'fp16'"),
    (("convert", "resnet50", "--out", "OUT", "--gamma", "lots"), "--gamma", "'auto'"),
    (("evaluate", "resnet50", "--method", "bar"), "--method", "'deterministic', 'monte-carlo', 'all'"),
    (("evaluate", "resnet50", "--audit", "fgsm"), "--audit", "'pgd', 'none'"),
])
def test_a_bad_choice_is_one_line_with_the_choices_before_anything_is_loaded(args, option, choices, tmp_path):
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    result = subprocess.run([sys.executable, "-c", NOTHING_LOADED, *args], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.stdout.strip() == "exit 2 torch False", result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and option in lines[0] and choices in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_shell_completion_offers_the_choices():
    result = run_cli(env={"_CERTIFY_ZOO_COMPLETE": "complete_bash", "COMP_WORDS": "certify-zoo convert x --bn-mode ",
                          "COMP_CWORD": "4"})
    assert result.returncode == 0 and result.stdout.split() == ["auto", "eval", "recompute", "train"], result.stderr


def test_gamma_takes_a_number_or_auto():
    from certify_zoo.cli import parse_gamma

    assert parse_gamma("0.05") == 0.05 and parse_gamma("auto") == "auto" and parse_gamma("0") == 0.0
    for bad in ("-1", "nan", "x"):
        with pytest.raises(Exception, match="auto"):
            parse_gamma(bad)


def test_cli_choices_are_the_librarys():
    """The Enums the command line offers are exactly the values the library accepts."""
    from certify_zoo.audit import ATTACKS
    from certify_zoo.cli import Audit, Estimator, LrScaling, Method, Optimizer, ProbeDistribution
    from certify_zoo.conversion import OPTIMIZERS
    from certify_zoo.evaluation import METHODS
    from certify_zoo.objective import PENALTY_ESTIMATORS, PROBE_DISTRIBUTIONS
    from certify_zoo.recipes import LR_SCALING_RULES

    for choices, accepted in ((Estimator, PENALTY_ESTIMATORS), (ProbeDistribution, PROBE_DISTRIBUTIONS),
                              (Optimizer, OPTIMIZERS), (LrScaling, LR_SCALING_RULES), (Method, METHODS),
                              (Audit, ATTACKS)):
        assert {c.value for c in choices} == set(accepted), choices


def test_version_help_and_env_work_offline(offline_cache):
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout == f"certify-zoo {__version__}\n"
    for args in (["-h"], ["convert", "-h"], ["evaluate", "-h"], ["push", "-h"], ["recipes", "show", "-h"]):
        shown = CliRunner().invoke(app, args)
        assert shown.exit_code == 0 and "Usage:" in shown.output, (args, shown.output)
    panels = CliRunner().invoke(app, ["convert", "-h"], env={"COLUMNS": "200"}).output
    for panel in ("Data", "Objective", "Optimiser and schedule", "Output and checkpoints", "Hub", "Logging"):
        assert f"─ {panel} ─" in panels
    assert "paper|jl" in panels and "Default: from the recipe." in panels and "--fd-step" in panels

    env = run_cli("env")
    assert env.returncode == 0, env.stderr
    for name in ("certify-zoo " + __version__, "torch:", "timm:", "accelerate:", "datasets:", "huggingface_hub:",
                 "devices: cpu", "accelerate config:", f"HF_HOME={os.environ['HF_HOME']}",
                 f"CERTIFY_ZOO_CACHE={os.environ['CERTIFY_ZOO_CACHE']}", "TORCH_HOME", "HF_HUB_CACHE"):
        assert name in env.stdout, name
    report = json.loads(run_cli("env", "--json").stdout)
    assert report["versions"]["certify-zoo"] == __version__ and report["offline"] is True
    cache = report["caches"]["Hugging Face home"]
    assert cache["path"] == os.environ["HF_HOME"] and cache["writable"] is True
    free = shutil.disk_usage(os.path.dirname(os.environ["HF_HOME"])).free  # HF_HOME itself: made when first used
    assert abs(cache["free_bytes"] - free) < 2**30  # the disk it is on, as measured now
    unit = "GiB" if free >= 2**30 else "MiB"
    assert re.search(rf"Hugging Face home: .*  \(moved by HF_HOME=.*; [0-9.]+ {unit} free\)", env.stdout), env.stdout


def test_the_environment_report_says_a_cache_that_cannot_be_written():
    """A read-only or full cache fails a download, a checkpoint or the demo later: `env` says so up front."""
    from certify_zoo.environment import environment_lines

    report = {"versions": {"certify-zoo": "0"}, "python": "3", "platform": "p", "devices": ["cpu"],
              "accelerate_config": {"exists": False, "file": "f"}, "offline": False,
              "caches": {"certify-zoo cache": {"path": "/ro", "moved_by": ["CERTIFY_ZOO_CACHE"], "set": {},
                                               "writable": False, "free_bytes": 5 * 2**20}}}
    assert environment_lines(report)[-1] == ("  certify-zoo cache: /ro  (moved by CERTIFY_ZOO_CACHE; cannot be "
                                             "written; 5 MiB free)")


@pytest.mark.parametrize("command", ["convert", "evaluate", "predict", "push", "download", "env", "info"])
def test_help_paragraphs_fill_the_terminal_width(command):
    """A paragraph of a command's description wraps at the terminal's width, not at the docstring's line breaks
    (Typer keeps those after the first paragraph): every line but a paragraph's last fills most of the width."""
    shown = CliRunner().invoke(app, [command, "-h"], env={"COLUMNS": "100"}).output
    description = shown.split("Usage:", 1)[1].split("╭", 1)[0].splitlines()[1:]
    paragraphs = [p.splitlines() for p in "\n".join(line.strip() for line in description).strip().split("\n\n")]
    for lines in paragraphs:
        assert all(len(line) > 70 for line in lines[:-1]), (command, lines)
    assert [usage for usage in shown.splitlines() if "Usage:" in usage][0].count("[[") == 0


@pytest.mark.parametrize("command", [[], ["convert"], ["evaluate"], ["compare"], ["predict"], ["demo"],
                                     ["recipes"], ["recipes", "list"], ["recipes", "show"], ["push"], ["download"],
                                     ["list"], ["info"], ["env"]])
def test_help_in_80_columns_cuts_no_option_name_or_word(command):
    """At 80 columns (a terminal's default, and rich's without one) `convert -h` printed
    '--clip-grad-median-mult…' and '(torch.use_deterministi…': rich cuts a word longer than its column, and long
    choice lists as metavars ('<linear|sqrt|none>') left the help column too narrow."""
    shown = CliRunner().invoke(app, [*command, "-h"], env={"COLUMNS": "80"}).output
    assert "Usage:" in shown and "…" not in shown, shown


def test_a_terminal_that_cannot_show_a_character_gets_an_escape_not_an_error(short_conversion, tmp_path):
    """stdout in ASCII (PYTHONIOENCODING=ascii; a latin-1 locale or a Windows code page likewise lacks characters):
    `info` of a folder named cönv ended in 'UnicodeEncodeError: 'ascii' codec can't encode character'. Python's
    stderr escapes such characters already; stdout now does the same."""
    folder = tmp_path / "cönv"
    shutil.copytree(short_conversion, folder)
    shown = run_cli("info", str(folder), env={"PYTHONIOENCODING": "ascii", "COLUMNS": "300"})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"{tmp_path}/c\\xf6nv: adversarial-boot-camp"), shown.stdout


@pytest.mark.parametrize("command, usage", [("convert", "{MODEL}"), ("evaluate", "{MODEL}"), ("info", "{MODEL}"),
                                            ("predict", "{MODEL} {IMAGES}..."), ("push", "{REPO_ID} [FOLDER]"),
                                            ("download", "{REPO_ID}"), ("compare", "{MODELS}...")])
def test_usage_names_the_arguments_as_the_help_text_does(command, usage):
    """Typer 0.29 wrote the arguments in lower case ('convert [OPTIONS] {model}') where the help says MODEL (the
    lowest Typer that pyproject admits writes 'predict [OPTIONS] MODEL IMAGES', without braces or dots)."""
    shown = CliRunner().invoke(app, [command, "-h"], env={"COLUMNS": "120"}).output
    line = next(line for line in shown.splitlines() if f" {command} [OPTIONS]" in line)
    assert re.findall(r"\w+", line.split("[OPTIONS]", 1)[1]) == re.findall(r"\w+", usage), shown


@pytest.mark.parametrize("how", ["before", "after", "variable"])
def test_debug_before_or_after_the_command_or_from_the_environment(how, tmp_path):
    args = ["convert", "x", "--data", "demo", "--out", str(tmp_path / "o"), "--sigma", "0"]
    args = {"before": ["--debug", *args], "after": [*args, "--debug"], "variable": args}[how]
    result = CliRunner().invoke(app, args, env={"CERTIFY_ZOO_DEBUG": "1" if how == "variable" else ""})
    assert result.exit_code != 0 and "sigma" in str(result.exception)  # the exception itself, with its traceback
    plain = CliRunner().invoke(app, args[1:] if how == "before" else [a for a in args if a != "--debug"],
                               env={"CERTIFY_ZOO_DEBUG": ""})
    assert plain.exit_code == 2 and plain.stderr.startswith("Error:") and len(plain.stderr.splitlines()) == 1


def test_progress_lines_for_a_log_file_and_a_live_bar_on_a_terminal(monkeypatch):
    assert [default_interval(t) for t in (1, 20, 21, 100, 1000, None)] == [1, 1, 1, 5, 50, 10]
    log = io.StringIO()
    with RunProgress("evaluate", 100, Console(file=log, force_terminal=False), unit="batch") as progress:
        for batch in range(1, 101):
            progress.update(batch, 8 * batch)
    lines = log.getvalue().splitlines()
    assert [int(re.match(r"evaluate batch (\d+)/100 \(\d+%\) \| [\d.]+ img/s \| ETA ", line)[1])
            for line in lines] == list(range(5, 101, 5))
    # a slow run's log is not silent for 5% of it: 12 s steps (a real ImageNet model on a CPU) get a line a minute,
    # besides the 5% ones; an interval asked for is kept to the letter
    import certify_zoo.progress

    for interval, expected in ((None, [5, 10, 15, 20, 25, 30, 35, 40, 42, 47]), (7, [7, 14, 21, 28, 35, 42, 49])):
        clock = iter(12.0 * tick for tick in range(1000))
        monkeypatch.setattr(certify_zoo.progress, "_now", lambda: next(clock))
        slow = io.StringIO()
        with RunProgress("convert", 840, Console(file=slow, force_terminal=False), interval=interval) as progress:
            for step in range(1, 51):
                progress.update(step, 11 * step)
        assert [int(re.match(r"convert step (\d+)/840", line)[1]) for line in slow.getvalue().splitlines()] == expected
    terminal = io.StringIO()
    with RunProgress("evaluate", 100, Console(file=terminal, force_terminal=True), unit="batch") as progress:
        progress.update(100, 800)
    assert "evaluate batch" not in terminal.getvalue() and "100/100" in terminal.getvalue()  # rich's bar


def test_a_20_step_conversion_logged_to_a_file_has_a_progress_line_per_10_percent(demo_base, demo_data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "convert.log"
    with log.open("w") as stderr:  # 24 unseen check images: enough to calibrate, so every stage of the self-check runs
        result = subprocess.run([sys.executable, "-m", "certify_zoo", "convert", str(demo_base), "--data", "demo",
                                 "--recipe", "demo", "--max-steps", "20", "--batch-size", "8", "--out", str(out),
                                 "--check-data", str(demo_data / "test"), "--check-images", "24",
                                 "--checkpoint-minutes", "0"], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    text = log.read_text()
    assert result.returncode == 0, text
    assert result.stdout == f"{out}\n"  # stdout: the result only
    lines = [line for line in text.splitlines() if line.startswith("convert step ")]
    for line in lines:  # one self-contained line: where, how fast, the objective's parts, when it ends
        assert re.match(r"convert step \d+/20 \(\d+%\) \| [\d.]+ img/s \| .* \| ETA \d+:\d\d:\d\d$", line), line
        assert all(f"| {name} " in line for name in ("loss", "fidelity", "penalty", "gamma", "rho", "agreement",
                                                     "batch agreement", "lr")), line
    steps = [int(re.match(r"convert step (\d+)/", line)[1]) for line in lines]
    assert steps and steps[-1] == 20
    for tenth in range(10):  # at least one line in each tenth of the run
        assert any(2 * tenth < step <= 2 * tenth + 2 for step in steps), (tenth, steps)
    assert "saved" in text and "\x1b[" not in text  # the log, plain: no live bar's escape codes
    # after the last step, the self-check says what it does and each stage as it ends, before its summary
    after = [line for line in text.split(lines[-1])[1].splitlines() if line.startswith("self-check")]
    stages = [re.match(r"self-check( of \d+ held-out images| \d/3: temperature [\d.]+| on|: temperature [\d.]+ chosen"
                       r"|: no temperature's kappa reaches [\d.]+)", line) for line in after]
    record = json.loads((out / "certify_zoo.json").read_text())
    calibration = record["calibration"]
    # the calibrated radii are attacked where some temperature's kappa could stand; else the radius is withdrawn
    decided = (": temperature N chosen" if calibration["by_refinement"] is not None
               else ": no temperature's kappa reaches N")
    assert all(stages) and [re.sub(r"[\d.]+", "N", stage[1]) for stage in stages] == [
        " of N held-out images", *[" N/N: temperature N"] * 3, decided, " on"], after
    assert after[4].endswith(" s)"), after[4]
    # "agreement" is the controller's, on the held-out images (what its floor and its restorations read), as the
    # self-check's is: the training batches' one, near 100% while the held-out one fell, is "batch agreement"
    checks = [entry for entry in record["gamma"]["trajectory"] if entry["step"] <= 20 and not entry.get("final")]
    shown = re.search(r"\| agreement ([\d.]+)% \| batch agreement ([\d.]+)% \|", lines[-1])
    assert shown and float(shown[1]) == pytest.approx(100 * checks[-1]["agreement"], abs=0.05), (lines[-1], checks)
    assert float(shown[2]) == pytest.approx(100 * record["final_agreement_with_base"], abs=0.05)
    if calibration["by_refinement"] is not None:
        assert f"temperature {calibration['temperature']:g} chosen" in after[4]
        assert f"-> {calibration['by_refinement']:.3f} in " in after[4], after[4]
    else:
        assert calibration["kappa"] == 0 and calibration["temperature"] == 1.0 and calibration["refinement"] == []


def test_evaluate_json_is_the_record_and_logs_go_to_stderr(short_conversion, tmp_path):
    record_file = tmp_path / "nested" / "record.json"
    result = run_cli("evaluate", str(short_conversion), "--data", "demo", "--method", "all", "--mc-samples", "50",
                     "--max-images", "16", "--batch-size", "8", "--json", "--output", str(record_file),
                     "--log-interval", "1")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    assert printed == json.loads((short_conversion / "certification.json").read_text())
    assert printed == json.loads(record_file.read_text())
    assert "forward passes: 16 images x 151 = 2,416" in result.stderr
    assert [line.split(" |")[0] for line in result.stderr.splitlines() if line.startswith("evaluate batch")] == [
        "evaluate batch 1/2 (50%)", "evaluate batch 2/2 (100%)"]


def test_convert_without_data_says_it_will_stream_gated_imagenet_first(tmp_path):
    from certify_zoo.cli import IMAGENET_TRAIN_IMAGES

    result = run_cli("convert", "resnet50", "--out", str(tmp_path / "o"), "--batch-size", "100", "--epochs", "1")
    assert result.returncode != 0  # offline: the weights cannot be fetched, after the announcement
    notice = next(line for line in result.stderr.splitlines() if line.startswith("no --data"))
    assert "gated" in notice and "HF_TOKEN" in notice and f"{IMAGENET_TRAIN_IMAGES // 100:,} steps" in notice
    assert "held-out images: the first of the unlabelled test split (hf:ILSVRC/imagenet-1k:test)" in notice


def test_info_and_recipes_as_json(short_conversion):
    info = run_cli("info", str(short_conversion), "--json")
    assert info.returncode == 0, info.stderr
    document = json.loads(info.stdout)
    assert document["metadata"] == json.loads((short_conversion / "certify_zoo.json").read_text())
    recipes = json.loads(run_cli("recipes", "--json").stdout)
    from certify_zoo.recipes import available_recipes

    assert [r["name"] for r in recipes] == available_recipes() and all("sigma" in r for r in recipes)


def test_every_option_has_a_spelling_that_torchrun_passes_through():
    """torchrun's own parser reads the whole command line: an option of ours that abbreviates two or more of its
    options (``--n`` of --nnodes, --nproc-per-node, ...) stops it with "ambiguous option" before certify-zoo starts.
    Every option needs one spelling that does not (``--n`` has ``--mc-samples``), and the help names it."""
    import typer.main
    from torch.distributed.run import get_args_parser

    torchrun = [name for action in get_args_parser()._actions for name in action.option_strings]

    def passes(name: str) -> bool:
        return sum(option.startswith(name) for option in torchrun) < 2 or name in torchrun

    group = typer.main.get_command(app)
    stopped = {}
    for command_name, command in group.commands.items():
        for param in command.params:
            names = [name for name in param.opts + param.secondary_opts if name.startswith("--")]
            if names and not any(passes(name) for name in names):
                stopped[f"{command_name} {names[0]}"] = names
    assert not stopped, stopped
    assert not passes("--n") and passes("--mc-samples")  # the check can fail, on the one option that needs it
    evaluate_help = CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "300"}).stdout
    assert "torchrun" in evaluate_help and "--mc-samples" in evaluate_help


def test_counts_read_in_their_number_in_every_message():
    assert [counted(1, "step"), counted(3, "step"), counted(1, "pass"), counted(2, "process")] == \
        ["1 step", "3 steps", "1 pass", "2 processes"]
    assert [counted(1.0, "image"), counted("-", "process"), counted("1000+", "image")] == \
        ["1.0 image", "- processes", "1000+ images"]  # a record's float, its missing value, a capped count
    # no message of the package hedges its plural ("3 step(s)", "1 process(es)"): counted() says it
    strings = [(path.name, node.value) for path in sorted((REPO / "certify_zoo").rglob("*.py"))  # recipes/ too
               if path.name != "wording.py" for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert len(strings) > 1000  # f-strings' literal parts included
    assert [(name, text) for name, text in strings if re.search(r"[a-z]\((s|es)\)", text)] == []
