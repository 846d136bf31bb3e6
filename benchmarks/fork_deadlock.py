"""Why multi-process runs start DataLoader workers by spawn on some Pythons, and what it costs.

    PYTHONPATH=. python benchmarks/fork_deadlock.py --python /path/to/python3.10 --python /path/to/python3.12 \
        --record docs/records/fork_deadlock.json
    PYTHONPATH=. python benchmarks/fork_deadlock.py --quick      # 500 forks, this Python only, 2 repeats

Deadlocks: each Python given runs a stdlib-only script in which two threads start native threads (pthread_create
through ctypes) that enter Python, as gloo's threads do to free a finished collective's tensors, while the main
thread forks children that exit at once. A child that has not exited 2 s after its fork is stuck (CPython
gh-112275: it inherited the runtime's HEAD_LOCK held and waits for it in PyOS_AfterFork_Child); it is killed and
counted. Each row also says what ``certify_zoo.data.fork_can_deadlock`` answers for that version.

Cost: on this Python, the time from ``iter(loader)`` to the first batch of an evaluation loader on the demo's test
digits (one worker, batch 32), its workers forked and spawned, interleaved, the median of the repeats.
"""
from __future__ import annotations

import argparse
import json
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
    pythons = args.python or [sys.executable]
    setup = (f"{forks} forks per Python while two threads start native threads that enter Python; a child not "
             f"exited 2 s after its fork counts as stuck. Cost: {repeats} interleaved repeats on Python "
             f"{sys.version.split()[0]}, the demo's test digits, one worker, batch 32")
    measured_on = provenance(f"PYTHONPATH=. python benchmarks/fork_deadlock.py --python P ... --forks {forks} "
                             f"--repeats {repeats} --record R", setup)
    rows = [deadlocks(python, forks) for python in pythons]
    times = {"fork": [], "spawn": []}
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
        "first_batch_seconds": cost,
        "summary": "; ".join(f"Python {row['python']}: {row['stuck']} of {row['forks']} children stuck"
                             for row in rows)
                   + f"; first batch {cost['fork']} s forked, {cost['spawn']} s spawned",
    }
    finish(record, args.record)


if __name__ == "__main__":
    main()
