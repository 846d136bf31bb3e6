"""DATA spec -> batches: image folders (DataLoader with workers) or `datasets` streams (buffered, shuffled).

A DATA spec is ``demo``, a local folder of image files at any depth, ``hf:ORG/NAME[:SPLIT]``, or a local
path a ``datasets`` builder reads (parquet / arrow files, an image folder with a metadata file). Both
kinds yield the same ``Batch`` of [0,1] images at the model's input size, with unreadable images
counted and named instead of raised.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import os
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .data import (DEMO_SPEC, IMAGE_EXTENSIONS, Batch, ImageFiles, Unreadable, as_rgb, class_index,
                   collate_skipping_unreadable, labelled_images, resolve_data_path, unlabelled_images, worker_options)
from .draws import draw_key
from .errors import CertifyZooError

DEFAULT_DATA = "hf:ILSVRC/imagenet-1k"
# convert's --check-data when --data is the default: ImageNet-1k's test split has no labels, so no base trained on
# it and nobody evaluates on it, and the calibration reads no label
DEFAULT_CHECK_DATA = f"{DEFAULT_DATA}:test"
HUB_PREFIX = "hf:"
DATASET_SUFFIXES = (".parquet", ".arrow")
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "jpg", "png")
LABEL_COLUMN_NAMES = ("label", "labels", "class", "target")
SPLITS = {"convert": ("train",), "evaluate": ("validation", "valid", "val", "test")}
SPLITS["check"] = SPLITS["evaluate"]  # --check-data: images the base did not train on
SHUFFLE_BUFFER = 10_000  # rows per shuffled window of a stream (conversion)
READ_AHEAD_BATCHES = 8  # batches per read of a stream in order (evaluation)


@dataclass
class DataSpec:
    kind: str  # "demo", "folder", "datasets"
    location: str
    split: str | None = None
    hub: bool = False

    def describe(self) -> str:
        split = f", split {self.split}" if self.split else ""
        return f"{self.kind}{' (Hub)' if self.hub else ''}: {self.location}{split}"


def _is_datasets_path(path: Path) -> bool:
    if path.is_file():
        return path.suffix in DATASET_SUFFIXES
    if not path.is_dir():
        return False
    # os.path.isfile: a file in a folder that can be listed but not entered is no answer here (the listing of the
    # images then names the folder); Path.is_file raised PermissionError
    return any(p.suffix in DATASET_SUFFIXES or p.name in METADATA_FILES for p in path.rglob("*") if os.path.isfile(p))


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar")


def local_split(spec: str) -> tuple[str, str | None]:
    """(path, split) of a local DATA spec: ``PATH:SPLIT`` names a split of a local datasets source, as
    ``hf:ORG/NAME:SPLIT`` does of a Hub one, where PATH exists and the spec as a whole does not (a file may have a
    colon in its name). Only the file system's answer to two stats: no folder is walked."""
    head, colon, split = spec.rpartition(":")
    if colon and head and split and "/" not in split and not Path(spec).expanduser().exists() \
            and Path(head).expanduser().exists():
        return head, split
    return spec, None


