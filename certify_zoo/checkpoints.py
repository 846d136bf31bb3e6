"""Checkpoints and resume for a conversion, on Accelerate's ``save_state`` / ``load_state``.

Layout of an unfinished output folder::

    OUT/checkpoints/run.json              the settings the run started with (to refuse a mismatched --resume)
    OUT/checkpoints/step-00000012/        accelerate's state: model.safetensors, optimizer.bin, random_states_*.pkl
                                          + position.json (step, epoch, batches consumed, counters)
                                          + manifest.json (size and sha256 of every file, HMAC-signed)

A checkpoint is written under ``.tmp-step-...`` and renamed when complete, so a crash mid-write leaves the
previous one valid; on resume a checkpoint whose files do not match its manifest (truncated, damaged) is
skipped with a warning and the one before it is used. Accelerate pickles the optimizer and RNG state (it loads
them with ``torch.load(weights_only=True)``); we additionally only load a checkpoint whose manifest carries this
account's signature, i.e. one certify-zoo wrote here. When the run finishes the folder is removed: a published
output never carries pickles.

Data position: a folder's order is drawn from the loader's seeded generator; its state at the start of the epoch is
part of the position, so resuming restores it and calls ``skip_first_batches(batches consumed)``: exactly the images
not yet seen, in the same order. A stream (``data_sources.StreamLoader``) keeps its own position per process: the
checkpoint stores where each process stands (the start of its current shuffle window as ``datasets``' state_dict,
and the rows of that window already consumed), and resuming seeks there: exact (the windows are shuffled by
seeded permutations, not by a buffer whose content would be lost) and fast (nothing consumed is read again but
the current window's first rows).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .distributed import decided_by_main, gather_per_process, on_any_process
from .errors import CertifyZooError, disk_errors
from .export import (CHECKPOINTS_DIR, METADATA_NAME, RUN_RECORD, OutputLock, can_write_in, check_output_folder,
                     empty_folder, prepare_output_folder, read_json, sha256_of, write_json_atomic)
from .guards import require_finite_parameters
from .security import CACHE_VARIABLE, KEY_FILE, checkpoint_key, key_path, sign, verify

# a folder holding one of these was made by a conversion (finished, or not): only such a folder --overwrite replaces
OUR_FILES = (METADATA_NAME, f"{CHECKPOINTS_DIR}/{RUN_RECORD}")
MANIFEST = "manifest.json"
POSITION = "position.json"
PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
MANIFEST_FORMAT = 1

# Settings that define the data stream, the noise model or the model: a resumed run that changes one of these
# would not be the same conversion (sigma is what every certificate is stated for). Anything else (lr, gamma, ...)
# may change on resume, e.g. to continue from the last good checkpoint after a divergence; it is listed as a warning.
FIXED_ON_RESUME = ("model", "revision", "data", "objective.sigma", "batch_size", "grad_accum", "seed", "processes")
IGNORED_ON_RESUME = ("out", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "collapse_threshold")
NOT_IN_A_FINISHED_RESULT = ("strict",)  # settings that change how a run reads, not what it made


@dataclass
class CheckpointPolicy:
    every_steps: int = 0  # 0: off
    every_minutes: float = 10.0  # 0: off
    keep: int = 2

    def validate(self) -> None:
        if self.every_steps < 0 or self.every_minutes < 0:
            raise CertifyZooError("--checkpoint-every and --checkpoint-minutes must be >= 0 (0 turns them off)")
        if self.keep < 1:
            raise CertifyZooError(f"--keep-checkpoints must be at least 1, got {self.keep}")


UNREADABLE_NAMES_KEPT = 100


@dataclass
class RunPosition:
    """Where a run stands after a completed optimiser step: enough to continue it exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # loader batches this process consumed in `epoch`
    micro_steps: int = 0  # loader batches consumed over the whole run: keys the noise draws (draws.keyed_draws)
    images_seen: int = 0
    skipped_images: int = 0  # reads of unreadable images, every process and pass
    unreadable_files: list[str] = field(default_factory=list)  # their names, each once, every process (first 100)
    recent_agreement: list[float] = field(default_factory=list)
    collapse_warned: bool = False
    seconds: float = 0.0  # training time spent before this session
    rng_fingerprint: str = ""  # sha256 of torch's RNG state at save: checked after load
    epoch_generator_state: str = ""  # the data loader's generator at the start of `epoch` (hex): its shuffle order
    generator_state: str = ""  # the data loader's generator when saved (hex): what a run resumed after its last step
    # draws next (its BatchNorm statistics' batches), as the uninterrupted run did
    gamma_controller: dict = field(default_factory=dict)  # smoothness.GammaController.state_dict() (--gamma auto)
    clip_state: dict = field(default_factory=dict)  # clipping.MedianNormClip.state_dict() (median clip)
    streams: list[dict] = field(default_factory=list)  # a stream's position in each process (StreamLoader)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_in_epoch = 0

    def note_unreadable(self, per_process: list[list[str]]) -> None:
        """Add a step's unreadable images, each process's names, to the run's list: each once, the first
        UNREADABLE_NAMES_KEPT (a stream of millions may hold many; the count is skipped_images)."""
        for names in per_process:
            for name in names:
                if name not in self.unreadable_files and len(self.unreadable_files) < UNREADABLE_NAMES_KEPT:
                    self.unreadable_files.append(name)


