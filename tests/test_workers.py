"""How DataLoader workers start: forked where fork is in force and safe; otherwise spawned (under a process group on
a Python whose fork can deadlock, CPython gh-112275; or where a forkserver is in force), with stop signals blocked
until they ignore them, reading what forked workers read and ending with the main process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from certify_zoo.data import fork_can_deadlock
from conftest import REPO, error_line, free_port


def test_fork_can_deadlock_before_the_fixed_releases():
    """Fixed in 3.10.15, 3.11.10 and 3.12.0 (the release notes of gh-112275); benchmarks/fork_deadlock.py counts
    stuck children on each Python it is given."""
    assert [fork_can_deadlock(version) for version in [(3, 10, 13), (3, 10, 14), (3, 11, 7), (3, 11, 9)]] == [True] * 4
    assert not any(fork_can_deadlock(version) for version in [(3, 10, 15), (3, 11, 10), (3, 12, 0), (3, 13, 0)])


@pytest.mark.parametrize("chosen, default, can_deadlock, under_a_group, started_by", [
    (None, "fork", False, True, "the platform"),  # Linux before Python 3.14, fork fixed
    (None, "fork", True, False, "the platform"),  # an affected Python, one process
    (None, "fork", True, True, "SpawnWithStopSignalsBlocked"),  # an affected Python under torchrun
    ("fork", "forkserver", True, True, "SpawnWithStopSignalsBlocked"),
    ("fork", "forkserver", False, True, "the platform"),  # the script chose fork where it is safe
    (None, "forkserver", False, False, "SpawnWithStopSignalsBlocked"),  # Linux from Python 3.14
    ("forkserver", "fork", False, False, "SpawnWithStopSignalsBlocked"),
    (None, "spawn", False, False, "SpawnWithStopSignalsBlocked"),  # macOS: the same method, signals blocked
])
def test_how_workers_start(monkeypatch, chosen, default, can_deadlock, under_a_group, started_by):
    """Forked where fork is in force and safe; otherwise spawned, with stop signals blocked while they start."""
    import multiprocessing

    import torch.distributed

    from certify_zoo import data

    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: chosen)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: [default, "spawn"])
    monkeypatch.setattr(data, "fork_can_deadlock", lambda: can_deadlock)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: under_a_group)
    context = data.worker_start_method()
    assert (type(context).__name__ if context else "the platform") == started_by
    if context:
        assert context.get_start_method() == "spawn"


def run_script(script: str, *arguments: str) -> dict:
    """SCRIPT in a fresh Python in a session of its own (what it signals stays there): its last line, as JSON."""
    run = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


READ_UNDER_A_PROCESS_GROUP = """
import json, sys
import torch, torch.distributed as dist
import torchvision.transforms as T
from certify_zoo import data
from certify_zoo.data_sources import evaluation_loader

data.fork_can_deadlock = lambda: True  # as on Python 3.10.13 or 3.11.7, whatever this one is
transform = T.Compose([T.Resize(16), T.PILToTensor(), T.ConvertImageDtype(torch.float32)])

def read(source):
    loader = evaluation_loader(source, transform, [str(d) for d in range(10)], 10, batch_size=16, max_images=48,
                               workers=1).loader
    return [(batch.images, batch.labels) for batch in loader]

port, sources = sys.argv[1], sys.argv[2:]
before = data.worker_start_method()
forked = [read(source) for source in sources]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
under_group = data.worker_options(workers=1)["multiprocessing_context"]
spawned = [read(source) for source in sources]
same = [len(a) == len(b) == 3 and all(torch.equal(x, z) and torch.equal(y, w) for (x, y), (z, w) in zip(a, b))
        for a, b in zip(forked, spawned)]
import multiprocessing
multiprocessing.set_start_method("spawn", force=True)  # the script's own choice: the same method, signals blocked
print(json.dumps({"before": repr(before), "under_group": type(under_group).__name__,
                  "start_method": under_group.get_start_method(), "same": same,
                  "chosen_by_the_script": type(data.worker_start_method()).__name__}))
