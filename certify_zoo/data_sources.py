"""DATA spec -> batches: image folders (DataLoader with workers) or `datasets` streams (buffered, shuffled).

A DATA spec is ``demo``, a local folder of image files at any depth, ``hf:ORG/NAME[:SPLIT]``, or a local
path a ``datasets`` builder reads (parquet / arrow files, an image folder with a metadata file). Both
kinds yield the same ``Batch`` of [0,1] images at the model's input size, with unreadable images
counted and named instead of raised.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from .data import (DEMO_SPEC, Unreadable, as_rgb, class_index, collate_skipping_unreadable, dataloader_workers,
                   labelled_images, unlabelled_images)
from .errors import CertifyZooError
from .stopping import ignore_stop_signals

DEFAULT_DATA = "hf:ILSVRC/imagenet-1k"
HUB_PREFIX = "hf:"
DATASET_SUFFIXES = (".parquet", ".arrow")
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "jpg", "png")
LABEL_COLUMN_NAMES = ("label", "labels", "class", "target")
SPLITS = {"convert": ("train",), "evaluate": ("validation", "valid", "val", "test")}
SHUFFLE_BUFFER = 10_000


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
    return any(p.suffix in DATASET_SUFFIXES or p.name in METADATA_FILES for p in path.rglob("*") if p.is_file())


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
    path = Path(spec).expanduser()
    if not path.exists():
        raise CertifyZooError(f"data {spec} does not exist: pass a folder of images, parquet/arrow files, "
                              "hf:ORG/NAME or demo")
    if _is_datasets_path(path):
        return DataSpec("datasets", str(path))
    if not path.is_dir():
        raise CertifyZooError(f"data {spec} is neither a folder of images nor a parquet/arrow file")
    return DataSpec("folder", str(path))


# ---------------------------------------------------------------- opening a datasets stream

def _unavailable(spec: DataSpec, exc: Exception) -> CertifyZooError:
    default = f"{HUB_PREFIX}{spec.location}" == DEFAULT_DATA
    what = "the default --data, ImageNet-1k," if default else spec.location
    return CertifyZooError(f"cannot stream {what} from the Hub ({exc.__class__.__name__}): it needs network access and, "
                           f"if gated, accepted terms and HF_TOKEN; or pass --data DIR (a folder of images)")


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


def find_image_column(stream, wanted: str | None, where: str) -> str:
    import datasets

    return _find_column(stream, wanted, where, datasets.Image, IMAGE_COLUMN_NAMES,
                        "has no image column: name it with --image-column")


def find_label_column(stream, wanted: str | None, where: str) -> str:
    import datasets

    return _find_column(stream, wanted, where, datasets.ClassLabel, LABEL_COLUMN_NAMES,
                        "has no label column: evaluation needs labels, name the column with --label-column")


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
    """ImageNet-1k on the Hub names its classes by description ("tench, Tinca tinca"): map those to the standard order."""
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    descriptions = ImageNetInfo().label_descriptions()
    position = {text: index for index, text in enumerate(descriptions)}
    if not all(name in position for name in names):
        return None
    return {name: position[name] for name in names}


class LabelLookup:
    """Dataset label values -> model class indices (ClassLabel names, synsets, label names or indices)."""

    def __init__(self, feature, label_names: Sequence[str] | None, num_classes: int, where: str):
        import datasets

        self.label_names, self.num_classes, self.where = label_names, num_classes, where
        self.by_position = None
        if isinstance(feature, datasets.ClassLabel):
            mapping = imagenet_descriptions_index(feature.names, num_classes)
            if mapping is None:
                mapping = class_index(list(feature.names), label_names, num_classes)
            self.by_position = [mapping[name] for name in feature.names]
        self.cache: dict = {}

    def __call__(self, value) -> int:
        if self.by_position is not None:
            return self.by_position[int(value)]
        if value not in self.cache:
            if isinstance(value, (int,)) or (isinstance(value, str) and value.isdigit() and not self.label_names):
                index = int(value)
                if not 0 <= index < self.num_classes:
                    raise CertifyZooError(f"label {index} in {self.where} is outside the model's {self.num_classes} "
                                          "classes: the data's classes do not match the model's")
                self.cache[value] = index
            else:
                self.cache[value] = class_index([str(value)], self.label_names, self.num_classes)[str(value)]
        return self.cache[value]


def decode_image(value):
    """A datasets image cell (bytes/path dict with decode=False, or a PIL image) -> RGB PIL image."""
    from PIL import Image

    if isinstance(value, dict):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
        with Image.open(source) as image:
            return as_rgb(image)
    if isinstance(value, Image.Image):
        return as_rgb(value)
    raise TypeError(f"not an image: {type(value).__name__}")


class StreamCollate:
    """Runs in the DataLoader workers: decode, preprocess, label; an unreadable row becomes Unreadable."""

    def __init__(self, image_column: str, transform: Callable, label_column: str | None = None,
                 labels: LabelLookup | None = None):
        self.image_column, self.transform = image_column, transform
        self.label_column, self.labels = label_column, labels

    def __call__(self, rows):
        items = []
        for row in rows:
            value = row[self.image_column]
            try:
                image = self.transform(decode_image(value))
            except Exception:  # corrupt bytes, missing file, unsupported mode: counted, never fatal
                name = value.get("path") if isinstance(value, dict) else None
                items.append(Unreadable(name or f"a {self.image_column!r} cell"))
                continue
            label = self.labels(row[self.label_column]) if self.labels is not None else -1
            items.append((image, label, -1))
        return collate_skipping_unreadable(items)


class StreamLoader:
    """Batches of one process's part of a stream, already on that process's device.

    Not a DataLoader on purpose: the stream is split per process here (datasets' split_dataset_by_node),
    so accelerate.prepare leaves it alone instead of dispatching from rank 0, which cannot carry a Batch.
    """

    def __init__(self, loader: DataLoader, batches: int | None):
        from accelerate import PartialState

        self.loader, self.batches, self.device = loader, batches, PartialState().device

    def __len__(self) -> int:
        return self.batches if self.batches is not None else 0

    def __iter__(self):
        for count, batch in enumerate(self.loader):
            if self.batches is not None and count >= self.batches:
                break
            yield batch.to(self.device)


def _stream_loader(stream, collate: StreamCollate, batch_size: int, rows: int | None, drop_last: bool) -> StreamLoader:
    from accelerate import PartialState
    from datasets.distributed import split_dataset_by_node

    state = PartialState()
    if state.num_processes > 1:
        stream = split_dataset_by_node(stream, rank=state.process_index, world_size=state.num_processes)
    workers = min(dataloader_workers(), stream.num_shards)  # a worker without a shard would only idle
    loader = DataLoader(stream, batch_size=batch_size, collate_fn=collate, num_workers=workers,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    batches = None
    if rows is not None:
        per_process = rows // state.num_processes
        batches = per_process // batch_size if drop_last else math.ceil(per_process / batch_size)
    return StreamLoader(loader, batches)


def _prepared_stream(spec: DataSpec, purpose: str, image_column: str | None):
    import datasets

    stream, split = open_stream(spec, purpose)
    where = f"{spec.location} [{split}]"
    column = find_image_column(stream, image_column, where)
    if stream.features and isinstance(stream.features.get(column), datasets.Image):
        stream = stream.cast_column(column, datasets.Image(decode=False))  # we decode: a bad image is skipped
    return stream, split, column, where


# ---------------------------------------------------------------- loaders for convert and evaluate

@dataclass
class Loader:
    loader: object  # a DataLoader (accelerate.prepare shards it) or a StreamLoader (already per process)
    num_images: int | None
    spec: DataSpec
    holdout: torch.Tensor | None = None  # conversion only: clean images set aside, never trained on


def holdout_size(requested: int, rows: int | None) -> int:
    """Images set aside from conversion data for the gamma controller and the self-check: the requested number,
    at most a tenth of the data (the rest trains), none when there are fewer than 2 images."""
    if requested <= 0 or (rows is not None and rows < 2):
        return 0
    return max(1, min(requested, rows // 10)) if rows is not None else requested


def _stack_readable(items) -> torch.Tensor | None:
    batch = collate_skipping_unreadable(list(items))
    return batch.images if batch.images.numel() else None


def conversion_loader(data: str | None, transform: Callable, batch_size: int, seed: int,
                      image_column: str | None = None, max_steps: int | None = None, holdout: int = 0) -> Loader:
    """Label-free batches for conversion: labels are never read, even when the data has them.

    ``holdout``: set aside up to that many images (see ``holdout_size``), drawn by ``seed`` from a folder or the
    first rows of a stream; they are returned as ``Loader.holdout`` and never trained on."""
    spec = resolve_data_spec(data)
    if spec.kind != "datasets":
        dataset = unlabelled_images(spec.location, transform)
        kept = holdout_size(holdout, len(dataset))
        held = None
        if kept:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
            held = _stack_readable(dataset[i] for i in sorted(order[:kept]))
            if held is not None:  # nothing readable to hold out: every image trains and is counted there
                dataset = Subset(dataset, sorted(order[kept:]))
        # no drop_last: one epoch trains on every image once (Accelerate pads the last global batch to even it out)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                            num_workers=dataloader_workers(), collate_fn=collate_skipping_unreadable,
                            generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                            prefetch_factor=4 if dataloader_workers() else None, worker_init_fn=ignore_stop_signals)
        return Loader(loader, len(dataset), spec, held)
    stream, split, column, where = _prepared_stream(spec, "convert", image_column)
    rows = stream_length(spec, stream, split)
    kept = holdout_size(holdout, rows)
    held = None
    if kept:  # the stream's first rows, before the shuffle: the same images for every process and every resume
        held = StreamCollate(column, transform)(list(stream.take(kept))).images
        held = held if held.numel() else None
        stream = stream.skip(kept)
        rows = rows - kept if rows is not None else None
    if rows is None and max_steps is None:
        raise CertifyZooError(f"{where} does not say how many rows it has: pass --max-steps")
    if rows is not None and rows < batch_size:
        raise CertifyZooError(f"{where} has {rows} rows, fewer than --batch-size {batch_size}")
    stream = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)  # buffered: streams cannot be permuted
    loader = _stream_loader(stream, StreamCollate(column, transform), batch_size, rows, drop_last=True)
    if rows is None:
        loader.batches = max_steps
    return Loader(loader, rows, DataSpec(spec.kind, spec.location, split, spec.hub), held)


def evaluation_loader(data: str | None, transform: Callable, label_names: Sequence[str] | None, num_classes: int,
                      batch_size: int, max_images: int | None = None, image_column: str | None = None,
                      label_column: str | None = None, subsample: int = 1) -> Loader:
    """Labelled batches in a fixed order, labels mapped to the model's classes (a mismatch is an error).

    ``subsample`` K keeps every K-th example (Cohen et al. certified every 100th of ImageNet's validation split),
    then ``max_images`` caps the count."""
    spec = resolve_data_spec(data)
    if spec.kind != "datasets":
        dataset = labelled_images(spec.location, transform, label_names, num_classes)
        chosen = range(0, len(dataset), subsample)
        if max_images is not None:
            chosen = chosen[:max_images]
        if len(chosen) < len(dataset):
            dataset = Subset(dataset, chosen)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=dataloader_workers(),
                            collate_fn=collate_skipping_unreadable)
        return Loader(loader, len(dataset), spec)
    stream, split, column, where = _prepared_stream(spec, "evaluate", image_column)
    labels = find_label_column(stream, label_column, where)
    lookup = LabelLookup((stream.features or {}).get(labels), label_names, num_classes, where)
    rows = stream_length(spec, stream, split)
    if subsample > 1:
        stream = stream.filter(lambda _, index: index % subsample == 0, with_indices=True)
        rows = -(-rows // subsample) if rows is not None else None
    if max_images is not None:
        stream = stream.take(max_images)
        rows = min(rows, max_images) if rows is not None else max_images
    loader = _stream_loader(stream, StreamCollate(column, transform, labels, lookup), batch_size, rows, drop_last=False)
    return Loader(loader, rows, DataSpec(spec.kind, spec.location, split, spec.hub))