def generator_state(loader) -> str:
    """The state of a data loader's shuffling generator, as hex ("" for a loader without one, such as a stream)."""
    generator = getattr(loader, "generator", None)
    return generator.get_state().numpy().tobytes().hex() if generator is not None else ""


def set_generator_state(loader, state: str) -> None:
    """Put back a state from generator_state (nothing for "" or a loader without a generator)."""
    generator = getattr(loader, "generator", None)
    if generator is not None and state:
        generator.set_state(torch.frombuffer(bytearray(bytes.fromhex(state)), dtype=torch.uint8))


def flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_differences(saved: dict, current: dict, ignored: tuple[str, ...] = IGNORED_ON_RESUME
                         ) -> tuple[list[str], list[str]]:
    """(fixed settings that differ, other settings that differ), each as 'name: saved -> current'; the
    ``ignored`` settings are not compared."""
    old, new = flatten(saved), flatten(current)
    fixed, other = [], []
    for key in sorted(set(old) | set(new)):
        if key in ignored or old.get(key) == new.get(key):
            continue
        line = f"{key.removeprefix('objective.')}: {old.get(key)!r} -> {new.get(key)!r}"
        (fixed if key in FIXED_ON_RESUME else other).append(line)
    return fixed, other


def _rng_fingerprint() -> str:
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()


def _canonical(manifest: dict) -> bytes:
    return json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True).encode()


def write_manifest(folder: Path, step: int) -> None:
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_of(p, sync=True)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    manifest["signature"] = sign(_canonical(manifest))
    write_json_atomic(folder / MANIFEST, manifest)


