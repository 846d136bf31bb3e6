"""DATA spec -> image datasets: label-free for conversion, labelled for evaluation.

Every item is a float tensor in [0,1] at the model's input size (the model's own resize and crop,
no normalisation), so noise and radii live in pixel space.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .errors import CertifyZooError, disk_errors
from .export import CERTIFICATION_NAME, METADATA_NAME, holds_one_of
from .security import CACHE_VARIABLE, cache_root
from .stopping import SpawnWithStopSignalsBlocked, ignore_stop_signals
from .wording import counted

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEMO_SPEC = "demo"
DEMO_VERSION = "digits-v1"
DEMO_TEST_FRACTION = 0.2


def open_rgb(path):
    """Open an image (path or file object) as RGB, see as_rgb."""
    from PIL import Image

    with Image.open(path) as image:
        return as_rgb(image)


# PIL's convert("RGB") clips 16-bit grey (modes I;16*, I) at 255, which turned a 16-bit PNG white, and truncates
# float images (mode F) in [0,1] to 0: both are scaled to 8 bits by their nominal range first
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _eight_bit(image):
    """A 16-bit (range 0-65535) or float (range 0-1) grey image as an 8-bit one ("L"); others unchanged."""
    import numpy as np
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) / 65535.0
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
    else:
        return image
    return Image.fromarray((np.clip(np.nan_to_num(values), 0.0, 1.0) * 255.0).round().astype(np.uint8), mode="L")


def as_rgb(image):
    """EXIF orientation applied, alpha composited on white, 16-bit and float grey scaled to 8 bits by their range,
    palette/grey/CMYK converted to RGB."""
    from PIL import Image, ImageOps

    image = _eight_bit(ImageOps.exif_transpose(image))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class Unreadable:
    """Stands in for an image that could not be decoded: the collate counts and names it."""

    name: str


# what tools leave beside images: Jupyter's .ipynb_checkpoints copies, macOS's .DS_Store and the AppleDouble ._*
# files of __MACOSX folders in unzipped archives; a hidden folder among class folders is not a class
SKIPPED_FOLDERS = ("__MACOSX",)


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (starts with '.') or a __MACOSX folder: not data."""
    return name.startswith(".") or name in SKIPPED_FOLDERS


def made_by_certify_zoo(folder: Path) -> bool:
    """A conversion's output or an evaluation's records (its plot is a PNG): not data, and not a class, where --out
    lies inside the data folder (a second conversion read the first one's plot, then --overwrite removed it)."""
    return holds_one_of(folder, (METADATA_NAME, CERTIFICATION_NAME))


def is_data_folder(folder: Path) -> bool:
    return not is_hidden(folder.name) and not made_by_certify_zoo(folder)


def list_image_files(root: Path) -> list[Path]:
    """All image files below root, at any depth, in a stable order; hidden files and folders, and folders
    certify-zoo wrote, left out (is_data_folder).

    Symbolic links to folders are followed (a data set assembled from links to class folders is common; Path.rglob
    skipped them, silently), each real folder once, so a link back up the tree cannot loop."""
    found, visited, unlisted = [], set(), []
    # os.walk skips a folder it cannot list without a word: a class folder without read permission went missing
    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=unlisted.append):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = [name for name in subfolders if is_data_folder(Path(folder) / name)]
        found += [Path(folder) / name for name in files
                  if not is_hidden(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    if unlisted:
        others = len(unlisted) - 1
        raise unreadable_folder(unlisted[0], f" (and {counted(others, 'other folder')} below {root})" if others else "")
    return sorted(found)


def unreadable_folder(error: OSError, also: str = "") -> CertifyZooError:
    return CertifyZooError(f"cannot read the folder {error.filename}: {error.strerror or error}{also}: make it "
                           "readable, or move it out of the data (its images would be left out unseen)")


class ImageFiles(Dataset):
    """Image files with optional labels. A file that cannot be decoded yields Unreadable (counted by the collate)."""

    def __init__(self, files: Sequence[Path], transform: Callable, labels: Sequence[int] | None = None):
        self.files = list(files)
        self.labels = list(labels) if labels is not None else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            image = self.transform(open_rgb(self.files[index]))
        except Exception:  # corrupt/truncated/unsupported: skipped and reported, never fatal mid-epoch
            return Unreadable(str(self.files[index]))
        label = self.labels[index] if self.labels is not None else -1
        return image, label, index


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: int
    unreadable: tuple[str, ...] = ()  # names of the skipped images, for the report and --strict

    def to(self, device, non_blocking: bool = False) -> "Batch":  # lets Accelerate move it like a tensor
        def moved(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, non_blocking=non_blocking)

        return Batch(moved(self.images), moved(self.labels), moved(self.indices), self.skipped, self.unreadable)


def collate_skipping_unreadable(items) -> Batch:
    good = [item for item in items if item is not None and not isinstance(item, Unreadable)]
    skipped = len(items) - len(good)
    unreadable = tuple(item.name for item in items if isinstance(item, Unreadable))
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped,
                     unreadable)
    images, labels, indices = zip(*good)
    return Batch(torch.stack(images), torch.tensor(labels), torch.tensor(indices), skipped, unreadable)


def stop_if_strict(batch: Batch, strict: bool) -> None:
    """--strict: the first unreadable image ends the run instead of being skipped."""
    if strict and batch.skipped:
        name = batch.unreadable[0] if batch.unreadable else "an image"
        raise CertifyZooError(f"cannot read {name} (--strict): fix or remove it, or drop --strict to skip and count it")


# ---------------------------------------------------------------- the embedded demo set

def demo_folder() -> Path:
    """scikit-learn's 8x8 handwritten digits as PNG class folders (train/, test/), written once into the cache.

    Real scanned digits that ship with scikit-learn, so the demo and the tests need no download.
    """
    root = cache_root() / f"demo-{DEMO_VERSION}"
    if (root / "test").is_dir():
        return root
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(pixels))
    n_test = int(round(len(pixels) * DEMO_TEST_FRACTION))
    with disk_errors(f"the demo's digits into certify-zoo's cache {root.parent}",
                     f", or set {CACHE_VARIABLE} to a folder that can be written"):
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
        try:
            for rank, index in enumerate(order):
                split = "test" if rank < n_test else "train"
                folder = staging / split / str(digits.target[index])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[index], mode="L").save(folder / f"{index:04d}.png")
        except BaseException:  # a full disk: no half-written staging folder left in the cache
            shutil.rmtree(staging, ignore_errors=True)
            raise
    try:
        staging.rename(root)  # atomic: concurrent processes either win or find the finished folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def resolve_data_path(spec: str, split: str) -> Path:
    """A DATA spec as a local folder; ``demo`` means the embedded digits (split train or test)."""
    if spec == DEMO_SPEC:
        return demo_folder() / split
    path = Path(spec).expanduser()
    if not path.exists():
        raise CertifyZooError(f"data folder {spec} does not exist")
    if not path.is_dir():
        raise CertifyZooError(f"data {spec} is not a folder of images")
    return path


