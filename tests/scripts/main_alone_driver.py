"""Run under ``torchrun --nproc_per_node 2``: a conversion whose main process works alone after the last step (the
self-check, made slow here) for longer than the default process group's deadline, cut from torch's 30 minutes to
DEADLINE_SECONDS so that a test can outlast it. Arguments: BASE DATA CHECK_DATA OUT RESULT_JSON."""
from __future__ import annotations

import datetime
import json
import sys
import time

import torch
import torch.distributed.distributed_c10d as c10d

DEADLINE_SECONDS = 8
c10d.default_pg_timeout = datetime.timedelta(seconds=DEADLINE_SECONDS)  # read when Accelerate makes the group


def main() -> None:
    from certify_zoo import convert
    from certify_zoo.cli import app

    base, data, check_data, out, result = sys.argv[1:6]
    threads_in_self_check, original = [], convert.self_check

    def slow_self_check(*args, **kwargs):
        threads_in_self_check.append(torch.get_num_threads())
        time.sleep(DEADLINE_SECONDS + 4)
        return original(*args, **kwargs)

    convert.self_check = slow_self_check
    try:
        code = app(["convert", base, "--data", data, "--check-data", check_data, "--check-images", "20",
                    "--recipe", "demo", "--batch-size", "8", "--max-steps", "2", "--out", out],
                   standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
    with open(f"{result}.{rank}", "w") as handle:
        json.dump({"exit_code": code or 0, "threads_in_self_check": threads_in_self_check,
                   "threads_after": torch.get_num_threads()}, handle)


if __name__ == "__main__":
    main()
