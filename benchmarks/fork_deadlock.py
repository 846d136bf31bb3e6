"""Why DataLoader workers are spawned on some Pythons and under a forkserver, and what it costs.

    PYTHONPATH=. python benchmarks/fork_deadlock.py --python /path/to/python3.10 --python /path/to/python3.12 \
        --record docs/records/fork_deadlock.json
    PYTHONPATH=. python benchmarks/fork_deadlock.py --quick      # 500 forks, this Python only, 2 repeats

Deadlocks: each Python given runs a stdlib-only script in which two threads start native threads (pthread_create
through ctypes) that enter Python, as gloo's threads do to free a finished collective's tensors, while the main
thread forks children that exit at once. A child that has not exited 2 s after its fork is stuck (CPython
gh-112275: it inherited the runtime's HEAD_LOCK held and waits for it in PyOS_AfterFork_Child); it is killed and
counted. Each row also says what ``certify_zoo.data.fork_can_deadlock`` answers for that version.

Orphans: where a forkserver is in force (Python 3.14's default on Linux), a script starts two loaders of one worker
each, certify-zoo's (``data.worker_options``) and a plain one, and is killed by SIGKILL: the workers still running
20 s later (8 s with --quick), and how long certify-zoo's took to end. torch's watchdog ends a worker whose parent
changed; a forkserver's worker is the server's child, and the server lives as long as its children (they hold its
pipe).

Cost: on this Python, the time from ``iter(loader)`` to the first batch of an evaluation loader on the demo's test
digits (one worker, batch 32), its workers forked, started by a forkserver and spawned, interleaved, the median of
the repeats.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from noisy_batch import finish, provenance  # noqa: E402

FORKS_WHILE_NATIVE_THREADS_ENTER_PYTHON = r"""
import ctypes, json, os, sys, threading, time
libc = ctypes.CDLL(None)
START = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
enter_python = START(lambda argument: None)  # a ctypes callback: the native thread takes a Python thread state
libc.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, START, ctypes.c_void_p]
libc.pthread_join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
done = False
def start_native_threads():
    while not done:
        thread = ctypes.c_ulong()
        libc.pthread_create(ctypes.byref(thread), None, enter_python, None)
        libc.pthread_join(thread.value, None)
for _ in range(2):
    threading.Thread(target=start_native_threads, daemon=True).start()
