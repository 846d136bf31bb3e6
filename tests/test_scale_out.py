"""Scale-out on the demo: a real 2-process run (torchrun, Accelerate MULTI_CPU on gloo) against 1 process.

One torchrun starts the driver (tests/scripts/scale_out_driver.py), which runs the real CLI twice for `convert`
(45 and 48 digits, 8 per process per step) and once for `evaluate`, then checks the penalty's gradients under DDP.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port

DRIVER = REPO / "tests" / "scripts" / "scale_out_driver.py"


def image_subset(demo_data: Path, folder: Path, count: int) -> Path:
    files = sorted((demo_data / "train").rglob("*.png"))[:count]
    (folder / "digits").mkdir(parents=True)
    for file in files:
        shutil.copy(file, folder / "digits" / f"{file.parent.name}_{file.name}")
    return folder


def labelled_with_unreadable(demo_data: Path, folder: Path) -> Path:
    """24 held-out digits in class folders and 3 corrupt files that sort first: with batches of 4 on two processes,
    process 0's first batch has one readable image and process 1's has four."""
    for digit in ("0", "1", "2"):
        (folder / digit).mkdir(parents=True)
        for file in sorted((demo_data / "test" / digit).glob("*.png"))[:8]:
            shutil.copy(file, folder / digit / file.name)
    for name in ("000a.png", "000b.png", "000c.png"):
        (folder / "0" / name).write_bytes(b"not a png")
    return folder


def two_processes(*arguments: str, timeout: int, signal_at: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGUMENTS`` on a free port (other torchrun jobs may share the machine);
    ``signal_at``: SIGTERM to torchrun (which passes it to both processes) at the first line of stderr so starting.

    A run past ``timeout`` (waiting for that line too), or still running SIGNALLED_GRACE seconds after the signal,
    fails the test with every process's Python stacks (faulthandler, on SIGABRT) and what it printed. Twice in full
    suites at the floors (Python 3.10 and 3.11, torch 2.3) a two-process run hung: once a DataLoader worker was stuck
    inside os.fork (CPython gh-112275: such runs now spawn their workers, data.worker_start_method), its process
    waited for a batch and the other in a collective; the wait for the signal's line had no deadline, and the suite
    with it."""
    with tempfile.TemporaryDirectory(prefix="torchrun-") as scratch:  # torchrun leaves a torchelastic_* in TMPDIR
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     "--master_port", str(free_port()), *arguments], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                         "TMPDIR": scratch, "PYTHONFAULTHANDLER": "1"})
        overdue = threading.Event()
        deadline = threading.Timer(timeout, abort_everything_below, args=(launcher, overdue))
        deadline.start()
        said = []
        try:
            for line in launcher.stderr if signal_at is not None else ():
                said.append(line)
                if line.startswith(signal_at):
                    launcher.send_signal(signal.SIGTERM)
                    deadline.cancel()
                    deadline = threading.Timer(SIGNALLED_GRACE, abort_everything_below, args=(launcher, overdue))
                    deadline.start()
                    timeout = SIGNALLED_GRACE
                    break
            stdout, stderr = launcher.communicate()  # ends by itself, or once the deadline aborted every process
        finally:
            deadline.cancel()
        stderr = "".join(said) + stderr
        if overdue.is_set():
            pytest.fail(f"torchrun did not end within {timeout} s{' of the signal' if signal_at else ''}; the "
                        "processes' stacks and output:\n"
                        f"{stdout[-2000:]}\n{stderr[-12000:]}")
        return subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)


# torchrun, signalled, waits 30 s for its processes before it kills them; they stop within a step or a batch
SIGNALLED_GRACE = 25