def require_local_data(spec: str) -> Path:
    """A local DATA path, which must exist and be a folder or a parquet/arrow file: checked before a model is
    downloaded, so that a typo costs no download. A ``:SPLIT`` after it is left to ``resolve_data_spec``."""
    if spec == DEMO_SPEC or spec.startswith(HUB_PREFIX):
        return Path(spec)
    spec, _ = local_split(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CertifyZooError(f"data {spec} does not exist: pass a folder of images, parquet/arrow files, "
                              "hf:ORG/NAME or demo")
    if not path.is_dir() and path.suffix not in DATASET_SUFFIXES:
        hint = (": it is an archive, extract it and pass the folder" if path.suffix.lower() in ARCHIVE_SUFFIXES
                else ": it is one image, pass the folder of images it belongs to"
                if path.suffix.lower() in IMAGE_EXTENSIONS else "")
        raise CertifyZooError(f"data {spec} is neither a folder of images nor a parquet/arrow file{hint}")
    return path


def resolve_data_spec(spec: str | None) -> DataSpec:
    """Where DATA points: demo, a datasets source (Hub or local files) or a folder of image files."""
    spec = spec or DEFAULT_DATA
    if spec == DEMO_SPEC:
        return DataSpec("demo", spec)
    if spec.startswith(HUB_PREFIX):
        name, _, split = spec[len(HUB_PREFIX):].partition(":")
        if name.count("/") > 1 or not name:
            raise CertifyZooError(f"--data {spec!r}: expected hf:ORG/NAME or hf:ORG/NAME:SPLIT")
        return DataSpec("datasets", name, split or None, hub=True)
    path, split = require_local_data(spec), local_split(spec)[1]
    if _is_datasets_path(path):
        return DataSpec("datasets", str(path), split)
    if split is not None:
        raise CertifyZooError(f"data {spec}: {path} is a folder of image files, which has no splits (PATH:SPLIT "
                              "names a split of a datasets source, parquet or arrow files): pass the folder")
    return DataSpec("folder", str(path))


# ---------------------------------------------------------------- opening a datasets stream

def _unavailable(spec: DataSpec, exc: Exception) -> CertifyZooError:
    from .hub_files import hub_offline

    default = f"{HUB_PREFIX}{spec.location}" == DEFAULT_DATA
    what = "the default --data, ImageNet-1k," if default else spec.location
    if hub_offline():  # as the model loader says it, not "it needs network access", which sent users after it
        return CertifyZooError(f"cannot stream {what} from the Hub: HF_HUB_OFFLINE is set and it is not in the "
                               "Hugging Face cache (unset it to stream, which needs network access and, if gated, "
                               "accepted terms and HF_TOKEN; or pass --data DIR, a folder of images)")
    return CertifyZooError(f"cannot stream {what} from the Hub ({exc.__class__.__name__}): it needs network access "
                           f"and, if gated, accepted terms and HF_TOKEN; or pass --data DIR (a folder of images)")


def open_stream(spec: DataSpec, purpose: str):
    """A `datasets` IterableDataset (streaming: nothing is downloaded before the first batch) and its split."""
    import datasets

    try:
        if spec.hub:
            streams = datasets.load_dataset(spec.location, streaming=True)
        elif Path(spec.location).is_file():
            builder = Path(spec.location).suffix.lstrip(".")
            streams = datasets.load_dataset(builder, data_files=spec.location, streaming=True)
        else:
            streams = datasets.load_dataset(spec.location, streaming=True)
    except CertifyZooError:
        raise
    except Exception as exc:
        if spec.hub:
            raise _unavailable(spec, exc) from exc
        raise CertifyZooError(f"datasets cannot read {spec.location}: {str(exc).splitlines()[0][:200]}") from exc
    available = list(streams.keys())
    split = spec.split
    if split is None:
        preferred = [s for s in SPLITS[purpose] if s in available]
        split = preferred[0] if preferred else (available[0] if len(available) == 1 else None)
        if split is None:
            raise CertifyZooError(f"{spec.location} has splits {', '.join(available)}: choose one with "
                                  f"--data {HUB_PREFIX if spec.hub else ''}{spec.location}:SPLIT")
    if split not in available:
        raise CertifyZooError(f"{spec.location} has no split {split!r} (it has {', '.join(available)})")
    return streams[split], split


def _find_column(stream, wanted: str | None, where: str, feature_type, conventional: Sequence[str],
                 missing: str) -> str:
    """--image-column / --label-column if given, else the first column of the feature type, else a conventional
    name; otherwise a one-line error ending in `missing`."""
    features = stream.features or {}
    columns = list(features) or list(stream.column_names or [])
    if wanted:
        if columns and wanted not in columns:
            raise CertifyZooError(f"{where} has no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    typed = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    named = typed or [name for name in columns if name.lower() in conventional]
    if not named:
        raise CertifyZooError(f"{where} {missing} (columns: {', '.join(columns) or 'none'})")
    return named[0]


def _column_kind(feature) -> str | None:
    """What a column evidently holds where it cannot hold the other kind: "class labels", "numbers", "images";
    None where it may hold either (strings: paths or names; bytes; structs)."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return "class labels"
    if isinstance(feature, datasets.Image):
        return "images"
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint", "float", "bool")):
        return "numbers"
    return None


def find_image_column(stream, wanted: str | None, where: str) -> str:
    import datasets

    name = _find_column(stream, wanted, where, datasets.Image, IMAGE_COLUMN_NAMES,
                        "has no image column: name it with --image-column")
    kind = _column_kind((stream.features or {}).get(name))
    if kind in ("class labels", "numbers"):  # every row would be an unreadable image, and the run end on that
        raise CertifyZooError(f"{where}: column {name!r} holds {kind}, not images: name the image column with "
                              f"--image-column (columns: {', '.join(stream.features)})")
    return name


def find_label_column(stream, wanted: str | None, where: str) -> str:
    import datasets

    name = _find_column(stream, wanted, where, datasets.ClassLabel, LABEL_COLUMN_NAMES,
                        "has no label column: evaluation needs labels, name the column with --label-column")
    if _column_kind((stream.features or {}).get(name)) == "images":
        raise CertifyZooError(f"{where}: column {name!r} holds images, not labels: name the label column with "
                              f"--label-column (columns: {', '.join(stream.features)})")
    return name


def stream_length(spec: DataSpec, stream, split: str) -> int | None:
    """Rows in the split: from the Hub's dataset info, or counted from a narrow column of local files."""
    splits = getattr(stream.info, "splits", None) or {}
    if split in splits and splits[split].num_examples:
        return int(splits[split].num_examples)
    if spec.hub:
        return None
    if not stream.features:
        return sum(1 for _ in stream)
    import datasets

    # count on the cheapest column: local files are read once, image bytes not at all when avoidable
    small = [name for name, feature in stream.features.items() if not isinstance(feature, datasets.Image)]
    return sum(1 for _ in stream.select_columns([(small or list(stream.features))[0]]))


def imagenet_descriptions_index(names: Sequence[str], num_classes: int) -> dict[str, int] | None:
    """ImageNet-1k on the Hub names its classes by description ("tench, Tinca tinca"): map those to the standard
    order."""
    if num_classes != 1000:
        return None
    from .classifier import imagenet_descriptions

    descriptions = imagenet_descriptions(num_classes)
    position = {text: index for index, text in enumerate(descriptions)}
    if not all(name in position for name in names):
        return None
    return {name: position[name] for name in names}


class LabelLookup:
    """Dataset label values -> model class indices (ClassLabel names, synsets, label names or indices)."""

    def __init__(self, feature, label_names: Sequence[str] | None, num_classes: int, where: str, column: str = "label"):
        import datasets

        self.label_names, self.num_classes, self.where, self.column = label_names, num_classes, where, column
        self.by_position = None
        if isinstance(feature, datasets.ClassLabel):
            mapping = imagenet_descriptions_index(feature.names, num_classes)
            if mapping is None:
                mapping = class_index(list(feature.names), label_names, num_classes, self._labels())
            self.by_position = [mapping[name] for name in feature.names]
        self.cache: dict = {}

    def __call__(self, value) -> int:
        if self.by_position is not None:
            if int(value) < 0:  # datasets' ClassLabel for "no label" (e.g. ImageNet's test split), not a class
                raise CertifyZooError(f"label {int(value)} in column {self.column!r} of {self.where}: -1 means "
                                      "unlabelled; evaluate on a labelled split (--data ...:SPLIT)")
            return self.by_position[int(value)]
        if value not in self.cache:
            if isinstance(value, (int,)) or (isinstance(value, str) and value.isdigit() and not self.label_names):
                index = int(value)
                if not 0 <= index < self.num_classes:
                    raise CertifyZooError(f"label {index} in {self.where} is outside the model's {self.num_classes} "
                                          "classes: the data's classes do not match the model's")
                self.cache[value] = index
            else:
                self.cache[value] = class_index([str(value)], self.label_names, self.num_classes,
                                                self._labels())[str(value)]
        return self.cache[value]

    def _labels(self) -> str:
        return f"labels in column {self.column!r} of {self.where}"


def decode_image(value):
    """A datasets image cell -> RGB PIL image: an Image column's bytes/path dict (decode=False) or PIL image, or a
    plain column of encoded image bytes or of file paths (a table exported without datasets' Image type)."""
    from PIL import Image

    if isinstance(value, dict):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        source = io.BytesIO(value)
    elif isinstance(value, str):
        source = Path(value).expanduser()
    elif isinstance(value, Image.Image):
        return as_rgb(value)
    else:
        raise TypeError(f"not an image: {type(value).__name__}")
    with Image.open(source) as image:
        return as_rgb(image)


class StreamRow(NamedTuple):
    """One example on its way from the stream reader (main process) to a decoding worker."""

    position: int  # stable per example: its row in this process's part of the stream, offset per process
    image: object  # the datasets image cell, undecoded (bytes/path dict)
    label: int  # the model's class, -1 for conversion (labels are never read there)


class DecodeRows(Dataset):
    """Runs in the DataLoader workers: the 'index' it receives is a list of StreamRow (a batch read by the main
    process); it decodes and preprocesses them. An unreadable image becomes Unreadable, named by its position."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __getitem__(self, rows: Sequence[StreamRow]) -> Batch:
        items = []
        for row in rows:
            try:
                image = self.transform(decode_image(row.image))
            except Exception:  # corrupt bytes, missing file, unsupported mode: counted, never fatal
                name = row.image.get("path") if isinstance(row.image, dict) else None
                items.append(Unreadable(name or f"stream position {row.position}"))
                continue
            items.append((image, row.label, row.position))
        return collate_skipping_unreadable(items)


def _as_is(batch: Batch) -> Batch:
    return batch


ROW_SPLIT = "rows"
HELD_OUT_BY_CONTENT = "content"


@dataclass
class StreamPosition:
    """Where one process stands in its part of a stream, json-able (a checkpoint holds one per process).

    The stream is read in windows of ``window`` rows, each shuffled by its own seeded permutation, so the rows
    after a position depend only on the window's start: ``datasets``' own state_dict, taken when the window
    began, seeks there (no replay of the consumed part, no shuffle buffer whose content would be lost)."""

    epoch: int = 0
    window: int = 0  # the window being consumed
    source: dict | None = None  # datasets' state_dict at the start of that window; None: the epoch's start
    offset: int = 0  # rows of that window already consumed
    # how a stream is split over processes: "rows" (each keeps every N-th row); None: not recorded, by a version
    # that split by files where it could, whose positions mean other rows under several processes
    split: str | None = ROW_SPLIT
    # a conversion's (shuffled) stream: how its held-out rows are kept out. "content": a filter on their bytes, so
    # datasets shuffles the files; None: in order (evaluation), or not recorded, by a version that skipped them and
    # so read the files in order, whose state means other rows
    held_out: str | None = None


class StreamLoader:
    """Batches of one process's part of a `datasets` stream, already on that process's device.

    The main process reads the raw rows (a thread reads one window ahead, so a Hub download overlaps training)
    and maps the labels; DataLoader workers only decode. So the order of the examples, and with it every
    example's position, depends neither on the number of workers nor on how the stream is sharded into files,
    and a checkpoint can name the exact position to continue from (``position_after`` / ``resume``).

    Not a DataLoader on purpose: the stream is split per process here (datasets' split_dataset_by_node), so
    accelerate.prepare leaves it alone instead of dispatching from rank 0, which cannot carry a Batch.
    Positions: a process's n-th row (counted in the stream's order, unreadable rows included) gets position
    n * processes + rank, which is the row's index in the stream whatever the number of processes (each process
    keeps every processes-th row). Rows that ``keep`` drops are not counted: positions stay unique and in order.
    """

    def __init__(self, stream, image_column: str, transform: Callable, batch_size: int, batches: int | None,
                 labels: Callable | None = None, label_column: str | None = None, shuffle_seed: int | None = None,
                 length: int | None = None, keep: Callable[[dict], bool] | None = None, workers: int | None = None):
        from accelerate import PartialState

        state = PartialState()
        self.rank, self.processes, self.device = state.process_index, state.num_processes, state.device
        self.source, self.image_column = stream, image_column
        self.labels, self.label_column = labels, label_column
        self.decode = DecodeRows(transform)
        self.batch_size, self.batches = batch_size, batches  # batches: at most this many per epoch (None: all)
        self.length = length if length is not None else batches  # expected batches, for progress bars
        self.shuffle_seed = shuffle_seed
        self.keep = keep  # which raw rows of this process's part to use (None: all)
        self.workers = workers  # decoding processes (None: data.dataloader_workers' default)
        # shuffled: the shuffle window; in order: enough rows per read to keep the workers busy
        self.window = SHUFFLE_BUFFER if shuffle_seed is not None else batch_size * READ_AHEAD_BATCHES
        self.epoch = 0
        self._start = StreamPosition()
        self._window_starts: dict[int, dict | None] = {}

    def __len__(self) -> int:
        return self.length or 0

    def set_epoch(self, epoch: int) -> None:
        """Our windows' permutations (and datasets' shard order, where it shuffles) follow the epoch."""
        self.epoch = epoch
        self._start = StreamPosition(epoch)

    def position_after(self, batches: int) -> dict:
        """Where this process stands once it has consumed `batches` batches of the current epoch (json-able)."""
        rows = batches * self.batch_size
        window = rows // self.window
        source = self._window_starts[window] if window else None  # recorded before any of its rows was yielded
        return asdict(StreamPosition(self.epoch, window, source, rows % self.window,
                                     held_out=HELD_OUT_BY_CONTENT if self.shuffle_seed is not None else None))

    def resume(self, position: dict) -> None:
        """The next iteration continues exactly where `position_after` said this process stood."""
        start = StreamPosition(**{"split": None, **position})
        if self.processes > 1 and start.split != ROW_SPLIT:
            raise CertifyZooError("--resume: this stream's position was kept by an earlier certify-zoo, which split "
                                  "streams over processes by files, not by rows: finish the run with that version, "
                                  "or start it over")
        if self.shuffle_seed is not None and start.held_out != HELD_OUT_BY_CONTENT:
            raise CertifyZooError("--resume: this stream's position was kept by an earlier certify-zoo, which read a "
                                  "stream's files in order after skipping its held-out rows: finish the run with that "
                                  "version, or start it over")
        self._start = start
        self.epoch = start.epoch

    def _per_process_stream(self, start: StreamPosition):
        from datasets.distributed import split_dataset_by_node

        stream = self.source if self.shuffle_seed is None else read_order(self.source, self.shuffle_seed)
        if self.processes > 1:
            # every process keeps every processes-th row of the whole stream, not whole files: a file split (datasets'
            # choice when the files divide evenly) applies skip and take per file, so it trained on held-out rows
            # and certified calibration rows, and files of unequal length left one process with most of the
            # data. The cost: each process reads every row's bytes (it decodes only its own)
            stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.processes, strategy="examples")
        if self.keep is not None:  # after the split: each process looks only at its own rows
            stream = stream.filter(self.keep)
        stream.set_epoch(start.epoch)
        if start.source is not None:
            _quiet_shuffle_buffer_warning()
            stream.load_state_dict(start.source)
        return stream

    def _windows(self, start: StreamPosition) -> Iterator[list[StreamRow]]:
        """The rows from `start` on, a window at a time; records where each window begins (for checkpoints)."""
        stream = self._per_process_stream(start)
        self._window_starts = {start.window: start.source}
        rows = iter(stream)
        window, skip = start.window, start.offset
        try:
            while True:
                raw = list(itertools.islice(rows, self.window))
                self._window_starts[window + 1] = stream.state_dict()
                if not raw:
                    return
                order = range(len(raw))
                if self.shuffle_seed is not None:
                    generator = torch.Generator().manual_seed(draw_key(self.shuffle_seed, start.epoch, window))
                    order = torch.randperm(len(raw), generator=generator).tolist()
                first = window * self.window
                yield [StreamRow((first + k) * self.processes + self.rank, raw[i][self.image_column],
                                 self.labels(raw[i][self.label_column]) if self.labels is not None else -1)
                       for k, i in enumerate(order) if k >= skip]
                window, skip = window + 1, 0
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()  # the parquet readers stop now, not at interpreter exit

    def __iter__(self):
        start, self._start = self._start, StreamPosition(self.epoch)
        done = (start.window * self.window + start.offset) // self.batch_size
        remaining = None if self.batches is None else max(0, self.batches - done)
        windows = ReadAhead(self._windows(start))
        rows = (row for window in windows for row in window)
        batches = itertools.islice(_chunks(rows, self.batch_size), remaining)
        try:
            # the first rows are read before any worker starts: what they refuse (an unlabelled split, a label
            # outside the model's classes) ends the run before a DataLoader has to be torn down mid-start
            first = next(batches, None)
            if first is None:
                return
            loader = DataLoader(self.decode, sampler=itertools.chain([first], batches), batch_size=None,
                                collate_fn=_as_is, **worker_options(prefetch_factor=4, workers=self.workers))
            for batch in loader:
                yield batch.to(self.device)
        finally:
            windows.close()


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class ReadAhead:
    """Iterates `source` in a daemon thread, one item ahead of the consumer; its exceptions reach the consumer."""

    _END = object()

    def __init__(self, source: Iterator, depth: int = 1):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(source,), daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            self._put(_Failure(exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self.stopped.set()


@dataclass
class _Failure:
    error: BaseException


class _NoShuffleBufferNote(logging.Filter):
    """datasets warns on every resumed shuffle that its buffer's content is lost; ours holds at most one row,
    taken before the state was saved, so nothing is lost and the warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer" not in record.getMessage()