"""


def test_under_a_process_group_workers_are_spawned_and_read_what_forked_ones_read(demo_data, tmp_path):
    """A folder and a stream (each pickled to reach its worker): the same batches as forked workers read. Not
    before the process group exists."""
    from tiny_sources import digits_parquet

    stream = digits_parquet(tmp_path / "stream", demo_data, split="test", shards=2, limit=48)
    result = run_script(READ_UNDER_A_PROCESS_GROUP, str(free_port()), str(demo_data / "test"), str(stream))
    assert result == {"before": "None", "under_group": "SpawnWithStopSignalsBlocked", "start_method": "spawn",
                      "same": [True, True], "chosen_by_the_script": "SpawnWithStopSignalsBlocked"}


SIGNAL_WHILE_WORKERS_START = """
import json, os, signal, sys
import torch
from torch.utils.data import DataLoader, TensorDataset
from certify_zoo.stopping import SpawnWithStopSignalsBlocked, StopSignals, ignore_stop_signals

if __name__ == "__main__":
    context = SpawnWithStopSignalsBlocked() if sys.argv[1] == "blocked" else "spawn"
    loader = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=8, num_workers=1,
                        multiprocessing_context=context, worker_init_fn=ignore_stop_signals)
    with StopSignals() as stop:
        iterator = iter(loader)  # the worker is started, still importing torch
        os.killpg(0, signal.SIGTERM)  # as torchrun stops a run: every process of the group
        try:
            outcome = f"{sum(1 for _ in iterator)} batches"
        except RuntimeError as error:
            outcome = str(error).split(" (pid")[0]
    print(json.dumps({"outcome": outcome, "requested": stop.requested}))