def abort_everything_below(launcher: subprocess.Popen, overdue: threading.Event) -> None:
    """SIGABRT to every process below torchrun at once, DataLoader workers included (one at a time, a process whose
    worker died raises, torchrun ends the others, and their stacks are lost): the faulthandler each inherits
    (PYTHONFAULTHANDLER) writes every thread's Python stack to stderr, the lines of several stacks interleaved.
    torchrun itself is killed if it has not ended 30 s later."""
    if launcher.poll() is not None:
        return  # it ended as the deadline came: not overdue
    overdue.set()
    processes, parents = [], [str(launcher.pid)]
    while parents:
        parents = subprocess.run(["pgrep", "-P", ",".join(parents)], capture_output=True, text=True).stdout.split()
        processes += parents
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGABRT)
    for _ in range(300):
        if launcher.poll() is not None:
            return
        time.sleep(0.1)
    launcher.kill()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def killed_by_torchrun(stderr: str) -> list[str]:
    """torchrun's lines for processes that had not ended 30 s after it signalled them, and that it killed."""
    return [line for line in stderr.splitlines() if "forcefully exiting via" in line]


def stopped_under_torchrun(command: list[str], out: Path, signal_at: str) -> str:
    """COMMAND under torchrun into OUT, SIGTERM at the first line starting `signal_at`: its one error line."""
    stopped = two_processes(*command, "--out", str(out), timeout=300, signal_at=signal_at)
    errors = error_lines(stopped.stderr)
    assert stopped.returncode != 0 and len(errors) == 1 and "--resume" in errors[0], stopped.stderr[-3000:]
    assert killed_by_torchrun(stopped.stderr) == []  # the other process left once the main process said it
    return errors[0]


def resumed_and_whole(command: list[str], tmp_path: Path) -> str:
    """COMMAND --resume under torchrun into tmp_path/stopped, and uninterrupted into tmp_path/whole: the resumed
    run's stderr (both must succeed)."""
    resumed = two_processes(*command, "--out", str(tmp_path / "stopped"), "--resume", timeout=300)
    whole = two_processes(*command, "--out", str(tmp_path / "whole"), timeout=300)
    assert resumed.returncode == whole.returncode == 0, resumed.stderr[-3000:] + whole.stderr[-3000:]
    return resumed.stderr


@pytest.fixture(scope="module")
def two_process_run(demo_base, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_out")
    data45, data48 = image_subset(demo_data, root / "d45", 45), image_subset(demo_data, root / "d48", 48)
    unreadable = labelled_with_unreadable(demo_data, root / "unreadable")
    work = root / "work"
    work.mkdir()
    result = two_processes(str(DRIVER), str(demo_base), str(data45), str(data48), str(work), str(unreadable),
                           timeout=600)
    # a process's one-line refusal sits above the other's collective traceback: show it first
    refusals = "\n".join(error_lines(result.stderr))
    assert result.returncode == 0, refusals + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
    return {"work": work, "data45": data45, "data48": data48, "unreadable": unreadable, "stdout": result.stdout,
            "stderr": result.stderr}


def seen(folder: Path) -> list[list[int]]:
    return json.loads((folder / "seen_images.json").read_text())["per_process"]


def test_each_image_trained_once_per_epoch_apart_from_accelerate_padding(two_process_run):
    work = two_process_run["work"]
    per_process = seen(work / "out48")  # 48 = 3 global batches of 2 x 8: no padding
    assert [len(p) for p in per_process] == [24, 24]
    assert sorted(per_process[0] + per_process[1]) == list(range(48))
    per_process = seen(work / "out45")  # 45: the last global batch is padded with 3 images from the epoch's start
    everything = per_process[0] + per_process[1]
    assert [len(p) for p in per_process] == [24, 24] and set(everything) == set(range(45))
    assert len(everything) - len(set(everything)) == 3
    record = json.loads((work / "out45" / "certify_zoo.json").read_text())
    assert record["scale_out"] == {"processes": 2, "global_batch": 16, "peak_lr": pytest.approx(0.02 * 16 / 64),
                                   "lr_min": pytest.approx(0.002 * 16 / 64)}
    assert record["images_seen"] == 48 and record["steps"] == 3


def test_only_the_main_process_wrote_and_printed(two_process_run):
    stdout, logs, work = two_process_run["stdout"], two_process_run["stderr"], two_process_run["work"]
    assert logs.count("saved ") == 3 and logs.count("recipe demo (--recipe") == 3  # three conversions
    assert stdout.count("Certified accuracy") == 1 and stdout.count("DRIVER DONE") == 2
    assert stdout.count(f"{work / 'out48'}\n") == 1  # convert's result, printed once
    assert sorted(p.name for p in (work / "out48").iterdir()) == [
        "README.md", "audit.json", "certification.json", "certified_accuracy.png", "certify_zoo.json", "config.json",
        "model.safetensors", "per_image.json", "seen_images.json"]


def test_two_processes_give_the_weights_of_one_process_with_the_same_global_batch(two_process_run, demo_base,
                                                                                   tmp_path):
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    single = tmp_path / "single"
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data=str(two_process_run["data48"]),
                                        out=str(single), batch_size=16, epochs=1, check_images=0))
    assert json.loads((single / "certify_zoo.json").read_text())["scale_out"]["peak_lr"] == pytest.approx(0.005)
    two = load_file(str(two_process_run["work"] / "out48" / "model.safetensors"))
    one = load_file(str(single / "model.safetensors"))
    base = load_file(str(demo_base / "model.safetensors"))
    assert one.keys() == two.keys()
    moved = max(float((one[k] - base[k]).abs().max()) for k in one)
    difference = max(float((one[k] - two[k]).abs().max()) for k in one)
    # (the demo recipe: jl's several backward calls per step under DDP, the gradient clipped at 1 after them)
    assert moved > 1e-4  # the run did change the weights (3 warm-up steps of a clipped gradient) ...
    assert difference < 1e-5  # ... and identically on 1 and 2 processes


