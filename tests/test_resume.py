"""Interruptions on a real demo conversion: SIGKILL at random steps, SIGTERM / Ctrl-C, damaged checkpoints."""
from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import REPO, sigterm_at_call

STEPS, EVERY = 16, 4
RUN_ARGS = ("--data", "demo", "--recipe", "demo", "--max-steps", str(STEPS), "--batch-size", "16", "--reps", "2",
            "--gamma", "2", "--seed", "3", "--checkpoint-every", str(EVERY), "--checkpoint-minutes", "0")

# The real CLI in a subprocess that SIGKILLs itself at the start of its Nth loss evaluation (i.e. after N-1
# completed steps), or while writing its Nth checkpoint (accelerate's files written, manifest not yet).
DYING_CLI = textwrap.dedent("""
    import os, signal, sys
    import certify_zoo.checkpoints as checkpoints
    import certify_zoo.conversion as conversion
    where, at = os.environ["DIE_IN"], int(os.environ["DIE_AT"])
    calls = [0]
    def dying(real):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapper
    if where == "step":
        conversion.boot_camp_step = dying(conversion.boot_camp_step)
    else:
        checkpoints.write_manifest = dying(checkpoints.write_manifest)
    from certify_zoo.cli import app
    app()
""")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _settings(base: Path, out: Path, resume: bool = False):
    from certify_zoo.conversion import ConvertSettings
    from certify_zoo.recipes import load_recipe

    return ConvertSettings.from_recipe(load_recipe("demo"), model=str(base), data="demo", out=str(out),
                                       max_steps=STEPS, batch_size=16, reps=2, gamma=2.0, seed=3,
                                       checkpoint_every=EVERY, checkpoint_minutes=0, resume=resume)


def _convert_in_process(base: Path, out: Path, resume: bool = False) -> str:
    from certify_zoo.conversion import convert

    text = io.StringIO()
    convert(_settings(base, out, resume), console=Console(file=text, width=200))
    return text.getvalue()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def max_weight_difference(folder: Path, expected: dict[str, torch.Tensor]) -> float:
    """The largest |difference| between the weights in `folder` and `expected` (the same tensors by name)."""
    got = _weights(folder)
    assert got.keys() == expected.keys()
    return max((got[k] - expected[k]).abs().max().item() for k in expected)


