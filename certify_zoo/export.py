"""Writing outputs: timm-format weights, our json records, all atomically (temp file + rename)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import CertifyZooError
from .security import cache_root, scrub

SCHEMA_VERSION = 1
METADATA_NAME = "certify_zoo.json"
# an unfinished conversion's folder: OUT/checkpoints/run.json (checkpoints.py), named here for those that only look
CHECKPOINTS_DIR = "checkpoints"
RUN_RECORD = "run.json"
CERTIFICATION_NAME = "certification.json"
# earlier evaluations' records, a folder per run (TIME-RUN): a subfolder, so never published (push takes the top level)
EVALUATIONS_DIR = "evaluations"
AUDIT_NAME = "audit.json"


@functools.cache
def default_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0644 under the usual 022). A temporary file from
    mkstemp is 0600, and safetensors writes weights 0600 as well: renamed into an output folder, they left records,
    card, plot and weights readable by their owner only, where a shared folder's group could read the config."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def move_in(source: Path, destination: Path) -> None:
    """Rename a finished file over its destination (atomic on one file system), with the usual mode."""
    os.chmod(source, default_file_mode())
    os.replace(source, destination)


def sha256_of(path: Path, sync: bool = False) -> str:
    """The SHA-256 of a file's bytes; ``sync``: the file is also on disk when this returns (a checkpoint's files,
    before the rename that publishes it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):  # hashlib.file_digest needs Python 3.11; we run on 3.10
            digest.update(chunk)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without an error, else
    removed: a crash leaves the old file or the new, never half of one."""
    descriptor, temp = tempfile.mkstemp(prefix=f".{Path(path).stem if suffix else Path(path).name}.", suffix=suffix,
                                        dir=Path(path).parent)
    os.close(descriptor)
    try:
        yield Path(temp)
        move_in(Path(temp), Path(path))
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write json next to its destination and rename over it: a crash leaves the old file or the new, never half."""
    data = scrub(data)  # a token pasted into a model id or URL never reaches a record
    with atomic_file(path) as temp, open(temp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_run_records(folder: Path, records: dict[str, dict], known: Sequence[str]) -> dict:
    """Write one run's json records together: each carries the run's id, and the first (the index,
    certification.json) lists them and is written last. Records of an earlier run that this one did not write
    (any it listed, and any of the `known` names) are removed, so no stale file looks like this run's. A write that
    fails (a full disk) leaves none of this run's records. Returns the index as written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index, *others = records
    run = uuid.uuid4().hex[:12]
    previous = read_json(folder / index).get("files", []) if (folder / index).is_file() else []
    written = {**records[index], "run": run, "files": list(records)}
    done: list[str] = []
    try:
        for name in others:
            write_json_atomic(folder / name, {**records[name], "run": run})
            done.append(name)
        write_json_atomic(folder / index, written)
    except BaseException:  # a full disk: no record of this run without its index
        for name in done:
            (folder / name).unlink(missing_ok=True)
        raise
    for stale in (set(previous) | set(known)) - set(records):
        if _plain_name(stale):
            (folder / stale).unlink(missing_ok=True)
    return written


def keep_earlier_run(folder: Path, index: str) -> Path | None:
    """Move the records of the run that wrote ``folder/index`` (the index and the files it lists) into
    ``folder/evaluations/TIME-RUN/`` before another run writes its own: an eight-image check replaced the records of
    hours of Monte-Carlo. Returns where they went (None: no earlier run). Interrupted, it leaves every file in one
    place or the other, and the next call moves the rest into the same folder."""
    folder = Path(folder)
    if not is_run_record(folder / index):
        return None
    earlier = read_json(folder / index)
    run = str(earlier.get("run", ""))
    written = time.strftime("%Y%m%d-%H%M%S", time.gmtime((folder / index).stat().st_mtime))
    kept = folder / EVALUATIONS_DIR / (f"{written}-{run}" if re.fullmatch(r"[A-Za-z0-9]{1,32}", run) else written)
    kept.mkdir(parents=True, exist_ok=True)
    listed = [name for name in earlier.get("files", []) if isinstance(name, str) and name != index]
    for name in [*dict.fromkeys(listed), index]:  # the index last: until then it lists what is still to move
        if _plain_name(name) and (folder / name).is_file():
            os.replace(folder / name, kept / name)
    return kept


def put_back_earlier_run(folder: Path, kept: Path) -> None:
    """Undo keep_earlier_run when the next run's records could not be written: the folder's records are the
    earlier run's again, as its card says (renames, which need no free space)."""
    for path in Path(kept).iterdir():
        os.replace(path, Path(folder) / path.name)
    Path(kept).rmdir()
    with contextlib.suppress(OSError):  # only when empty: other runs kept there stay
        (Path(folder) / EVALUATIONS_DIR).rmdir()


def _plain_name(name: str) -> bool:
    """A file name read from a record on disk names a file of its folder, never a path elsewhere."""
    return "/" not in name and "\\" not in name


def is_run_record(path: Path) -> bool:
    """Whether the json file at ``path`` is a record an evaluate run wrote (it names its run or certify-zoo)."""
    try:
        record = read_json(path)
    except (CertifyZooError, UnicodeDecodeError, OSError):  # not json
        return False
    return isinstance(record, dict) and ("run" in record or "certify_zoo_version" in record)


def run_record(index: dict, name: str, record: dict) -> dict:
    """`record` (the file `name` beside the index) when it belongs to the index's run, else {} (a stale file)."""
    if "files" not in index:  # written before runs were indexed: the audit belonged when the index mentions one
        return record if index.get("audit") else {}
    return record if name in index["files"] and record.get("run") == index.get("run") else {}


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise CertifyZooError(f"{path} is not valid json ({exc.msg} at line {exc.lineno}): restore or delete it") \
            from exc


def with_distinct_storage(state: dict) -> dict:
    """Every tensor its own storage: a module used twice (timm's CoaT shares its convolutional position encoding
    across blocks) puts one tensor under several names, which safetensors refuses to write. Each later name gets a
    copy, so that every name loads back (timm loads strictly) at the cost of the duplicate's bytes."""
    seen, distinct = set(), {}
    for name, tensor in state.items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else None  # views of one storage count too
        distinct[name] = tensor.clone() if key in seen else tensor.contiguous()
        if key is not None:
            seen.add(key)
    return distinct


# what models.create_timm_model remembers of a model's arguments when timm does not (timm's own record is the model's
# ``_model_args``): save_timm_model writes it
MODEL_ARGS_ATTRIBUTE = "certify_zoo_model_args"


def save_timm_model(net, folder: Path, label_names: list[str] | None = None) -> None:
    """timm's own format (config.json with pretrained_cfg + model.safetensors), loadable with ``local-dir:``.

    Written into a staging folder beside the destination and moved in file by file, so an interrupted
    save never leaves a config next to weights it does not describe.
    """
    from safetensors.torch import save_file
    # save_for_hf's config half: its weights half hands safetensors a state dict whose shared tensors it refuses
    from timm.models._hub import save_config_for_hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        model_config = {"label_names": list(label_names)} if label_names else None
        # the arguments of a model that timm did not record itself (timm < 1.0.31; see create_timm_model)
        save_file(with_distinct_storage(net.state_dict()), staging / "model.safetensors", metadata={"format": "pt"})
        save_config_for_hf(net, staging / "config.json", model_config=model_config,
                           model_args=getattr(net, MODEL_ARGS_ATTRIBUTE, None))
        # num_classes stays at the top level only: transformers' AutoModelForImageClassification (TimmWrapper) passes
        # it besides model_args and failed on a second one; timm reads it from either place
        config = json.loads((staging / "config.json").read_text())
        if (config.get("model_args") or {}).get("num_classes") == config.get("num_classes"):
            config["model_args"].pop("num_classes")
            (staging / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("model.safetensors", "config.json"):  # weights first: config.json marks a complete folder
            move_in(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def holds_one_of(folder: Path, names: Sequence[str]) -> bool:
    """Whether ``folder`` holds one of the files by which certify-zoo knows a folder it wrote. One that cannot be
    entered (no permission) shows none: not ours to replace, and a data folder whose listing then says why."""
    try:
        return any((Path(folder) / name).is_file() for name in names)
    except PermissionError:
        return False


def some_of(folder: Path, shown: int = 3) -> str:
    """'a.txt, b.png, ...': what a folder holds, for a message that refuses to touch it."""
    held = sorted(p.name for p in Path(folder).iterdir())
    return ", ".join(held[:shown]) + (", ..." if len(held) > shown else "")


def check_output_folder(out: Path, overwrite: bool, ours: Sequence[str] = (METADATA_NAME,)) -> Path:
    """Refuse an existing non-empty folder unless asked to overwrite it and it holds one of ``ours``, the files by
    which certify-zoo knows a folder it made; changes nothing on disk. A mistyped --out (``.``, a home folder) with
    --overwrite must not delete someone's files (transformers' overwrite_output_dir never deletes either)."""
    out = Path(out).expanduser()
    # os.path's tests: a path in a folder that cannot be entered (no permission) is not there, and
    # require_writable_folder says why; Path.exists raised PermissionError
    if os.path.exists(out) and not os.path.isdir(out):
        raise CertifyZooError(f"output {out} exists and is not a folder")
    if os.path.isdir(out) and any(out.iterdir()):
        if not holds_one_of(out, ours):
            raise CertifyZooError(f"output folder {out} already exists and was not made by certify-zoo (it holds "
                                  f"{some_of(out)}): choose another --out (--overwrite replaces only certify-zoo's own "
                                  "output folders)")
        if not overwrite:
            raise CertifyZooError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    require_writable_folder(out, f"output folder {out}", "choose another --out")
    return out


def nearest_existing(path: Path) -> Path:
    """``path``, or the nearest folder above it that exists: where making it starts (one that cannot be seen for
    want of permission counts as missing: the folder above it is then found, and cannot be written)."""
    return next((place for place in (Path(path), *Path(path).parents) if os.path.exists(place)), Path("."))


def can_write_in(folder: Path) -> bool:
    """Whether files can be made in ``folder``, or in the nearest folder above it that exists (a read-only file
    system, or no write permission, says no; a full disk is known only when a write fails). A file in the way is
    the caller's to name."""
    existing = nearest_existing(folder)
    return not existing.is_dir() or os.access(existing, os.W_OK | os.X_OK)


def require_names_that_fit(path: Path, named: str) -> None:
    """Refuse, before any work, a path with a name longer than its file system takes (255 bytes on most): evaluate
    --out found it when writing the records, after the whole run (OSError: [Errno 36] File name too long)."""
    try:
        limit = os.pathconf(nearest_existing(path), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not known (or not POSIX): the common limit
        limit = 255
    longest = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
    if longest > limit:
        raise CertifyZooError(f"{named} has a name of {longest} bytes, longer than its file system takes ({limit}): "
                              "choose a shorter one")


def require_writable_folder(folder: Path, named: str, advice: str) -> None:
    """Refuse, before any work, an output folder that cannot be made (a file in the way, a name too long) or written
    (a read-only file system, no permission): ``named`` is how the message names it, ``advice`` what to do
    instead."""
    require_names_that_fit(folder, named)
    blocking = nearest_existing(folder)
    if not blocking.is_dir():
        raise CertifyZooError(f"{named} cannot be made: {blocking} is a file, not a folder")
    if not can_write_in(folder):
        raise CertifyZooError(f"{named} cannot be written (a read-only file system, or no permission): {advice}")


def check_output_file(path: Path, option: str, ours: Callable[[Path], bool]) -> Path:
    """Refuse, before any work, a file to write that cannot be written (a folder, a path under a file) or that would
    replace a file certify-zoo did not write (``ours`` knows its own); changes nothing on disk. Found after an hour
    of certification, the same mistake cost the run its result."""
    path = Path(path).expanduser()
    require_names_that_fit(path, f"{option} {path}")
    if os.path.isdir(path):  # os.path: see check_output_folder
        raise CertifyZooError(f"{option} {path} is a folder: name a file (in it, say)")
    blocking = nearest_existing(path.parent)
    if not blocking.is_dir():
        raise CertifyZooError(f"{option} {path} cannot be written: {blocking} is a file, not a folder")
    if os.path.exists(path) and not ours(path):
        raise CertifyZooError(f"{option} {path} exists and certify-zoo did not write it: move it, or name another "
                              "file")
    if not can_write_in(path.parent):
        raise CertifyZooError(f"{option} {path} cannot be written (a read-only file system, or no permission): name "
                              "a file elsewhere")
    return path


def prepare_output_folder(out: Path, overwrite: bool, ours: Sequence[str] = (METADATA_NAME,)) -> Path:
    """Create the output folder, replacing an existing one's contents only as ``check_output_folder`` allows."""
    out = check_output_folder(out, overwrite, ours)
    if out.is_dir():
        empty_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def empty_folder(folder: Path, ignore_errors: bool = False) -> None:
    """Remove what ``folder`` holds and keep the folder: --out as a symlink to a folder on a larger disk, or as a
    mount point (a Docker volume), is replaced in place. shutil.rmtree of the folder refused the first ('Cannot
    call rmtree on a symbolic link'), and for the second removed everything in it, then failed on the mount point
    itself (EBUSY): the earlier output gone, nothing converted."""
    for child in list(Path(folder).iterdir()):
        try:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=ignore_errors)
            else:
                child.unlink()
        except OSError:
            if not ignore_errors:
                raise


LOCKS_DIR = "locks"  # in $CERTIFY_ZOO_CACHE: OutputLock's files


class OutputLock:
    """One certify-zoo run at a time writes a folder. A second conversion into the folder a running one writes (with
    --overwrite, or --resume) had replaced it mid-run, and both reported success: the folder then held whichever
    finished last; two evaluations writing one records folder would mix their kept partial results. An OS file lock
    (filelock) in certify-zoo's cache, named by the folder's real path: nothing is written beside the user's files,
    the lock outlives the folder's replacement, and a process the OS kills leaves no stale lock. Only the main
    process takes it (``decided_by_main``); released on leaving the ``with``."""

    def __init__(self):
        self._lock = None

    @staticmethod
    def path_for(folder: str | Path) -> Path:
        where = str(Path(folder).expanduser().resolve()).encode()
        return cache_root() / LOCKS_DIR / f"{hashlib.sha256(where).hexdigest()[:32]}.lock"

    def acquire(self, folder: str | Path) -> None:
        """Take the folder's lock, or refuse: another run holds it. A cache that cannot hold the lock file
        (read-only) leaves the run unlocked, as it ran before there was a lock, rather than stopping it."""
        from filelock import FileLock, Timeout

        path = self.path_for(folder)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(path))
            lock.acquire(timeout=0)
        except Timeout:
            raise CertifyZooError(f"{folder} is being written by another certify-zoo run (a conversion or an "
                                  "evaluation), running now: let it finish or stop it (what it did is kept, --resume "
                                  "continues it), or choose another folder") from None
        except OSError:
            return
        self._lock = lock

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