def test_two_process_evaluation_gathers_in_dataset_order(two_process_run):
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    out48 = two_process_run["work"] / "out48"
    two = json.loads((out48 / "certification.json").read_text())
    one = evaluate(EvaluateSettings(model=str(out48), data="demo", method="all", n=64, n0=16, batch_size=8,
                                    max_images=40, write=False)).record
    # 5 batches of 8 on 2 processes: Accelerate pads process 1 with a 6th batch, whose repeats evaluate drops by index
    assert two["num_images"] == one["num_images"] == 40
    assert two["certificates"] == one["certificates"] and two["clean_accuracy"] == one["clean_accuracy"]


def test_two_process_evaluation_with_unreadable_images_gathers_what_each_read(two_process_run, demo_base):
    """Unreadable images leave the processes with different numbers of images in a step: each gathers what it
    read, the skips are counted per process and summed, and the result is the one-process result."""
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    two = json.loads((two_process_run["work"] / "unreadable_eval.json").read_text())
    one = evaluate(EvaluateSettings(model=str(demo_base), data=str(two_process_run["unreadable"]), sigma=0.5,
                                    method="all", n=32, n0=8, batch_size=4, audit="pgd", audit_steps=5,
                                    audit_restarts=1, write=False))
    assert two["record"]["skipped_images"] == one.record["skipped_images"] == 3
    assert two["record"]["num_images"] == one.record["num_images"] == 24
    assert two["index"] == one.per_image["index"].tolist() == list(range(3, 27))  # data order, each image once
    assert two["record"]["certificates"] == one.record["certificates"]
    assert two["record"]["audit"] == one.record["audit"]


def test_two_process_conversion_names_every_process_unreadable_images(two_process_run):
    """The record had named only the main process's unreadable images beside the count of all processes'."""
    record = json.loads((two_process_run["work"] / "out_unreadable" / "certify_zoo.json").read_text())
    assert record["skipped_images"] == 3
    assert sorted(Path(name).name for name in record["unreadable_files"]) == ["000a.png", "000b.png", "000c.png"]


def test_boot_camp_penalty_gradients_are_exact_under_ddp(two_process_run):
    checks = json.loads((two_process_run["work"] / "ddp_penalty.json").read_text())
    assert set(checks) == {"train/paper", "train/jl", "eval/paper", "eval/jl"}
    for check in checks.values():  # BatchNorm in train mode (paper) and in eval mode; both estimators
        assert check["ok"], check
        assert check["max_abs_diff"] <= 1e-6 * max(1.0, check["max_abs_grad"]), check
        assert check["local_half_diff"] > 1e-3 * check["max_abs_grad"], check  # the all-reduce did something