def checkpoint_problem(folder: Path) -> str | None:
    """Why this checkpoint can not be used, or None. Raises if it was not written by us (never unpickle it)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    had_key = key_path().is_file()
    if not isinstance(manifest, dict) or not verify(_canonical(manifest), str(manifest.get("signature", ""))):
        raise foreign_checkpoint(folder, had_key)
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, expected {expected['size']}"
        if sha256_of(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def foreign_checkpoint(folder: Path, had_key: bool) -> CertifyZooError:
    """The refusal of a checkpoint another key signed, with how to carry the key of the run that wrote it."""
    key = key_path()
    found = "" if had_key else " (created just now: this home had none, as on a new node or in a fresh container)"
    return CertifyZooError(
        f"checkpoint {folder} was not written by certify-zoo on this account: its signature does not match the "
        f"signing key {key}{found}. To resume a run from another machine or home, copy {KEY_FILE} from the "
        f"{CACHE_VARIABLE} folder where it was written (default ~/.cache/certify-zoo) to {key.parent}, or set "
        f"{CACHE_VARIABLE} to that folder; a checkpoint you did not write is never unpickled, so otherwise start "
        "again with --overwrite")


class CheckpointStore:
    """OUT/checkpoints for one run: decides fresh / resume / finished, saves, restores, prunes."""

    def __init__(self, accelerator, out: Path, policy: CheckpointPolicy, say: Callable[..., None]):
        self.accelerator = accelerator
        self.out = Path(out)
        self.folder = self.out / CHECKPOINTS_DIR
        self.policy = policy
        self.say = say
        self._last_save = time.monotonic()
        self.restored: Path | None = None  # the checkpoint this run resumed from
        self._stream = None  # the StreamLoader being consumed, whose position each checkpoint records

    # ------------------------------------------------------------ starting a run

    def lock(self, output_lock: OutputLock) -> None:
        """Take OUT's lock on the main process, before anything in OUT is read or changed; refused everywhere when
        another run holds it."""
        self._decided_by_main(lambda: output_lock.acquire(self.out))

    def begin(self, record: dict, resume: bool, overwrite: bool) -> dict | None:
        """Prepare OUT on the main process. Returns the finished run's metadata when there is nothing to redo."""
        return self._decided_by_main(lambda: self._begin_main(record, resume, overwrite)) or None

    def refuse_new_run(self) -> None:
        """Raise if a new run (no --resume, no --overwrite) would have to replace something in OUT; touches nothing.

        The main process looks and tells the others: another process looking by itself could find OUT half-made by
        the main process's ``begin`` for this very run (the folder made, its run record not yet written), refuse it
        as a foreign folder and strand the main process at its next collective (a two-process CI run did)."""
        self._decided_by_main(self._refuse_new_run_here)

    def _decided_by_main(self, decide: Callable[[], Any]) -> Any:
        return decided_by_main(self.accelerator, decide)

    def _begin_main(self, record: dict, resume: bool, overwrite: bool) -> dict:
        if resume and overwrite:
            raise CertifyZooError("pass either --resume (continue the run in --out) or --overwrite (start again), "
                                  "not both")
        if self.policy.every_steps or self.policy.every_minutes:
            checkpoint_key()  # made now: a cache that cannot hold it is said before OUT is made, not at a save
        if resume and not can_write_in(self.out):  # a new run's folder is checked with the others below
            raise CertifyZooError(f"output folder {self.out} cannot be written (a read-only file system, or no "
                                  "permission): nothing can be resumed there")
        run_file = self.folder / RUN_RECORD
        if not resume:
            if not overwrite:
                self._refuse_new_run_here()
            if os.path.isfile(run_file) and not overwrite and self._only_an_aborted_start():
                empty_folder(self.out)  # a run that failed before its first checkpoint: nothing to lose
            prepare_output_folder(self.out, overwrite, OUR_FILES)
            self._start_fresh(record)
            return {}
        if not self.out.exists() or (self.out.is_dir() and not any(self.out.iterdir())):
            self.say(f"nothing to resume in {self.out}: starting a new conversion")
            prepare_output_folder(self.out, False)
            self._start_fresh(record)
            return {}
        finished = read_json(self.out / METADATA_NAME) if (self.out / METADATA_NAME).is_file() else None
        saved = (finished or {}).get("settings") if finished else read_json(run_file).get("settings")
        if saved is None:
            raise CertifyZooError(f"{self.out} is not a certify-zoo conversion (no {CHECKPOINTS_DIR}/{RUN_RECORD} "
                                  f"or {METADATA_NAME}): nothing to resume; choose another --out")
        ignored = IGNORED_ON_RESUME
        if finished is not None:
            saved = {**saved, "processes": finished.get("hardware", {}).get("processes")}
            ignored += NOT_IN_A_FINISHED_RESULT
        fixed, other = settings_differences(saved, record, ignored)
        if fixed:
            raise CertifyZooError(f"cannot resume {self.out}: these settings differ from the run's "
                                  f"({'; '.join(fixed)}); rerun with the original values, or start again "
                                  "with --overwrite")
        if finished is not None:
            if other:  # the run is over (its schedule ended): what was asked for now would not happen
                raise CertifyZooError(f"cannot resume {self.out}: it is a finished conversion "
                                      f"({finished.get('steps')} steps), and these settings differ from its "
                                      f"({'; '.join(other)}); a finished run is not continued: convert again "
                                      "with --overwrite, or rerun with its values")
            self.say(f"{self.out} is already converted ({finished.get('steps')} steps): nothing to redo "
                     "(pass --overwrite to convert again)")
            shutil.rmtree(self.folder, ignore_errors=True)  # left behind if a crash hit the final cleanup
            return finished
        if other:
            self.say(f"[yellow]resuming with changed settings: {'; '.join(other)}[/]")
        for stale in self.folder.glob(f"{TEMP_PREFIX}*"):  # half-written by a crash: never valid
            shutil.rmtree(stale, ignore_errors=True)
        return {}

    def _refuse_new_run_here(self) -> None:
        """refuse_new_run as this process sees OUT."""
        # os.path: OUT in a folder that cannot be entered is not there, and check_output_folder says why
        started = os.path.isfile(self.folder / RUN_RECORD)
        if started and not self._only_an_aborted_start():
            newest = self._checkpoint_names()
            where = f" (checkpoint at step {int(newest[-1][len(PREFIX):])})" if newest else ""
            raise CertifyZooError(f"output folder {self.out} holds an unfinished conversion{where}: continue "
                                  "it with --resume, or pass --overwrite to start again")
        if not started:
            check_output_folder(self.out, overwrite=False, ours=OUR_FILES)

    def _only_an_aborted_start(self) -> bool:
        """OUT holds nothing but the run record (and half-written checkpoints, never valid)."""
        for path in self.out.rglob("*"):
            relative = path.relative_to(self.out).parts
            if relative in ((CHECKPOINTS_DIR,), (CHECKPOINTS_DIR, RUN_RECORD)):
                continue
            if len(relative) >= 2 and relative[0] == CHECKPOINTS_DIR and relative[1].startswith(TEMP_PREFIX):
                continue
            return False
        return True

    def _start_fresh(self, record: dict) -> None:
        with disk_errors(f"{self.folder / RUN_RECORD}", ", or choose another --out"):
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.folder / RUN_RECORD, {"settings": record})

    # ------------------------------------------------------------ restoring

    def _checkpoint_names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))

    def newest_valid(self) -> Path | None:
        """The newest checkpoint whose files match its manifest; damaged ones are reported and skipped."""
        for name in reversed(self._checkpoint_names()):
            problem = checkpoint_problem(self.folder / name)
            if problem is None:
                return self.folder / name
            self.say(f"[yellow]checkpoint {name} is incomplete or damaged ({problem}): using the one before it[/]")
        return None

    def restore(self) -> RunPosition:
        """Load the newest valid checkpoint into the prepared objects (all processes); a fresh position if none."""
        from accelerate.utils import broadcast_object_list

        chosen: list[Any] = [None]
        if self.accelerator.is_main_process:
            newest = self.newest_valid()
            chosen[0] = str(newest) if newest else None
        if self.accelerator.num_processes > 1:
            broadcast_object_list(chosen)
        if chosen[0] is None:
            return RunPosition()
        folder = Path(chosen[0])
        self.accelerator.load_state(str(folder))
        self.restored = folder
        position = RunPosition(**json.loads((folder / POSITION).read_text()))
        if self.accelerator.is_main_process and position.rng_fingerprint != _rng_fingerprint():
            raise CertifyZooError(f"could not restore the random state from {folder}: the resumed run would not "
                                  "match an uninterrupted one; start again with --overwrite")
        self.say(f"resuming from {folder.name} (step {position.step}, epoch {position.epoch + 1}, "
                 f"{position.images_seen} images seen)")
        self._last_save = time.monotonic()
        return position

    def epoch_batches(self, loader, position: RunPosition):
        """The loader for `position.epoch`, without the batches this process already consumed in it.

        The shuffle order comes from the loader's generator: its state at the start of the epoch is kept in the
        position, and restored on resume, so the epoch is drawn again in the same order before the skip.
        """
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(position.epoch)
        if hasattr(loader, "position_after"):  # a stream: it seeks to where this process stood
            self._stream = loader
            if position.batches_in_epoch and position.streams:
                loader.resume(position.streams[self.accelerator.process_index])
            return loader
        if position.batches_in_epoch == 0:
            position.epoch_generator_state = generator_state(loader)
            return loader
        set_generator_state(loader, position.epoch_generator_state)
        return self.accelerator.skip_first_batches(loader, position.batches_in_epoch)

    # ------------------------------------------------------------ saving

    def due(self, step: int, stop_requested: bool) -> tuple[bool, bool]:
        """(save now, stop now), agreed by every process (a signal may reach only one of them)."""
        minutes = self.policy.every_minutes
        due = bool(self.policy.every_steps and step % self.policy.every_steps == 0)
        due = due or bool(minutes and time.monotonic() - self._last_save >= 60 * minutes)
        due, stop_requested = on_any_process([due, stop_requested], self.accelerator)
        return due or stop_requested, stop_requested

    def save(self, position: RunPosition, model) -> Path:
        """Write a complete checkpoint atomically (all processes take part), then prune old ones."""
        accelerator = self.accelerator
        require_finite_parameters(accelerator.unwrap_model(model).parameters(), position.step)
        name = f"{PREFIX}{position.step:08d}"
        final, temp = self.folder / name, self.folder / f"{TEMP_PREFIX}{name}"
        advice = self.resume_advice()
        if accelerator.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
            with disk_errors(f"checkpoint {final}", advice):  # a disk remounted read-only refuses the folder first
                temp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if self._stream is not None:
            position.streams = gather_per_process(self._stream.position_after(position.batches_in_epoch),
                                                  accelerator)
        position.rng_fingerprint = _rng_fingerprint()
        try:
            with disk_errors(f"checkpoint {final}", advice):
                accelerator.save_state(str(temp), safe_serialization=True)
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    write_json_atomic(temp / POSITION, asdict(position))
                    write_manifest(temp, position.step)
                    if final.exists():  # the same step saved before (e.g. resumed and stopped again at once)
                        shutil.rmtree(final)
                    os.replace(temp, final)
                    _fsync_folder(self.folder)
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(temp, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for old in self._checkpoint_names()[:-self.policy.keep]:
                shutil.rmtree(self.folder / old, ignore_errors=True)
        self._last_save = time.monotonic()
        return final

    def resume_advice(self) -> str:
        """disk_errors' advice when a write fails (after making room): what --resume will then start from."""
        names = self._checkpoint_names()
        start = (f"it continues from the checkpoint at step {int(names[-1][len(PREFIX):])}, which is kept" if names
                 else "no checkpoint was written yet, so it starts again")
        return f", then rerun the same command with --resume ({start})"

    def finish(self) -> None:
        """After the final weights and metadata are written: the checkpoints (with their pickles) go."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.folder, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