def _quiet_shuffle_buffer_warning() -> None:
    logger = logging.getLogger("datasets.iterable_dataset")
    if not any(isinstance(f, _NoShuffleBufferNote) for f in logger.filters):
        logger.addFilter(_NoShuffleBufferNote())


def _prepared_stream(spec: DataSpec, purpose: str, image_column: str | None):
    import datasets

    stream, split = open_stream(spec, purpose)
    where = f"{spec.location}, split {split}"
    column = find_image_column(stream, image_column, where)
    # we decode the image column: a bad image is skipped. Any other image column is not read at all: datasets would
    # decode it for every row, and its first bad image end the run (--image-column naming another column)
    for name, feature in (stream.features or {}).items():
        if isinstance(feature, datasets.Image):
            stream = stream.cast_column(name, datasets.Image(decode=False))
    return stream, split, column, where


# ---------------------------------------------------------------- loaders for convert and evaluate

def _processes() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


@dataclass
class Loader:
    loader: object  # a DataLoader (accelerate.prepare shards it) or a StreamLoader (already per process)
    num_images: int | None
    spec: DataSpec
    holdout: torch.Tensor | None = None  # conversion only: clean images set aside, never trained on
    files: Sequence[Path] = ()  # conversion from a folder: every image file of it (--check-data leaves them out)
    left_out: int = 0  # evaluation only: images of the source left out (the calibration's, data_sources.left_out)