def test_both_processes_go_back_at_the_same_steps_to_the_same_state(two_process_run):
    """A breach of the agreement floor is decided by each process from its own measurement: they agree, so no
    broadcast is needed and the processes' weights stay one model."""
    work = two_process_run["work"]
    first, second = (json.loads((work / f"restorations_{rank}.json").read_text()) for rank in (0, 1))
    assert first and first == second
    metadata = json.loads((work / "breach" / "certify_zoo.json").read_text())
    assert metadata["gamma"]["restorations"] == len(first)
    assert [row["restored_to_step"] for row in metadata["gamma"]["trajectory"] if "restored_to_step" in row] == [
        step for step, _ in first]


def test_both_processes_raise_the_lr_at_the_same_checks(two_process_run):
    """Under AdamW the controller reads the penalty's share of the loss, which each process measures on its own
    batches: gathered, every process takes the same decisions and steps with the same lr."""
    work = two_process_run["work"]
    first, second = (json.loads((work / f"lr_levers_{rank}.json").read_text()) for rank in (0, 1))
    assert first and first == second
    assert any(lever == "lr" for _, lever, _, _ in first) and first[-1][2] > 1


def test_each_process_measures_its_share_of_the_controllers_check_and_both_end_with_every_value(two_process_run):
    """The gamma controller's check ran whole on every process; now each measures every second chunk and an
    all-reduce sums the parts: the values are one process's, bit for bit, and the work is split between the two."""
    work = two_process_run["work"]
    first, second = (json.loads((work / f"rho_in_shards_{rank}.json").read_text()) for rank in (0, 1))
    assert first["same_bits"] and second["same_bits"]
    assert first["measured_alone"] == second["measured_alone"]
    assert first["measured"] + second["measured"] == first["measured_alone"]
    assert 0 < first["measured"] < first["measured_alone"] and 0 < second["measured"] < first["measured_alone"]


def test_each_process_takes_its_share_of_the_self_check_and_both_end_with_one_processs_record(two_process_run):
    """The self-check at the end of a conversion ran on the main process alone while the others waited; now each
    process attacks and measures its share and the parts are summed: the record, calibration included, is one
    process's, and the forwards are split."""
    work = two_process_run["work"]
    first, second = (json.loads((work / f"self_check_in_shards_{rank}.json").read_text()) for rank in (0, 1))
    assert first["same_record"] and second["same_record"]
    candidates = first["candidates"]
    assert all(c["attacked"] for c in candidates) and candidates[-1]["counterexamples_within_claim"] > 0
    assert first["forwards_alone"] == second["forwards_alone"]
    for part in (first, second):
        assert 0.25 * part["forwards_alone"] < part["forwards"] < 0.75 * part["forwards_alone"]


def test_streamed_dataset_is_split_across_processes(two_process_run):
    per_process = json.loads((two_process_run["work"] / "stream_split.json").read_text())
    # 4 shards of 5, 5, 5, 6 examples: each process keeps every other example of the whole stream (0, 2, .. 20 and
    # 1, 3, .. 19), not two whole shards; in lockstep both stop after 5 batches of 2, so example 20 is left out,
    # and nothing is read twice
    examples = [sorted(example for example, _ in part) for part in per_process]
    assert examples == [list(range(0, 20, 2)), list(range(1, 20, 2))]
    # stream positions: each process's n-th example gets n * 2 + rank, its index in the stream
    assert [[position for _, position in part] for part in per_process] == examples