"""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_a_stop_signal_while_a_spawned_worker_starts_is_left_to_the_main_process():
    """A spawned worker imports torch for seconds before its worker_init_fn ignores stop signals: SIGTERM then
    killed it and the loader failed (plain spawn, below); started with them blocked, the worker reads every batch
    and the main process alone holds the request, to stop at its next step."""
    assert run_script(SIGNAL_WHILE_WORKERS_START, "plain") == {"outcome": "DataLoader worker",
                                                               "requested": "SIGTERM"}
    assert run_script(SIGNAL_WHILE_WORKERS_START, "blocked") == {"outcome": "8 batches", "requested": "SIGTERM"}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_workers_end_with_a_killed_main_process_where_a_forkserver_is_in_force():
    """Under a forkserver, a worker is the server's child, and torch's watchdog (which waits for the parent to change)
    never noticed the main process die: after SIGKILL, plain forkserver workers ran on. certify-zoo's spawned
    workers are the main process's children and end within torch's check interval (5 s)."""
    from benchmarks.fork_deadlock import workers_after_sigkill

    left = workers_after_sigkill(wait_seconds=10)
    assert {name: (loader["workers"], loader["running"]) for name, loader in left.items()} == {
        "certify-zoo": (1, 0), "plain forkserver": (1, 1)}
    assert left["certify-zoo"]["ended_after_s"] <= 10 and left["plain forkserver"]["ended_after_s"] is None


@pytest.mark.parametrize("cores, everywhere, processes, expected", [
    (16, 16, None, 8),  # one process: all but one core, at most 8
    (64, 64, "8", 7),  # torchrun, 8 processes on the node: 8 cores each
    (16, 16, "4", 3),
    (2, 2, "2", 0),  # this machine under torchrun: each process decodes its own images
    (4, 16, "4", 3),  # a process bound to 4 cores (torchrun --numa-binding, taskset) shares only those
    (1, 1, None, 0),
])
def test_worker_count_shares_the_machine_among_its_processes(monkeypatch, cores, everywhere, processes, expected):
    from certify_zoo.data import dataloader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: everywhere)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert dataloader_workers() == expected
    assert dataloader_workers(requested=3) == 3 and dataloader_workers(requested=0) == 0  # --workers


class DiesInItsWorker(torch.utils.data.Dataset):
    """64 numbers; in a DataLoader worker, reading the 20th sends the worker SIGNUM."""

    def __init__(self, signum: int):
        self.signum = signum

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 20 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), self.signum)
        return torch.tensor(float(index))


@pytest.fixture
def sigchld_restored():
    """The guard quiets torch's SIGCHLD check for the rest of the process: given back after the test (a test that
    killed a worker must take it off the check first)."""
    handler = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, handler)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers, Linux's signals")
@pytest.mark.parametrize("signum, said", [(9, "out-of-memory killer"), (7, "shared memory (/dev/shm) full"),
                                          (11, "(a crash)")])
@pytest.mark.usefixtures("sigchld_restored")
def test_a_worker_that_died_is_one_line_saying_how_and_what_to_change(signum, said):
    """SIGKILL (the OOM killer), SIGBUS (shared memory full, Docker's 64 MB) and SIGSEGV (a decoder's crash) in a real
    worker: torch raised a RuntimeError, which the CLI printed as a bug (exit 1)."""
    from certify_zoo.errors import CertifyZooError
    from certify_zoo.guards import dataloader_workers_died

    batches = iter(torch.utils.data.DataLoader(DiesInItsWorker(signum), batch_size=4, num_workers=1,
                                               multiprocessing_context="fork"))
    try:
        with pytest.raises(CertifyZooError) as raised, dataloader_workers_died("ADVICE"):
            for _ in batches:
                pass
    finally:
        # takes the dead worker off torch's SIGCHLD check, which the fixture gives back: left on it, the next SIGCHLD
        # of this test process raised the worker's death wherever the process was (pytest-xdist's loop, once)
        batches._shutdown_workers()
    message = str(raised.value)
    assert message.startswith(("a DataLoader worker (pid ", "a DataLoader worker, which"))
    assert message.endswith("; ADVICE")
    # torch names the signal where its SIGCHLD check saw the death before the loader's own check found the worker
    # gone, or before the main process, taking a batch over from the worker, found its connection reset
    assert said in message or "died: killed (on Linux often by the out-of-memory killer" in message, message


@pytest.mark.usefixtures("sigchld_restored")
def test_a_reset_connection_is_a_dead_worker_only_where_a_batch_is_taken_over_from_it():
    """A worker that dies while the main process takes a batch's tensors over from it resets the connection to it
    (seen in a full run of the test above, SIGSEGV); a reset connection elsewhere (a stream's download) is not a
    worker's, and stays what it is."""
    from certify_zoo.errors import CertifyZooError
    from certify_zoo.guards import dataloader_workers_died

    scope: dict = {}
    exec(compile("def take_over():\n    raise ConnectionResetError(104, 'Connection reset by peer')\n",
                 "/usr/lib/python3.11/multiprocessing/resource_sharer.py", "exec"), scope)
    with pytest.raises(CertifyZooError, match=r"^a DataLoader worker, which decodes images, died: .* while it handed "
                                              r"a batch over \(ConnectionResetError\); ADVICE$"):
        with dataloader_workers_died("ADVICE"):
            scope["take_over"]()
    with pytest.raises(ConnectionResetError), dataloader_workers_died("ADVICE"):
        raise ConnectionResetError(104, "Connection reset by peer")


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="POSIX's SIGCHLD")
@pytest.mark.usefixtures("sigchld_restored")
def test_torchs_check_raising_while_the_guard_says_a_death_is_said_too_and_then_quiet(monkeypatch):
    """torch's SIGCHLD check raises at whatever the main process runs next: once in a full suite it raised while the
    guard was reading a reset connection's traceback, and its RuntimeError replaced the guard's line. Now the late
    error is said instead, and the check is quiet afterwards (it would raise again at the next SIGCHLD)."""
    from certify_zoo import guards
    from certify_zoo.errors import CertifyZooError

    said = guards.worker_death
    calls = []

    def interrupted(exc):
        calls.append(exc)
        if len(calls) == 1:  # the check fires here
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that "
                               "dataloader's workers are out of shared memory.")
        return said(exc)

    monkeypatch.setattr(guards, "worker_death", interrupted)
    with pytest.raises(CertifyZooError, match=r"^a DataLoader worker \(pid 4242\), which decodes images, was killed by "
                                              r"signal Bus error \(SIGBUS: .*\); ADVICE$"):
        with guards.dataloader_workers_died("ADVICE"):
            raise ConnectionResetError(104, "Connection reset by peer")
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="POSIX's SIGCHLD")
@pytest.mark.usefixtures("sigchld_restored")
def test_a_dead_worker_outside_the_loops_guard_is_one_line_too(monkeypatch, short_conversion):
    """torch's check can raise after the loop's guard, wherever the command is: the CLI says it in one line, exit 2
    (it printed torch's RuntimeError as a bug, exit 1)."""
    from typer.testing import CliRunner

    from certify_zoo import evaluation as evaluate_module
    from certify_zoo.cli import app

    def dies(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(evaluate_module, "evaluate", dies)
    result = CliRunner().invoke(app, ["evaluate", str(short_conversion), "--data", "demo", "--max-images", "8"])
    assert result.exit_code == 2, result.output
    assert error_line(result.stderr) == (
        "Error: a DataLoader worker (pid 4242), which decodes images, was killed by signal Killed (SIGKILL: on Linux "
        "usually the out-of-memory killer; fewer --workers, or 0, and a smaller --batch-size need less memory); what "
        "the run kept stays: --resume continues it")


def test_workers_change_neither_the_weights_nor_the_certificates(demo_base, short_conversion, tmp_path):
    """--workers only moves the decoding: 0 (in the process) and 1 (a worker) give the same conversion and the same
    certificates."""
    from safetensors.torch import load_file

    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.evaluation import EvaluateSettings, evaluate
    from certify_zoo.recipes import load_recipe

    weights, certificates = [], []
    for workers in (0, 1):
        out = tmp_path / f"workers{workers}"
        convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                            max_steps=4, check_images=0, workers=workers))
        weights.append(load_file(out / "model.safetensors"))
        evaluation = evaluate(EvaluateSettings(model=str(short_conversion), data="demo", max_images=48, batch_size=16,
                                               method="deterministic", audit="none", write=False, workers=workers))
        certificates.append((evaluation.record["certificates"], evaluation.per_image))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    (record, per_image), (record_with_a_worker, per_image_with_a_worker) = certificates
    assert record == record_with_a_worker and per_image.keys() == per_image_with_a_worker.keys()
    assert all(torch.equal(per_image[key], per_image_with_a_worker[key]) for key in per_image)
    assert len(per_image["label"]) == 48


def test_a_conversion_whose_worker_died_ends_in_one_line(demo_base, tmp_path, monkeypatch):
    """The guard is around the conversion's loop: a worker killed mid-run (as the OOM killer would) ends it with
    the line that says so, and --out holds no model. torch's SIGCHLD check stays quiet in this test process after
    it (no sigchld_restored): the conversion's loader, out of reach here, still holds the dead worker."""
    from certify_zoo import data
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.errors import CertifyZooError
    from certify_zoo.recipes import load_recipe

    read = data.ImageFiles.__getitem__
    reads = [0]

    def dies_at_the_100th(self, index):
        reads[0] += 1  # counted in the worker's own copy
        if reads[0] == 100 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), 9)
        return read(self, index)

    monkeypatch.setattr(data.ImageFiles, "__getitem__", dies_at_the_100th)
    out = tmp_path / "out"
    # the pid where torch's message names it; none where the worker died handing a batch over (a reset connection)
    with pytest.raises(CertifyZooError, match=r"^a DataLoader worker( \(pid \d+\))?, which decodes images, .*; its "
                                              r"last checkpoint, if any, is kept: --resume continues it$"):
        convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                            max_steps=40, check_images=0, workers=1))
    assert not (out / "model.safetensors").exists()