def unlabelled_images(spec: str, transform: Callable) -> ImageFiles:
    """Images for conversion: every image below the folder, labels never read."""
    root = resolve_data_path(spec, "train")
    files = list_image_files(root)
    if not files:
        raise CertifyZooError(f"no image files in {root} (looked for {', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    return ImageFiles(files, transform)


def _loose(name: str) -> str:
    """A label name as a folder may spell it: case, underscores, hyphens and runs of spaces do not count."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def _loose_label_index(label_names: Sequence[str]) -> dict[str, int]:
    """Loose spellings that name one class only: of each label name and its first comma-separated synonym, then of
    its other synonyms ("tabby cat" in "tabby, tabby cat"), which never displace a spelling of the first kind."""
    first: dict[str, set[int]] = {}
    other: dict[str, set[int]] = {}
    for index, label in enumerate(label_names):
        synonyms = label.split(",")
        for spelling in {_loose(label), _loose(synonyms[0])}:
            first.setdefault(spelling, set()).add(index)
        for synonym in synonyms[1:]:
            other.setdefault(_loose(synonym), set()).add(index)
    unique = {spelling: next(iter(indices)) for spelling, indices in first.items() if len(indices) == 1}
    return {**{spelling: next(iter(indices)) for spelling, indices in other.items()
               if len(indices) == 1 and spelling not in first and spelling}, **unique}


def class_index(folder_names: Sequence[str], label_names: Sequence[str] | None, num_classes: int,
                what: str = "class folders") -> dict[str, int]:
    """Map class folder names to the model's class indices, each by the first that names one class: the exact label
    name, a loose spelling of it, an ImageNet synset (1000 classes), an integer index. Each folder on its own: a
    set that names most classes one way and some another ("Egyptian cat", n03773504) maps too."""
    loose: dict[str, int] | None = None  # built only when an exact name misses (LabelLookup calls per label value)
    synsets = None
    if num_classes == 1000 and any(name.startswith("n") and name[1:].isdigit() for name in folder_names):
        from timm.data import ImageNetInfo

        synsets = ImageNetInfo().label_names()

    def index_of(name: str) -> int | None:
        nonlocal loose
        if label_names and name in label_names:
            return list(label_names).index(name)
        if loose is None:
            loose = _loose_label_index(label_names) if label_names else {}
        if _loose(name) in loose:  # "golden_retriever" for "Golden retriever", "tench" for "tench, Tinca tinca"
            return loose[_loose(name)]
        if synsets is not None and name in synsets:
            return synsets.index(name)
        return int(name) if name.isdigit() and int(name) < num_classes else None

    mapping = {name: index_of(name) for name in folder_names}
    unknown = [name for name, index in mapping.items() if index is None]
    if unknown:
        raise CertifyZooError(f"{what} ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}) do not "
                              f"match the model's {num_classes} classes: name them by the model's label names, "
                              "ImageNet synsets or class indices")
    return mapping


DIGITS = [str(digit) for digit in range(10)]


def require_digit_classes(label_names: Sequence[str] | None, num_classes: int) -> None:
    """``--data demo`` labels its digits 0-9: a model of other classes had its digits matched to its first ten classes
    by index (an ImageNet model's tench, goldfish, ...) and scored a meaningless 0%. Models of ten classes named as
    digits, or not named (transformers' placeholder LABEL_0, ...), pass."""
    placeholder = [f"LABEL_{digit}" for digit in DIGITS]
    if num_classes != 10 or (label_names and list(label_names) not in (DIGITS, placeholder)):
        named = f" ({', '.join(map(repr, list(label_names)[:2]))}, ...)" if label_names else ""
        raise CertifyZooError(f"--data demo is scikit-learn's 8x8 digits, classes 0-9, for the demo's models; this "
                              f"model has {num_classes} classes{named}: give labelled data of its own classes")


def labelled_images(spec: str, transform: Callable, label_names: Sequence[str] | None,
                    num_classes: int) -> ImageFiles:
    """An ImageFolder-style set (one folder per class) with labels mapped to the model's classes."""
    if spec == DEMO_SPEC:
        require_digit_classes(label_names, num_classes)
    root = resolve_data_path(spec, "test")
    try:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and is_data_folder(d))
    except OSError as exc:
        raise unreadable_folder(exc) from exc
    if not class_dirs:
        raise CertifyZooError(f"{root} has no class folders: evaluation needs one folder of images per class")
    mapping = class_index([d.name for d in class_dirs], label_names, num_classes)
    files, labels = [], []
    for folder in class_dirs:
        for file in list_image_files(folder):
            files.append(file)
            labels.append(mapping[folder.name])
    if not files:
        raise CertifyZooError(f"no image files in the class folders of {root}")
    return ImageFiles(files, transform, labels)


def dataloader_workers(requested: int | None = None) -> int:
    """Worker processes per DataLoader (they decode images): ``requested`` (``--workers``) where given; otherwise
    this machine's cores shared among the processes torchrun started on it (``LOCAL_WORLD_SIZE``), one core kept
    for each process itself, at most 8. A process already bound to some cores shares only those."""
    if requested is not None:
        return requested
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        everywhere = os.cpu_count() or 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else everywhere
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if cores >= everywhere else 1
    return max(0, min(8, cores // max(1, processes) - 1))


def worker_options(prefetch_factor: int | None = None, workers: int | None = None) -> dict:
    """DataLoader arguments for its worker processes: ``dataloader_workers(workers)`` of them, each leaving Ctrl-C
    and SIGTERM to the main process, started as ``worker_start_method()`` says."""
    workers = dataloader_workers(workers)
    if not workers:
        return {"num_workers": 0}
    options = {"num_workers": workers, "persistent_workers": False, "worker_init_fn": ignore_stop_signals,
               "multiprocessing_context": worker_start_method()}
    return options | ({"prefetch_factor": prefetch_factor} if prefetch_factor else {})


def fork_can_deadlock(version: tuple = tuple(sys.version_info)) -> bool:
    """Python before 3.10.15, and 3.11 before 3.11.10 (CPython gh-112275): a fork taken while another thread of the
    process creates its Python thread state (a native thread entering Python, as gloo's do to free a finished
    collective's tensors) leaves the child waiting for ever for the lock that thread held, in PyOS_AfterFork_Child.
    benchmarks/fork_deadlock.py counts such children on each Python it is given."""
    release = tuple(version[:3])
    return release < (3, 10, 15) or (3, 11) <= release < (3, 11, 10)


def worker_start_method() -> SpawnWithStopSignalsBlocked | None:
    """How DataLoader workers start: None (forked, as the platform does on Linux before Python 3.14) where the start
    method in force is fork and forking is safe; otherwise spawned with stop signals blocked until they ignore them
    (Windows: the platform's spawn, which has no signal masks).

    Fork is not safe under a process group (torchrun, accelerate launch) on a Python whose fork can deadlock
    (``fork_can_deadlock``): gloo's threads enter Python all the time, and in a two-process conversion under
    torchrun (Python 3.10, torch 2.3) a worker hung inside os.fork, its process waited for a batch and the other in
    a collective, for ever. A forkserver (Python 3.14's default on Linux, or the script's choice) is replaced by
    spawn: its workers are the server's children, and torch's watchdog, which waits for the parent to change, never
    sees the main process die: killed by SIGKILL (or the OOM killer), it left its workers running for ever.
    A spawned worker costs a second or two more per loader, and a script run by path (not ``-m``) that calls
    certify-zoo must guard its entry point with ``if __name__ == "__main__":``, as spawn and forkserver need."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method == "fork":
        distributed = torch.distributed
        under_a_group = distributed.is_available() and distributed.is_initialized()
        return SpawnWithStopSignalsBlocked() if fork_can_deadlock() and under_a_group else None
    return SpawnWithStopSignalsBlocked() if hasattr(signal, "pthread_sigmask") else None