def test_streams_are_held_out_and_left_out_as_by_one_process(two_process_run):
    """The real loaders on 4 parquet files of 40, 8, 40 and 8 rows: the rows 2 processes take are the rows 1 process
    takes. Split by file (datasets' choice for 4 files over 2 processes), each process skipped its own share of the
    held-out rows, so held-out rows could be trained on, and the conversion stopped after 4 steps (one process
    had 13 rows); the evaluation certified calibration rows 3 and 4, missed rows 40 and 41, and took 20 steps."""
    record = json.loads((two_process_run["work"] / "streams_through_the_loaders.json").read_text())
    # the first 6 rows the seed reads, from several files (datasets interleaves them), read before the split: the
    # same images on both processes
    held = set(record["held_out"])
    file_of = {row: sum(row >= first for first in (40, 48, 88)) for row in range(96)}
    assert len(held) == 6 and len({file_of[row] for row in held}) >= 2
    # (96 - 6) // 2 // 4 = 11 steps of 4 rows per process, each process its own rows, none of them held out
    trained = record["trained"]
    assert [len(rows) for rows in trained] == [len(set(rows)) for rows in trained] == [44, 44]
    assert not set(trained[0]) & set(trained[1]) and not held & set(trained[0] + trained[1])
    evaluated = record["evaluated"]
    assert sorted(evaluated[0] + evaluated[1]) == list(range(5, 96))  # every row but the calibration's, once
    # the progress bar's total, ceil(91 / 2 / 4), is the number of steps taken (by file: 20 steps, 167%)
    assert record["evaluation_batches"] == record["evaluation_steps"] == 12


def test_the_exit_hooks_take_the_process_group_down_and_join_its_threads(two_process_run):
    """Left to the interpreter's finalisation, a gloo worker thread freeing a finished collective aborts the process
    after the work is done (SIGABRT, "terminate called without an active exception": torchrun reports the run as
    failed). make_accelerator's exit hook destroys the group while the interpreter is whole, and the group's worker
    threads end with it: before torch.distributed.nn was imported ahead of the group, its functions' default
    arguments held the group, the threads outlived the hook, and 1 in 40 two-process evaluations aborted (1 in 13
    with two runs side by side)."""
    work = two_process_run["work"]
    exits = [json.loads((work / f"exit_hooks_{rank}.json").read_text()) for rank in (0, 1)]
    if not any(e["gloo_workers_before"] for e in exits):
        pytest.skip(f"torch {torch.__version__} does not name its gloo worker threads: they cannot be counted")
    assert [(e["initialized"], e["gloo_workers_after"]) for e in exits] == [(False, 0), (False, 0)], exits
    assert all(e["gloo_workers_before"] >= 2 for e in exits), exits  # the threads are there to be counted


