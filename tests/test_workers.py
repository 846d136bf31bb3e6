"""DataLoader workers under a process group on a Python whose fork can deadlock (CPython gh-112275): spawned, with
stop signals blocked until they ignore them, and reading what forked workers read."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from certify_zoo.data import fork_can_deadlock
from conftest import REPO, free_port


def test_fork_can_deadlock_before_the_fixed_releases():
    """Fixed in 3.10.15, 3.11.10 and 3.12.0 (the release notes of gh-112275); benchmarks/fork_deadlock.py counts
    stuck children on each Python it is given."""
    assert [fork_can_deadlock(version) for version in [(3, 10, 13), (3, 10, 14), (3, 11, 7), (3, 11, 9)]] == [True] * 4
    assert not any(fork_can_deadlock(version) for version in [(3, 10, 15), (3, 11, 10), (3, 12, 0), (3, 13, 0)])


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

data.dataloader_workers = lambda: 1  # a worker even on a one-core machine
data.fork_can_deadlock = lambda: True  # as on Python 3.10.13 or 3.11.7, whatever this one is
transform = T.Compose([T.Resize(16), T.PILToTensor(), T.ConvertImageDtype(torch.float32)])

def read(source):
    loader = evaluation_loader(source, transform, [str(d) for d in range(10)], 10, batch_size=16, max_images=48).loader
    return [(batch.images, batch.labels) for batch in loader]

port, sources = sys.argv[1], sys.argv[2:]
before = data.worker_start_method()
forked = [read(source) for source in sources]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
under_group = data.worker_options()["multiprocessing_context"]
spawned = [read(source) for source in sources]
same = [len(a) == len(b) == 3 and all(torch.equal(x, z) and torch.equal(y, w) for (x, y), (z, w) in zip(a, b))
        for a, b in zip(forked, spawned)]
import multiprocessing
multiprocessing.set_start_method("forkserver", force=True)  # the script's own choice: left alone
print(json.dumps({"before": repr(before), "under_group": type(under_group).__name__,
                  "start_method": under_group.get_start_method(), "same": same,
                  "chosen_by_the_script": repr(data.worker_start_method())}))
"""


def test_under_a_process_group_workers_are_spawned_and_read_what_forked_ones_read(demo_data, tmp_path):
    """A folder and a stream (each pickled to reach its worker): the same batches as forked workers read. Not
    before the process group exists, nor where the script chose how its processes start."""
    from tiny_sources import digits_parquet

    stream = digits_parquet(tmp_path / "stream", demo_data, split="test", shards=2, limit=48)
    result = run_script(READ_UNDER_A_PROCESS_GROUP, str(free_port()), str(demo_data / "test"), str(stream))
    assert result == {"before": "None", "under_group": "SpawnWithStopSignalsBlocked", "start_method": "spawn",
                      "same": [True, True], "chosen_by_the_script": "None"}


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