def test_sigkill_at_random_steps_then_resume_matches_uninterrupted_run(demo_base, tmp_path):
    """Three kills at random points; the resumed weights equal an uninterrupted run's, work lost < one interval."""
    from certify_zoo.checkpoints import CHECKPOINTS_DIR

    reference = tmp_path / "reference"
    _convert_in_process(demo_base, reference)
    assert not (reference / CHECKPOINTS_DIR).exists()  # a finished run carries no pickled state
    expected = _weights(reference)

    rng = random.Random()
    scenarios = [("step", rng.randint(2, STEPS), False),
                 ("step", rng.randint(2 * EVERY + 1, STEPS), True),  # True: then the newest checkpoint is truncated
                 ("checkpoint", rng.randint(2, STEPS // EVERY - 1), False)]  # killed while writing this checkpoint
    report = []
    for where, at, truncate in scenarios:
        out = tmp_path / f"{where}-{at}-{truncate}"
        killed = subprocess.run([sys.executable, "-c", DYING_CLI, "convert", str(demo_base), "--out", str(out),
                                 *RUN_ARGS], env={**_env(), "DIE_IN": where, "DIE_AT": str(at)},
                                capture_output=True, text=True, timeout=600)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not (out / "model.safetensors").exists()
        completed = at - 1 if where == "step" else at * EVERY  # steps done when the process died
        saved = sorted((out / CHECKPOINTS_DIR).glob("step-*"))
        if truncate:
            with open(saved[-1] / "model.safetensors", "r+b") as handle:
                handle.truncate(1000)
        log = _convert_in_process(demo_base, out, resume=True)
        match = re.search(r"resuming from step-\d+ \(step (\d+)", log)
        resumed = int(match.group(1)) if match else 0
        lost = completed - resumed
        if truncate:
            assert "is incomplete or damaged" in log and resumed == int(saved[-2].name[5:]), log
        else:
            assert lost <= EVERY, (where, at, log)
        max_diff = max_weight_difference(out, expected)
        report.append(f"{where} {at}: {completed} steps done, resumed at {resumed}, lost {lost}, "
                      f"truncated {truncate}, max |diff| {max_diff:.3g}")
        assert max_diff <= 1e-6, report
    print("\n".join(report))

    again = _convert_in_process(demo_base, out, resume=True)  # finished: nothing is redone
    assert "nothing to redo" in again and _weights(out).keys() == expected.keys()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT-group", "SIGHUP", "SIGHUP-ignored"])
def test_stop_signal_saves_checkpoint_and_exits_3_quickly(demo_base, tmp_path, how):
    """SIGTERM to the process (a scheduler), Ctrl-C to its process group (a terminal, DataLoader workers too), or
    SIGHUP (the terminal or ssh session closed: it ended the run at once, exit -1, the steps since the last
    checkpoint lost). Started with SIGHUP ignored (nohup), the run goes on after it, and a SIGTERM then stops it."""
    from certify_zoo.checkpoints import CHECKPOINTS_DIR, checkpoint_problem

    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "certify_zoo", "convert", str(demo_base), "--out", str(out),
                                "--data", "demo", "--recipe", "demo", "--batch-size", "16", "--reps", "2",
                                "--checkpoint-every", "2", "--checkpoint-minutes", "0"],
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
                               if how == "SIGHUP-ignored" else None)
    deadline = time.monotonic() + 300
    while not list((out / CHECKPOINTS_DIR).glob("step-*")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    if how == "SIGHUP-ignored":
        process.send_signal(signal.SIGHUP)
        newest = sorted((out / CHECKPOINTS_DIR).glob("step-*"))[-1].name
        while sorted((out / CHECKPOINTS_DIR).glob("step-*"))[-1].name == newest:  # it goes on to the next one
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        how = "SIGTERM"
    sent = time.monotonic()
    if how in ("SIGTERM", "SIGHUP"):
        process.send_signal(getattr(signal, how))
    else:
        os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    seconds = time.monotonic() - sent
    print(f"{how}: exited {process.returncode} {seconds:.2f}s after the signal")
    assert process.returncode == 3, stderr
    assert seconds < 30
    assert "--resume" in stderr and "Traceback" not in stderr + stdout
    assert re.search(rf"stopped by {how.split('-')[0]} at step \d+", stderr)
    newest = sorted((out / CHECKPOINTS_DIR).glob("step-*"))[-1]
    assert checkpoint_problem(newest) is None and not (out / "model.safetensors").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no terminals to hang up")
def test_a_closed_terminal_stops_the_run_with_its_checkpoint_and_exit_3(demo_base, tmp_path):
    """The run writes to a terminal (a pty: the live progress bar) that goes away, then SIGHUP comes. Writing to the
    hung-up terminal failed (EIO): the checkpoint was saved, but the run ended with exit 1, the progress bar's last
    refresh raising. The terminal's output now goes nowhere, as under nohup."""
    import pty

    from certify_zoo.checkpoints import CHECKPOINTS_DIR, checkpoint_problem

    out = tmp_path / "out"
    terminal, its_end = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "certify_zoo", "convert", str(demo_base), "--out", str(out),
                                "--data", "demo", "--recipe", "demo", "--batch-size", "16", "--reps", "2",
                                "--checkpoint-every", "2", "--checkpoint-minutes", "0"],
                               env=_env(), stdin=its_end, stdout=its_end, stderr=its_end, start_new_session=True)
    os.close(its_end)
    deadline = time.monotonic() + 300
    while not list((out / CHECKPOINTS_DIR).glob("step-*")):
        assert process.poll() is None and time.monotonic() < deadline
        try:
            os.read(terminal, 1 << 16)  # what a terminal shows, read so that the run never waits on a full pty
        except OSError:
            pass
        time.sleep(0.05)
    os.close(terminal)  # the window closes
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=120) == 3
    newest = sorted((out / CHECKPOINTS_DIR).glob("step-*"))[-1]
    assert checkpoint_problem(newest) is None and not (out / "model.safetensors").exists()