def test_bad_input_under_torchrun_is_one_line_and_touches_nothing(demo_base, demo_data, tmp_path):
    """An error that every process meets alike (the arguments, the model, a folder the main process refuses) is
    printed once, by the main process, not once per process; the refused folder keeps its file."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    empty, animals = tmp_path / "empty", tmp_path / "animals"  # data errors too: every process reads the same files
    empty.mkdir()
    for name in ("cat", "dog"):
        (animals / name).mkdir(parents=True)
        shutil.copy(next((demo_data / "test" / "3").glob("*.png")), animals / name)
    commands = {
        "output folder": ["convert", str(demo_base), "--data", str(demo_data / "train"), "--out", str(foreign),
                          "--recipe", "demo", "--max-steps", "1"],
        "--sigma must be in": ["convert", str(demo_base), "--data", "demo", "--out", str(tmp_path / "o"),
                               "--sigma", "-1"],
        "does not exist": ["evaluate", str(tmp_path / "missing"), "--data", "demo"],
        "no image files in": ["convert", str(demo_base), "--data", str(empty), "--out", str(tmp_path / "o"),
                              "--recipe", "demo", "--max-steps", "1"],
        "do not match the model's 10 classes": ["evaluate", str(demo_base), "--data", str(animals), "--sigma", "0.5"],
    }
    for said, command in commands.items():
        result = two_processes("-m", "certify_zoo", *command, timeout=300)
        errors = error_lines(result.stderr)
        assert result.returncode != 0 and len(errors) == 1 and said in errors[0], result.stderr[-3000:]
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and not (tmp_path / "o").exists()


def test_the_main_process_alone_outlasts_the_process_groups_deadline(demo_base, demo_data, tmp_path):
    """After the last step one process can work far longer than the other: its share of the self-check (on CPUs at
    ImageNet sizes, minutes), and the save, which only the main process does. Both can outlast the default group's
    deadline (torch: 30 minutes on gloo), which the driver cuts to seconds while the main process's share and save
    sleep past it. A process that waited in a collective of that group timed out and failed a run whose main process
    was still working; now both finish, each having run its share of the self-check on its own thread."""
    data = image_subset(demo_data, tmp_path / "data", 48)
    out, result = tmp_path / "out", tmp_path / "result.json"
    run = two_processes(str(REPO / "tests" / "scripts" / "main_alone_driver.py"), str(demo_base), str(data),
                        str(demo_data / "test"), str(out), str(result), timeout=300)
    assert run.returncode == 0, "\n".join(error_lines(run.stderr)) + run.stderr[-3000:]
    ranks = [json.loads(Path(f"{result}.{rank}").read_text()) for rank in (0, 1)]
    assert [r["exit_code"] for r in ranks] == [0, 0]
    assert [r["threads_in_self_check"] for r in ranks] == [[1], [1]]  # OMP_NUM_THREADS=1
    assert [r["threads_after"] for r in ranks] == [1, 1]
    assert json.loads((out / "certify_zoo.json").read_text())["self_check"]["held_out_images"] == 20


def test_a_signal_after_the_last_step_under_torchrun_is_said_once_and_resume_finishes(demo_base, demo_data,
                                                                                      tmp_path):
    """torchrun passes SIGTERM to both processes during the self-check: one line (each process printed it), exit
    3, and the same command with --resume under torchrun saves the model."""
    data = image_subset(demo_data, tmp_path / "data", 48)
    out = tmp_path / "out"
    command = ["-m", "certify_zoo", "convert", str(demo_base), "--data", str(data), "--check-data",
               str(demo_data / "test"), "--check-images", "20", "--recipe", "demo", "--batch-size", "8",
               "--workers", "1", "--max-steps", "2", "--checkpoint-every", "1", "--out", str(out)]
    stopped = two_processes(*command, timeout=300, signal_at="self-check of")  # after the final checkpoint
    errors = error_lines(stopped.stderr)
    assert stopped.returncode != 0 and len(errors) == 1 and "stopped by SIGTERM after the last step" in errors[0], \
        stopped.stderr[-3000:]
    assert killed_by_torchrun(stopped.stderr) == []
    assert not (out / "model.safetensors").exists()
    resumed = two_processes(*command, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step-00000002" in resumed.stderr and (out / "model.safetensors").exists()
    assert "accelerate launch started one process" not in resumed.stderr
    assert json.loads((out / "certify_zoo.json").read_text())["self_check"]["held_out_images"] == 20


def test_accelerate_launch_of_several_processes_without_gpus_says_it_ran_one(demo_base, tmp_path):
    """`accelerate launch --num_processes 2` on a machine without GPUs runs the command once, as one process: the
    run says so and names torchrun (torchrun's own runs in this file do not say it)."""
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                             "certify_zoo", "evaluate", str(demo_base), "--data", "demo", "--method", "deterministic",
                             "--max-images", "8", "--sigma", "0.5"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerate launch started one process" in result.stderr and "torchrun --nproc_per_node" in result.stderr


def test_a_signal_under_torchrun_stops_an_evaluation_once_and_resume_finishes_it(demo_base, tmp_path):
    """SIGTERM to torchrun reaches both processes and their DataLoader workers, which the evaluation's loader let die
    (the run ended in 'DataLoader worker is killed by signal'): now they leave it to the main processes, which stop
    together after a batch with one line; --resume certifies the rest, and the records equal an uninterrupted
    two-process run's."""
    command = ["-m", "certify_zoo", "evaluate", str(demo_base), "--data", "demo", "--sigma", "0.5", "--method",
               "all", "--mc-samples", "100", "--max-images", "96", "--batch-size", "8", "--workers", "1",
               "--log-interval", "1"]
    stopped_under_torchrun(command, tmp_path / "stopped", "evaluate batch 2/")
    assert "resuming after batch" in resumed_and_whole(command, tmp_path)
    records = [json.loads((tmp_path / name / "certification.json").read_text()) for name in ("stopped", "whole")]
    assert [{k: v for k, v in record.items() if k not in ("created", "run")} for record in records][0] == \
        {k: v for k, v in records[1].items() if k not in ("created", "run")}


def test_a_streamed_evaluation_under_torchrun_resumes_where_each_process_stood(demo_base, demo_data, tmp_path):
    """A stream is split per process (datasets' split_dataset_by_node): the kept results hold where each process
    stood in its part, --resume under two processes reads each part on from there, and the records equal an
    uninterrupted two-process run's. One process cannot take the results over (its batches cover other images):
    refused in one line naming the number of processes."""
    from tiny_sources import digits_parquet

    stream = digits_parquet(tmp_path / "stream", demo_data, split="test", shards=3, limit=96)
    command = ["-m", "certify_zoo", "evaluate", str(demo_base), "--data", str(stream), "--sigma", "0.5", "--method",
               "all", "--mc-samples", "100", "--batch-size", "8", "--workers", "1", "--log-interval", "1"]
    stopped_under_torchrun(command, tmp_path / "stopped", "evaluate batch 2/")
    state = json.loads((tmp_path / "stopped" / "evaluate-partial" / "state.json").read_text())
    done = state["batches_done"]
    assert [place["batches"] for place in state["streams"]] == [done, done] and state["rows"] == 16 * done

    alone = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "stopped"), "--resume"],
                           capture_output=True, text=True, timeout=300, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert alone.returncode == 2 and error_lines(alone.stderr) == [
        f"Error: --resume: the results in {tmp_path / 'stopped' / 'evaluate-partial'} were made with another number "
        "of processes (kept by 2, resumed by 1): run the same command as before, or delete that folder to start "
        "over"], alone.stderr[-3000:]

    resumed = resumed_and_whole(command, tmp_path)
    assert f"resuming after batch {done} of 6" in resumed
    # each process read on from its place: six batches in all (from the start, the parts would last to batch 6 + done)
    assert "evaluate batch 6/6" in resumed and "evaluate batch 7/" not in resumed
    records = [json.loads((tmp_path / name / "certification.json").read_text()) for name in ("stopped", "whole")]
    assert records[0]["num_images"] == 96
    assert [{k: v for k, v in record.items() if k not in ("created", "run")} for record in records][0] == \
        {k: v for k, v in records[1].items() if k not in ("created", "run")}