def holdout_size(requested: int, rows: int | None, trained: int | None = None) -> int:
    """Images set aside from conversion data for the gamma controller and the self-check: the requested number, at
    most a tenth of the data (the rest trains) and a tenth of the images the run will train on (``trained``: a
    --max-steps run of a few steps is not checked on more images than it trains), none with fewer than 2 images."""
    if requested <= 0 or (rows is not None and rows < 2):
        return 0
    for limit in (rows, trained):
        if limit is not None:
            requested = min(requested, max(1, limit // 10))
    return requested


def _stack_readable(items) -> torch.Tensor | None:
    batch = collate_skipping_unreadable(list(items))
    return batch.images if batch.images.numel() else None


def _draw_from_files(dataset, count: int, seed: int) -> tuple[torch.Tensor | None, list[int], list[int]]:
    """``count`` images of a folder drawn by ``seed`` (the same for every process and every resume): stacked (None
    when none is readable), their indices, and the indices of the others."""
    if not count:
        return None, [], list(range(len(dataset)))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    drawn = sorted(order[:count])
    return _stack_readable(dataset[i] for i in drawn), drawn, sorted(order[count:])


def read_order(stream, seed: int):
    """The order a conversion reads a stream in: datasets shuffles its files and interleaves up to 10 of them (a
    buffer of 1 row: our windows do the rest, and a buffer's content would be lost on resume). The epoch
    (``set_epoch``) reorders the files again."""
    return stream.shuffle(seed=seed, buffer_size=1)


def content_key(cell) -> bytes:
    """What identifies an image of a stream whatever its position: a digest of its bytes (of its path when the bytes
    live in a file), so that a copy of a held-out image elsewhere in the stream is held out too."""
    from PIL import Image

    if isinstance(cell, dict):
        content = cell.get("bytes") or str(cell.get("path")).encode()
    elif isinstance(cell, Image.Image):  # decoded (a column that is not a datasets Image)
        content = f"{cell.mode} {cell.size}".encode() + cell.tobytes()
    elif isinstance(cell, (bytes, bytearray, memoryview, str)):  # a plain column of image bytes or file paths
        content = cell.encode() if isinstance(cell, str) else bytes(cell)
    else:  # not an image: decode_image counts it as unreadable; it is held out (or not) all the same
        content = repr(cell).encode()
    return hashlib.blake2b(content, digest_size=16).digest()


class NotHeldOut:
    """A stream filter: the rows whose image is not one of the held-out images."""

    def __init__(self, column: str, held_out: set[bytes]):
        self.column, self.held_out = column, held_out

    def __call__(self, row: dict) -> bool:
        return content_key(row[self.column]) not in self.held_out


def _first_cells(stream, column: str, count: int) -> list:
    """The image cells of a stream's first ``count`` rows, undecoded."""
    return [row[column] for row in stream.take(count)] if count else []


def _stack_cells(cells: Sequence, transform: Callable) -> torch.Tensor | None:
    """The readable ones of ``cells``, decoded and stacked (None when there are none)."""
    if not cells:
        return None
    held = DecodeRows(transform)[[StreamRow(position, cell, -1) for position, cell in enumerate(cells)]].images
    return held if held.numel() else None


@dataclass
class CheckImages:
    images: torch.Tensor
    drawn: dict  # which ones: {"files": [paths below the source's folder]} or {"split": ..., "first_rows": n}
    left_out_trained: int = 0  # files of the source that the conversion trains on too: never drawn


def check_images(data: str, transform: Callable, count: int, seed: int, image_column: str | None = None,
                 trained_files: Sequence[Path] = (), trained_stream: DataSpec | None = None) -> CheckImages:
    """Up to ``count`` images of ``--check-data``, a source the conversion never trains on, for the gamma controller
    and the self-check in place of a slice of the conversion data: drawn by ``seed`` from a folder, the first rows of
    a stream (its validation split unless the spec names one). Labels are never read. ``drawn`` says which, so that
    evaluate can leave them out of the same source (``left_out``). ``trained_files`` (a folder's) are never drawn;
    ``trained_stream``, the datasets split the conversion streams, is refused as the check's split.

    Why a second source: the conversion data are usually the base's own training images, and a base is surer of
    those than of images it never saw, so a calibration measured on them can promise more than holds elsewhere."""
    spec = resolve_data_spec(data)
    left_out_trained = 0
    if spec.kind != "datasets":
        dataset = unlabelled_images(spec.location, transform)
        if trained_files:  # the same folder, or one inside the other: those files are not unseen
            trained = {os.path.abspath(path) for path in trained_files}
            unseen = [path for path in dataset.files if os.path.abspath(path) not in trained]
            if not unseen:
                raise CertifyZooError(f"--check-data {data} holds only images the conversion trains on (--data): "
                                      "the check needs images the conversion never sees; give another folder")
            left_out_trained = len(dataset.files) - len(unseen)
            dataset = ImageFiles(unseen, transform)
        held, indices, _ = _draw_from_files(dataset, min(count, len(dataset)), seed)
        root = resolve_data_path(spec.location, "train")
        drawn = {"files": [dataset.files[i].relative_to(root).as_posix() for i in indices],
                 **({"left_out_as_conversion_data": left_out_trained} if left_out_trained else {})}
    else:
        stream, split, column, _ = _prepared_stream(spec, "check", image_column)
        if (trained_stream is not None and trained_stream.kind == "datasets" and trained_stream.split == split
                and trained_stream.hub == spec.hub and _same_place(trained_stream, spec)):
            # a source of one split (a parquet file, a folder of train-*.parquet) gives the check that split too
            raise CertifyZooError(f"--check-data {data} reads split {split!r} of the data the conversion trains on "
                                  "(--data): the check needs images the conversion never sees; name another split "
                                  "(SOURCE:SPLIT) or give another source")
        held = _stack_cells(_first_cells(stream, column, count), transform)
        drawn = {"split": split, "first_rows": 0 if held is None else int(held.shape[0])}  # a short split: all of it
    if held is None:
        raise CertifyZooError(f"--check-data {data}: no readable image")
    return CheckImages(held, drawn, left_out_trained)


def left_out(check_data: str | None, drawn: dict | None, data: str) -> dict | None:
    """What an evaluation of ``data`` leaves out: the conversion's --check-data images when ``data`` is that same
    source (a folder's drawn files as absolute paths, a stream's first rows of the same split), else None. Their
    calibration was measured on them: certifying them too would not be an independent check of it."""
    if not check_data or not drawn:
        return None
    check, evaluated = resolve_data_spec(check_data), resolve_data_spec(data)
    if (check.kind, check.hub) != (evaluated.kind, evaluated.hub):
        return None
    if check.kind == "folder":
        root = resolve_data_path(check.location, "train").resolve()
        return {"files": {str(root / name) for name in drawn.get("files", [])}}
    if check.kind == "datasets" and _same_place(check, evaluated):
        return {"split": drawn.get("split"), "first_rows": int(drawn.get("first_rows", 0))}
    return None


def is_conversion_data(conversion_data: str | None, evaluated: DataSpec, trained_split: str | None = None) -> bool:
    """Whether an evaluation reads the images a conversion trained on: its --data folder, or the same split of the
    same datasets source: ``trained_split``, the split the conversion read (certify_zoo.json's ``data_split``), else
    the one its spec names, else train. Paths are compared as they are, never resolved as specs: that would walk a
    folder of a million images to look for parquet files."""
    if not conversion_data or conversion_data == DEMO_SPEC or evaluated.kind == "demo":
        return False  # the demo converts on its train split and certifies its test split
    if conversion_data.startswith(HUB_PREFIX):
        name, _, split = conversion_data[len(HUB_PREFIX):].partition(":")
        trained = DataSpec("datasets", name, trained_split or split or "train", hub=True)
    else:
        path, split = local_split(conversion_data)
        trained = DataSpec(evaluated.kind, str(Path(path).expanduser()), trained_split or split or "train")
    same_split = evaluated.kind == "folder" or trained.split == evaluated.split
    return trained.hub == evaluated.hub and same_split and _same_place(trained, evaluated)


def _same_place(a: DataSpec, b: DataSpec) -> bool:
    return a.location == b.location if a.hub else Path(a.location).resolve() == Path(b.location).resolve()


def conversion_loader(data: str | None, transform: Callable, batch_size: int, seed: int,
                      image_column: str | None = None, max_batches: int | None = None, holdout: int = 0,
                      workers: int | None = None) -> Loader:
    """Label-free batches for conversion: labels are never read, even when the data has them.

    ``max_batches``: the micro-batches a process will take at most (``--max-steps`` x ``--grad-accum``); a stream
    that does not say how many rows it has is read that far.

    ``holdout``: set aside up to that many images (see ``holdout_size``), drawn by ``seed`` from a folder or the
    first rows of a stream in the seed's read order; they are returned as ``Loader.holdout`` and never trained on
    (nor is any image of the stream with the same bytes).

    ``workers``: DataLoader processes that decode the images (None: ``data.dataloader_workers``' default); the
    batches are the same whatever their number."""
    spec = resolve_data_spec(data)
    if spec.kind != "datasets":
        dataset = unlabelled = unlabelled_images(spec.location, transform)
        kept = holdout_size(holdout, len(dataset), max_batches * batch_size if max_batches else None)
        held, _, rest = _draw_from_files(dataset, kept, seed)
        if held is not None:  # nothing readable to hold out: every image trains and is counted there
            dataset = Subset(dataset, rest)
        # no drop_last: one epoch trains on every image once (Accelerate pads the last global batch to even it out)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_skipping_unreadable,
                            generator=torch.Generator().manual_seed(seed),
                            **worker_options(prefetch_factor=4, workers=workers))
        return Loader(loader, len(dataset), spec, held, files=unlabelled.files)
    stream, split, column, where = _prepared_stream(spec, "convert", image_column)
    rows = stream_length(spec, stream, split)
    kept = holdout_size(holdout, rows, max_batches * batch_size if max_batches else None)
    # the first rows in the order this conversion reads the stream (the seed's: the same images for every process)
    cells = _first_cells(read_order(stream, seed), column, kept)
    held = _stack_cells(cells, transform)
    # held out by content, not by skip(kept): datasets keeps a skipped stream's files in order and reads them one at
    # a time, so the shuffled windows of a class-ordered dataset would hold a few classes each
    keep = NotHeldOut(column, {content_key(cell) for cell in cells}) if kept else None
    if kept and rows is not None:
        rows -= kept  # fewer only where an image repeats a held-out one
    if rows is None and max_batches is None:
        raise CertifyZooError(f"{where} does not say how many rows it has: pass --max-steps")
    if rows is not None and rows < batch_size:
        raise CertifyZooError(f"{where} has {rows} rows, fewer than --batch-size {batch_size}")
    batches = max_batches if rows is None else rows // _processes() // batch_size
    loader = StreamLoader(stream, column, transform, batch_size, batches, shuffle_seed=seed, keep=keep,
                          workers=workers)
    return Loader(loader, rows, DataSpec(spec.kind, spec.location, split, spec.hub), held)


def _all_left_out(data: str | None, count: int) -> CertifyZooError:
    return CertifyZooError(f"every image of {data} ({count}) is one of the conversion's --check-data images, on which "
                           "its calibration was measured (they are left out): certify images it never saw")


def evaluation_loader(data: str | None, transform: Callable, label_names: Sequence[str] | None, num_classes: int,
                      batch_size: int, max_images: int | None = None, image_column: str | None = None,
                      label_column: str | None = None, subsample: int = 1, leave_out: dict | None = None,
                      workers: int | None = None) -> Loader:
    """Labelled batches in a fixed order, labels mapped to the model's classes (a mismatch is an error).

    ``leave_out`` (``left_out``'s answer) drops the calibration's images first; then ``subsample`` K keeps every K-th
    example (Cohen et al. certified every 100th of ImageNet's validation split), then ``max_images`` caps the count.
    ``workers``: as for ``conversion_loader``."""
    spec = resolve_data_spec(data)
    if spec.kind != "datasets":
        dataset = labelled_images(spec.location, transform, label_names, num_classes)
        dropped = (leave_out or {}).get("files")
        kept = ([i for i, file in enumerate(dataset.files) if str(file.resolve()) not in dropped] if dropped
                else range(len(dataset)))
        left = len(dataset) - len(kept)
        if left and not kept:
            raise _all_left_out(data, left)
        chosen = kept[::subsample]
        if max_images is not None:
            chosen = chosen[:max_images]
        if len(chosen) < len(dataset):
            dataset = Subset(dataset, chosen)
        # its workers leave Ctrl-C and SIGTERM to the main process, which stops at a batch boundary (evaluate --resume)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping_unreadable,
                            **worker_options(workers=workers))
        return Loader(loader, len(dataset), spec, left_out=left)
    stream, split, column, where = _prepared_stream(spec, "evaluate", image_column)
    labels = find_label_column(stream, label_column, where)
    lookup = LabelLookup((stream.features or {}).get(labels), label_names, num_classes, where, labels)
    rows = stream_length(spec, stream, split)  # counted before the skip: it may count the stream itself
    skipped = (leave_out or {}).get("first_rows", 0) if (leave_out or {}).get("split") == split else 0
    if skipped:
        stream = stream.skip(skipped)
        rows = max(0, rows - skipped) if rows is not None else None
        if rows == 0:
            raise _all_left_out(data, skipped)
    if subsample > 1:
        stream = stream.filter(lambda _, index: index % subsample == 0, with_indices=True)
        rows = -(-rows // subsample) if rows is not None else None
    if max_images is not None:
        stream = stream.take(max_images)
        rows = min(rows, max_images) if rows is not None else max_images
    expected = math.ceil(rows / _processes() / batch_size) if rows is not None else None
    loader = StreamLoader(stream, column, transform, batch_size, None, labels=lookup, label_column=labels,
                          length=expected, workers=workers)
    return Loader(loader, rows, DataSpec(spec.kind, spec.location, split, spec.hub), left_out=skipped)
