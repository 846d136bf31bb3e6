"""Run under ``torchrun --nproc_per_node 2``: a conversion whose main process works longer than the other after
the last step, in its share of the self-check and in the save (both made slow here), for longer than the default
process group's deadline, cut from torch's 30 minutes to DEADLINE_SECONDS so that a test can outlast it.
Arguments: BASE DATA CHECK_DATA OUT RESULT_JSON."""
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
    from certify_zoo import conversion
    from certify_zoo.classifier import ImageClassifier
    from certify_zoo.cli import app

    base, data, check_data, out, result = sys.argv[1:6]
    threads_in_self_check, original_check, original_save = [], conversion.self_check, ImageClassifier.save

    def slow_on_the_main_process(work):
        def slow(*args, **kwargs):
            if torch.distributed.get_rank() == 0:
                time.sleep(DEADLINE_SECONDS + 4)
            return work(*args, **kwargs)
        return slow

    def self_check(*args, **kwargs):
        threads_in_self_check.append(torch.get_num_threads())
        return slow_on_the_main_process(original_check)(*args, **kwargs)

    conversion.self_check = self_check
    ImageClassifier.save = slow_on_the_main_process(original_save)
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