def test_a_streamed_conversion_under_torchrun_resumes_to_the_weights_of_an_uninterrupted_one(demo_base, demo_data,
                                                                                           tmp_path):
    """A stream in 4 files (datasets would split it by file over 2 processes) with rows held out: SIGTERM
    under torchrun keeps each process's row position in the checkpoint, and --resume under torchrun ends with the
    weights of an uninterrupted two-process run."""
    from test_resume import _weights, max_weight_difference
    from tiny_sources import digits_parquet

    stream = digits_parquet(tmp_path / "stream", demo_data, shards=4, limit=200)
    command = ["-m", "certify_zoo", "convert", str(demo_base), "--data", str(stream), "--recipe", "demo",
               "--batch-size", "8", "--workers", "1", "--max-steps", "8", "--checkpoint-every", "100",
               "--checkpoint-minutes", "0", "--log-interval", "1"]
    error = stopped_under_torchrun(command, tmp_path / "stopped", "convert step 3/")
    at = int(error.split(" at step ")[1].split()[0])
    assert 3 <= at < 8 and f"(step {at}," in resumed_and_whole(command, tmp_path)
    assert max_weight_difference(tmp_path / "stopped", _weights(tmp_path / "whole")) <= 1e-6


def test_the_other_processes_wait_for_the_main_process_to_say_an_error_until_it_did_or_the_grace_ran_out(tmp_path):
    """The handshake in the process group's store, in a one-process group: without the main process's word the
    wait ends after its grace, without raising; with it (the same count of errors said) at once."""
    script = """
import json, time
import torch.distributed as dist
from certify_zoo import distributed
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
took = []
for said in (False, True):
    if said:  # what the main process does for the same error: its first key after this one
        distributed._default_store().set("certify_zoo/error_said/1", "said")
    start = time.perf_counter()
    distributed.wait_for_the_main_process_to_say_the_error(2.0)
    took.append(time.perf_counter() - start)
print(json.dumps(took))
"""
    run = subprocess.run([sys.executable, "-c", script % free_port()], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    unsaid, said = json.loads(run.stdout.splitlines()[-1])
    assert 2.0 <= unsaid < 10 and said < 1.0
