"""An evaluation's results so far, kept beside its records so that a stopped one continues with --resume.

A Monte-Carlo evaluation at Cohen et al.'s sizes (n = 100,000 noisy forwards per image) runs for hours and is
preempted like any long job. Its per-image rows are small, so the main process writes them every
SAVE_EVERY_MINUTES and when a signal stops the run (every process stops at the same batch); --resume loads them
and skips the batches they cover (a stream seeks to where each process stood in it). Each batch's Monte-Carlo noise
and PGD starts are seeded by its first image, so a resumed evaluation certifies what an uninterrupted one would. The
folder is removed when the records are written.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CertifyZooError
from .export import sha256_of, write_json_atomic

PARTIAL_FOLDER = "evaluate-partial"
SAVE_EVERY_MINUTES = 10.0
ROWS_NAME, STATE_NAME = "rows.safetensors", "state.json"
PROCESSES = "number of processes"  # a fingerprint's key (evaluate.run_fingerprint), named when it differs


@dataclass
class Restored:
    columns: dict[str, list[torch.Tensor]]
    batches_done: int
    unreadable: list[str]
    streams: list[dict] | None  # a stream's place in each process (StreamPosition), None for a folder


def model_files(folder: str, records: tuple[str, ...]) -> list[list]:
    """Name, size and SHA-256 of a local model folder's json and safetensors files, but for the ``records`` an
    evaluation writes there: the model a partial result was made with (a Hub model's folder is its snapshot, fixed by
    its commit). The content, not the modification time: a folder copied to another disk, or touched, is the same
    model (hashing runs at about 1 GB/s, seconds against an evaluation's hours)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return []
    return [[p.name, p.stat().st_size, sha256_of(p)] for p in sorted(path.iterdir())
            if p.is_file() and p.suffix in (".json", ".safetensors") and p.name not in records]


@dataclass
class PartialEvaluation:
    """The partial results of one evaluation in ``folder`` (None: no records folder, nothing kept)."""

    folder: Path | None
    fingerprint: dict  # what defines the run: settings, model files, data size

    def save(self, columns: dict[str, list[torch.Tensor]], batches_done: int, unreadable: list[str],
             streams: list[dict] | None = None) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        rows = {key: torch.cat(parts).contiguous() for key, parts in columns.items() if parts}
        temporary = self.folder / f".{ROWS_NAME}.tmp"
        try:
            save_file(rows, str(temporary))
        except BaseException:  # a full disk: no half-written file left to fill it further
            temporary.unlink(missing_ok=True)
            raise
        # rows first: a stop between the two leaves rows beyond the state's batches, which the resumed run
        # certifies again to the same values (seeded per batch) and unique_by_index keeps once
        temporary.replace(self.folder / ROWS_NAME)
        write_json_atomic(self.folder / STATE_NAME, {"fingerprint": self.fingerprint, "batches_done": batches_done,
                                                     "rows": int(next(iter(rows.values())).shape[0]) if rows else 0,
                                                     "unreadable": unreadable, "streams": streams})

    def held(self) -> bool:
        return self.folder is not None and (self.folder / STATE_NAME).is_file()

    def load(self) -> Restored | None:
        """The saved rows (None when there are none); one line when they belong to another run."""
        from safetensors.torch import load_file

        if not self.held():
            return None
        state = json.loads((self.folder / STATE_NAME).read_text())
        saved, now = state.get("fingerprint", {}), json.loads(json.dumps(self.fingerprint))  # as json reads it back
        if saved != now:
            changed = sorted(key for key in set(saved) | set(now) if saved.get(key) != now.get(key))
            processes = ("" if PROCESSES not in changed else
                         f" (kept by {saved[PROCESSES]}, resumed by {now[PROCESSES]})" if PROCESSES in saved else
                         " (kept by an earlier certify-zoo, which did not record it)")
            raise CertifyZooError(f"--resume: the results in {self.folder} were made with another "
                                  f"{', '.join(changed)}{processes}: run the same command as before, or delete that "
                                  "folder to start over")
        rows = load_file(str(self.folder / ROWS_NAME)) if state["rows"] else {}
        return Restored({key: [value] for key, value in rows.items()}, state["batches_done"], state["unreadable"],
                        state["streams"])

    def remove(self) -> None:
        if self.folder is not None and self.folder.is_dir():
            shutil.rmtree(self.folder)