def test_checkpoint_due_by_steps_and_by_minutes(tmp_path):
    from types import SimpleNamespace

    from certify_zoo.checkpoints import CheckpointPolicy, CheckpointStore

    one_process = SimpleNamespace(num_processes=1)
    by_steps = CheckpointStore(one_process, tmp_path, CheckpointPolicy(every_steps=4, every_minutes=0), print)
    assert [step for step in range(1, 13) if by_steps.due(step, False)[0]] == [4, 8, 12]
    assert by_steps.due(5, True) == (True, True)  # a stop request always saves
    by_time = CheckpointStore(one_process, tmp_path, CheckpointPolicy(every_steps=0, every_minutes=0.5), print)
    assert by_time.due(1, False) == (False, False)
    by_time._last_save -= 31  # half a minute and a second later
    assert by_time.due(2, False) == (True, False)


def test_resume_refuses_only_settings_that_define_the_run():
    from certify_zoo.checkpoints import settings_differences

    saved = {"model": "m", "data": "d", "batch_size": 16, "lr": 0.01, "out": "/a", "processes": 1,
             "objective": {"sigma": 0.25, "gamma": 0.05}}
    current = {**saved, "batch_size": 8, "lr": 0.001, "out": "/b", "processes": 2,
               "objective": {"sigma": 0.5, "gamma": 0.05}}
    fixed, other = settings_differences(saved, current)
    assert fixed == ["batch_size: 16 -> 8", "sigma: 0.25 -> 0.5", "processes: 1 -> 2"]
    assert other == ["lr: 0.01 -> 0.001"]


def test_a_finished_conversion_resumed_with_other_settings_is_refused(demo_base, tmp_path):
    """Asked for more steps, --resume on a finished conversion said "nothing to redo" and exited 0 with the old
    result; the same settings (and --strict, which changes no result) still find nothing to redo."""
    from dataclasses import replace

    from certify_zoo.conversion import convert
    from certify_zoo.errors import CertifyZooError

    out = tmp_path / "finished"
    settings = replace(_settings(demo_base, out), max_steps=2, checkpoint_every=0)
    convert(settings, console=Console(file=io.StringIO()))
    before = (out / "model.safetensors").read_bytes()
    for changed, said in ((dict(max_steps=7), "max_steps: 2 -> 7"), (dict(lr=0.5), "lr: ")):
        with pytest.raises(CertifyZooError, match=rf"finished conversion \(2 steps\), and these settings differ "
                                                  rf"from its \({said}.*convert again with --overwrite"):
            convert(replace(settings, resume=True, **changed), console=Console(file=io.StringIO()))
    log = io.StringIO()
    convert(replace(settings, resume=True, strict=True), console=Console(file=log, width=200))
    assert "nothing to redo" in log.getvalue()
    assert (out / "model.safetensors").read_bytes() == before