stuck = 0
for _ in range(int(sys.argv[1])):
    child = os.fork()
    if child == 0:
        os._exit(0)
    deadline = time.monotonic() + 2
    while not os.waitpid(child, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            stuck += 1
            os.kill(child, 9)
            os.waitpid(child, 0)
            break
        time.sleep(0.001)
done = True
print(json.dumps({"version": list(sys.version_info[:3]), "stuck": stuck}))
"""


def deadlocks(python: str, forks: int) -> dict:
    from certify_zoo.data import fork_can_deadlock

    run = subprocess.run([python, "-W", "ignore", "-c", FORKS_WHILE_NATIVE_THREADS_ENTER_PYTHON, str(forks)],
                         capture_output=True, text=True, check=True)
    result = json.loads(run.stdout.splitlines()[-1])
    version = tuple(result["version"])
    return {"python": ".".join(map(str, version)), "forks": forks, "stuck": result["stuck"],
            "fork_can_deadlock": fork_can_deadlock(version)}


WORKERS_OF_A_FORKSERVER_SCRIPT = """
import json, multiprocessing, time
import torch
from torch.utils.data import DataLoader, TensorDataset
from certify_zoo import data

if __name__ == "__main__":
    multiprocessing.set_start_method("forkserver")  # the script's choice, and Python 3.14's default on Linux
    dataset = TensorDataset(torch.arange(64.0))
    iterators = {"certify-zoo": iter(DataLoader(dataset, batch_size=8, **data.worker_options(workers=1))),
                 "plain forkserver": iter(DataLoader(dataset, batch_size=8, num_workers=1))}
    for iterator in iterators.values():
        next(iterator)
    print(json.dumps({name: [worker.pid for worker in iterator._workers] for name, iterator in iterators.items()}),
          flush=True)
    time.sleep(600)
"""


def running(pid: int) -> bool:
    """Whether process PID runs (a zombie has ended; Linux's /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def workers_after_sigkill(wait_seconds: float = 20) -> dict:
    """Run WORKERS_OF_A_FORKSERVER_SCRIPT, SIGKILL it once its loaders read, and watch their workers for
    WAIT_SECONDS: per loader, its workers, how many still run at the end, and when the last of them ended (None if
    one still runs). Whatever is left is killed with the script's process group."""
    script = subprocess.Popen([sys.executable, "-c", WORKERS_OF_A_FORKSERVER_SCRIPT], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        workers = json.loads(script.stdout.readline())
        os.kill(script.pid, signal.SIGKILL)
        script.wait()
        killed = time.monotonic()
        ended = {name: None for name in workers}
        while time.monotonic() - killed < wait_seconds and None in ended.values():
            for name, pids in workers.items():
                if ended[name] is None and not any(map(running, pids)):
                    ended[name] = round(time.monotonic() - killed, 1)
            time.sleep(0.1)
        return {name: {"workers": len(pids), "running": sum(map(running, pids)), "ended_after_s": ended[name]}
                for name, pids in workers.items()}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)  # the plain workers, and the server that waits for them


def first_batch_seconds(start_method: str) -> float:
    import torch
    import torchvision.transforms as T
    from torch.utils.data import DataLoader

    from certify_zoo.data import collate_skipping_unreadable, demo_folder, labelled_images

    transform = T.Compose([T.Resize(16), T.PILToTensor(), T.ConvertImageDtype(torch.float32)])
    dataset = labelled_images(str(demo_folder() / "test"), transform, [str(d) for d in range(10)], 10)
    loader = DataLoader(dataset, batch_size=32, num_workers=1, collate_fn=collate_skipping_unreadable,
                        multiprocessing_context=start_method)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    seconds = time.perf_counter() - start
    del iterator
    return seconds


def orphan_row(name: str, runs: list[dict]) -> list:
    ended = [run["ended_after_s"] for run in runs]
    return [name, len(runs), sum(run["workers"] for run in runs), sum(run["running"] for run in runs),
            max(ended) if None not in ended else "did not end"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", help="an interpreter to count deadlocks on (repeatable); "
                                                          "default: this one")
    parser.add_argument("--forks", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--record", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    forks, repeats = (500, 2) if args.quick else (args.forks, args.repeats)
    orphan_runs, orphan_wait = (1, 8) if args.quick else (repeats, 20)
    pythons = args.python or [sys.executable]
    setup = (f"{forks} forks per Python while two threads start native threads that enter Python; a child not "
             f"exited 2 s after its fork counts as stuck. On Python {sys.version.split()[0]}: orphans, {orphan_runs} "
             f"runs watched {orphan_wait} s after SIGKILL; cost, {repeats} interleaved repeats, the demo's test "
             "digits, one worker, batch 32")
    measured_on = provenance(f"PYTHONPATH=. python benchmarks/fork_deadlock.py --python P ... --forks {forks} "
                             f"--repeats {repeats} --record R", setup)
    rows = [deadlocks(python, forks) for python in pythons]
    orphans = [workers_after_sigkill(orphan_wait) for _ in range(orphan_runs)]
    times = {"fork": [], "forkserver": [], "spawn": []}
    for _ in range(repeats):
        for method in times:
            times[method].append(first_batch_seconds(method))
    cost = {method: round(statistics.median(values), 3) for method, values in times.items()}
    record = {
        "title": "Forks that deadlock while native threads enter Python, and what spawned workers cost",
        "provenance": measured_on,
        "deadlocks": {"columns": ["Python", "forks", "children stuck", "fork_can_deadlock"],
                      "rows": [[row["python"], row["forks"], row["stuck"], row["fork_can_deadlock"]]
                               for row in rows]},
        "orphans": {"columns": ["workers started by", "runs", "workers", f"still running {orphan_wait} s after SIGKILL",
                                "slowest to end (s)"],
                    "rows": [orphan_row(name, [run[name] for run in orphans]) for name in orphans[0]]},
        "first_batch_seconds": cost,
        "summary": "; ".join(f"Python {row['python']}: {row['stuck']} of {row['forks']} children stuck"
                             for row in rows)
                   + f"; first batch {cost['fork']} s forked, {cost['forkserver']} s from a forkserver, "
                     f"{cost['spawn']} s spawned",
    }
    finish(record, args.record)


if __name__ == "__main__":
    main()