def test_sigterm_in_a_later_epoch_resumes_the_same_shuffle(demo_base, demo_data, tmp_path, monkeypatch):
    """In-process: SIGTERM during epoch 2 of a small folder; the resumed run redraws that epoch's order exactly."""
    import certify_zoo.conversion as convert_module
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.errors import ConversionInterrupted
    from certify_zoo.recipes import load_recipe

    data = tmp_path / "small"
    data.mkdir()
    for picture in sorted((demo_data / "train").rglob("*.png"))[:40]:  # 5 batches of 8 per epoch
        (data / picture.name).write_bytes(picture.read_bytes())

    def settings(out: Path, resume: bool = False) -> ConvertSettings:
        return ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data=str(data), out=str(out),
                                           max_steps=13, batch_size=8, reps=1, seed=5, checkpoint_every=0,
                                           check_images=0, checkpoint_minutes=0, resume=resume)

    convert(settings(tmp_path / "reference"))
    real = convert_module.boot_camp_step
    # caught: the step finishes, a checkpoint is written
    monkeypatch.setattr(convert_module, "boot_camp_step", sigterm_at_call(real, 8))
    with pytest.raises(ConversionInterrupted, match="stopped by SIGTERM at step 8 of 13"):
        convert(settings(tmp_path / "out"))
    monkeypatch.setattr(convert_module, "boot_camp_step", real)
    result = convert(settings(tmp_path / "out", resume=True))
    assert result.steps == 13 and result.images_seen == 13 * 8
    expected, got = _weights(tmp_path / "reference"), _weights(tmp_path / "out")
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) == 0.0


def test_a_signal_after_the_last_step_stops_at_once_and_resume_finishes_the_same_model(demo_base, tmp_path,
                                                                                      monkeypatch):
    """The end of a conversion (BatchNorm statistics, self-check, save) has no step boundary: a SIGTERM there was held
    for one that never came, so the self-check ran on for its minutes until SLURM's SIGKILL, and the steps since the
    last periodic checkpoint were lost. Now the trained state is saved before the end, a signal stops at once with
    exit 3, and --resume runs the end only, to the model an uninterrupted run saves."""
    import json

    import certify_zoo.conversion as convert_module
    from certify_zoo.errors import CertifyZooError, ConversionInterrupted

    _convert_in_process(demo_base, tmp_path / "reference")
    real, calls = convert_module.self_check, [0]

    def terminated_in_the_self_check(*args, **kwargs):
        calls[0] += 1
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "self_check", terminated_in_the_self_check)
    started = time.perf_counter()
    with pytest.raises(ConversionInterrupted, match=f"stopped by SIGTERM after the last step, before the model was "
                                                    f"saved; checkpoint saved in .*step-{STEPS:08d}") as stopped:
        _convert_in_process(demo_base, tmp_path / "out")
    assert stopped.value.exit_code == 3 and time.perf_counter() - started < 60
    assert not (tmp_path / "out" / "certify_zoo.json").exists()
    monkeypatch.setattr(convert_module, "self_check", real)
    text = _convert_in_process(demo_base, tmp_path / "out", resume=True)
    assert f"resuming from step-{STEPS:08d} (step {STEPS}" in text and "convert step" not in text  # the end only
    assert max_weight_difference(tmp_path / "out", _weights(tmp_path / "reference")) == 0.0
    reference, resumed = (json.loads((tmp_path / name / "certify_zoo.json").read_text())
                          for name in ("reference", "out"))
    assert resumed["calibration"] == reference["calibration"] and resumed["steps"] == STEPS
    assert not (tmp_path / "out" / "checkpoints").exists()

    # with checkpoints off nothing is kept: it says so, with the exit code of an interruption that saved nothing
    monkeypatch.setattr(convert_module, "self_check", terminated_in_the_self_check)
    settings = _settings(demo_base, tmp_path / "off")
    settings.checkpoint_every = 0
    with pytest.raises(CertifyZooError, match="checkpoints are off .* nothing was kept") as stopped:
        convert_module.convert(settings, console=Console(file=io.StringIO()))
    assert stopped.value.exit_code == 130 and calls[0] == 2


def _evaluation(demo_base, out, **overrides):
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    settings = dict(model=str(demo_base), data="demo", sigma=0.5, method="all", n=200, n0=20, max_images=48,
                    batch_size=8, audit="pgd", audit_steps=5, audit_restarts=1, out=str(out))
    return evaluate(EvaluateSettings(**{**settings, **overrides}))


def _certificates(result) -> dict:
    return {key: value for key, value in result.record.items() if key not in ("created", "run")}


def test_a_stopped_evaluation_resumes_to_the_records_of_an_uninterrupted_one(demo_base, tmp_path, monkeypatch):
    """A Monte-Carlo evaluation is hours at Cohen et al.'s sizes: SIGTERM keeps the rows so far (exit 3), a crash
    keeps those of the last periodic save, and --resume certifies the rest as an uninterrupted run does (each
    batch's noise is seeded by its first image). Another setting is refused in one line."""
    import certify_zoo.evaluation as evaluate_module
    from certify_zoo.errors import CertifyZooError, Interrupted

    reference = _evaluation(demo_base, tmp_path / "reference")
    real, calls = evaluate_module.gather_rows_into, [0]

    def stopped_at(batch, how):
        def gather(*args, **kwargs):
            calls[0] += 1
            if calls[0] == batch:
                if how == "SIGTERM":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    raise RuntimeError("the machine went away")
            return real(*args, **kwargs)
        calls[0] = 0
        return gather

    out = tmp_path / "stopped"
    monkeypatch.setattr(evaluate_module, "gather_rows_into", stopped_at(3, "SIGTERM"))
    with pytest.raises(Interrupted, match="after batch 3 of 6.*--resume"):
        _evaluation(demo_base, out)
    assert json.loads((out / "evaluate-partial" / "state.json").read_text())["batches_done"] == 3
    with pytest.raises(CertifyZooError, match="holds the results so far of a stopped evaluation: add --resume"):
        _evaluation(demo_base, out)  # the same command without --resume: what was kept is not replaced
    monkeypatch.setattr(evaluate_module, "SAVE_EVERY_MINUTES", 0.0)  # a save after every batch: as if minutes passed
    monkeypatch.setattr(evaluate_module, "gather_rows_into", stopped_at(2, "crash"))  # batch 5 of 6
    with pytest.raises(RuntimeError, match="went away"):
        _evaluation(demo_base, out, resume=True)
    assert json.loads((out / "evaluate-partial" / "state.json").read_text())["batches_done"] == 4
    monkeypatch.setattr(evaluate_module, "gather_rows_into", real)
    with pytest.raises(CertifyZooError, match="another sigma"):
        _evaluation(demo_base, out, resume=True, sigma=0.25)
    resumed = _evaluation(demo_base, out, resume=True)
    assert _certificates(resumed) == _certificates(reference)
    same = {key: torch.equal(value, reference.per_image[key]) or (value.is_floating_point() and torch.allclose(
        value, reference.per_image[key], rtol=0, atol=0, equal_nan=True)) for key, value in resumed.per_image.items()}
    assert same == dict.fromkeys(reference.per_image, True)  # NaN flip distances where PGD found no flip
    assert not (out / "evaluate-partial").exists() and (out / "certification.json").exists()
    monkeypatch.setattr(evaluate_module, "gather_rows_into", stopped_at(1, "SIGTERM"))  # the demo's: no --resume
    with pytest.raises(CertifyZooError, match="after batch 1 of 6; nothing kept$") as stopped:
        _evaluation(demo_base, tmp_path / "demo", resumable=False)
    assert stopped.value.exit_code == 130 and not (tmp_path / "demo" / "evaluate-partial").exists()


def test_a_full_disk_at_a_periodic_save_does_not_end_the_evaluation(demo_base, tmp_path, monkeypatch):
    """The rows so far are a safety copy: a full disk there ended the evaluation ('OSError: [Errno 28]') that could
    still have finished. It goes on with a warning; a stop then keeps nothing (exit 130) and says why."""
    import dataclasses
    import errno

    import certify_zoo.evaluation as evaluate_module
    from certify_zoo.errors import StoppedWithNothingKept
    from certify_zoo.evaluation import EvaluateSettings, evaluate
    from certify_zoo.partial import PartialEvaluation

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate_module, "SAVE_EVERY_MINUTES", 0.0)  # a save after every batch
    monkeypatch.setattr(PartialEvaluation, "save", full_disk)
    log = io.StringIO()
    settings = EvaluateSettings(model=str(demo_base), data="demo", sigma=0.5, method="deterministic", audit="none",
                                max_images=48, batch_size=8, out=str(tmp_path / "a"))
    done = evaluate(settings, console=Console(file=log, width=300))
    assert done.record["num_images"] == 48 and (tmp_path / "a" / "certification.json").is_file()
    warnings = [line for line in log.getvalue().splitlines() if "cannot keep the results so far" in line]
    assert len(warnings) == 6 and "no space left on the device (the evaluation goes on" in warnings[0], warnings

    monkeypatch.setattr(evaluate_module, "gather_rows_into", sigterm_at_call(evaluate_module.gather_rows_into, 2))
    with pytest.raises(StoppedWithNothingKept, match="after batch 2 of 6; nothing kept: the results so far could "
                                                     "not be written to .* \\(no space left on the device\\)$"):
        evaluate(dataclasses.replace(settings, out=str(tmp_path / "b")))


def test_a_resume_knows_the_model_by_its_content_not_its_file_times(demo_base, tmp_path, monkeypatch):
    """Partial results belong to the model files' content: other weights are refused in one line naming them, and
    the same weights copied anew (a new modification time, as on another disk) are resumed. Results kept by an
    earlier certify-zoo, which did not record the number of processes, are refused saying so."""
    import shutil

    import certify_zoo.evaluation as evaluate_module
    from safetensors.torch import load_file, save_file

    from certify_zoo.errors import CertifyZooError, Interrupted

    model, out = tmp_path / "model", tmp_path / "records"
    shutil.copytree(demo_base, model)
    real = evaluate_module.gather_rows_into
    monkeypatch.setattr(evaluate_module, "gather_rows_into", sigterm_at_call(real, 2))
    with pytest.raises(Interrupted):
        _evaluation(model, out, method="deterministic", audit="none")
    monkeypatch.setattr(evaluate_module, "gather_rows_into", real)
    weights = model / "model.safetensors"
    original = tmp_path / "original.safetensors"
    shutil.copy2(weights, original)
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights))
    with pytest.raises(CertifyZooError, match="made with another model files"):
        _evaluation(model, out, method="deterministic", audit="none", resume=True)
    shutil.copyfile(original, weights)  # the same bytes, written now
    os.utime(weights, ns=(time.time_ns() + 10**12,) * 2)
    state_file = out / "evaluate-partial" / "state.json"
    kept = state_file.read_text()
    state = json.loads(kept)
    del state["fingerprint"]["number of processes"]  # as an earlier certify-zoo kept it
    state_file.write_text(json.dumps(state))
    with pytest.raises(CertifyZooError, match=r"another number of processes \(kept by an earlier certify-zoo"):
        _evaluation(model, out, method="deterministic", audit="none", resume=True)
    state_file.write_text(kept)
    resumed = _evaluation(model, out, method="deterministic", audit="none", resume=True)
    assert resumed.record["num_images"] == 48 and not (out / "evaluate-partial").exists()


def test_a_checkpoint_keeps_the_names_of_unreadable_images_each_once_up_to_the_cap():
    """A resumed run had named only the unreadable images read after its restart, beside the count of all."""
    from dataclasses import asdict

    from certify_zoo.checkpoints import UNREADABLE_NAMES_KEPT, RunPosition

    position = RunPosition()
    position.note_unreadable([["a.png", "b.png"], ["a.png"]])  # two processes, one step
    position.note_unreadable([[f"x{i}.png" for i in range(2 * UNREADABLE_NAMES_KEPT)], []])
    assert position.unreadable_files[:3] == ["a.png", "b.png", "x0.png"]
    assert len(position.unreadable_files) == UNREADABLE_NAMES_KEPT
    assert RunPosition(**json.loads(json.dumps(asdict(position)))) == position
