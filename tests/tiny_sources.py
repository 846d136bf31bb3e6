"""Tiny classifiers of every supported family and odd image sources, built offline for the source tests."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import torch

from certify_zoo.models import create_timm_model

LABELS = [str(i) for i in range(10)]
SIZE = 32
# timm test architectures (made for unit tests): a CNN, a ViT and a ConvNeXt, ~0.1-0.5M parameters at 32x32
TIMM_MODELS = {"resnet": ("test_resnet", {}), "vit": ("test_vit", {"img_size": SIZE}),
               "convnext": ("test_convnext", {})}
TRANSFORMERS_MODELS = ("hf-vit", "hf-resnet", "hf-deit-distilled")


def save_timm(folder: Path, architecture: str, **kwargs) -> Path:
    from certify_zoo.export import save_timm_model

    torch.manual_seed(0)
    net = create_timm_model(architecture, pretrained=False, num_classes=10, **kwargs,
                            pretrained_cfg_overlay=dict(input_size=(3, SIZE, SIZE), mean=(0.4, 0.4, 0.4),
                                                        std=(0.3, 0.3, 0.3), crop_pct=1.0, num_classes=10,
                                                        hf_hub_id=None))
    save_timm_model(net.eval(), folder, LABELS)
    return folder


def save_transformers(folder: Path, kind: str, processor=None) -> Path:
    """A tiny transformers model of ``kind`` beside its image processor (``processor``: any other one instead).
    "hf-deit-distilled" is the class of DeiT's distilled checkpoints, which is not the one that
    AutoModelForImageClassification builds from a config alone: its logits average a class and a distillation head."""
    from transformers import (ConvNextImageProcessor, DeiTConfig, DeiTForImageClassificationWithTeacher,
                              DeiTImageProcessor, ResNetConfig, ResNetForImageClassification, ViTConfig,
                              ViTForImageClassification, ViTImageProcessor)

    torch.manual_seed(0)
    labels = dict(num_labels=10, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    vit = dict(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, **labels)
    if kind == "hf-vit":
        net = ViTForImageClassification(ViTConfig(**vit))
        own = ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.4] * 3, image_std=[0.3] * 3)
    elif kind == "hf-deit-distilled":  # resize to 36 then crop 32, bicubic, as DeiT's processor does at 256 / 224
        net = DeiTForImageClassificationWithTeacher(DeiTConfig(**vit))
        own = DeiTImageProcessor(size={"height": SIZE + 4, "width": SIZE + 4},
                                 crop_size={"height": SIZE, "width": SIZE})
    else:
        net = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                        layer_type="basic", **labels))
        own = ConvNextImageProcessor(size={"shortest_edge": SIZE}, crop_pct=0.875)
    net.eval().save_pretrained(folder, safe_serialization=True)
    (own if processor is None else processor).save_pretrained(folder)
    return folder


def save_model(folder: Path, family: str) -> Path:
    if family in TIMM_MODELS:
        architecture, kwargs = TIMM_MODELS[family]
        return save_timm(folder, architecture, **kwargs)
    return save_transformers(folder, family)


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789" * 4) -> None:
    """What huggingface_hub leaves after a download: refs/main -> commit, snapshots/<commit>/<files>."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit, dirs_exist_ok=True)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def odd_image_folder(root: Path) -> Path:
    """Nested folders with a grey PNG, a CMYK JPEG, an RGBA PNG, a rotated-EXIF JPEG, plain RGBs and one corrupt file.

    8 files: two batches of 4 read every one of them.
    """
    from PIL import Image

    def place(relative: str) -> Path:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    Image.new("L", (40, 40), 128).save(place("a/b/grey.png"))
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(place("c/cmyk.jpg"))
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(place("rgba.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (48, 24), (0, 0, 255)).save(place("d/e/f/rotated.jpg"), exif=exif)
    for index in range(3):
        Image.new("RGB", (36, 36), (index * 80, 100, 50)).save(place(f"g/plain{index}.png"))
    place("g/h/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def parquet_dataset(folder: Path, rows: int = 8, corrupt_rows: int = 1, with_images: bool = True) -> Path:
    """A local parquet dataset (what datasets' streaming reads): image + ClassLabel columns, one corrupt image."""
    import datasets
    from PIL import Image

    records = []
    for index in range(rows):
        image = {"bytes": png_bytes(Image.new("RGB", (SIZE, SIZE), (index * 30, 60, 200 - index * 20))), "path": None}
        if index < corrupt_rows:
            image = {"bytes": b"not an image at all", "path": f"row{index}.png"}
        record = {"label": index % 10, "caption": f"row {index}"}
        if with_images:
            record["image"] = image
        records.append(record)
    features = datasets.Features({"label": datasets.ClassLabel(names=LABELS), "caption": datasets.Value("string"),
                                  **({"image": datasets.Image()} if with_images else {})})
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(records, features=features).to_parquet(str(folder / "train.parquet"))
    return folder


def digits_parquet(folder: Path, demo_data: Path, split: str = "train", shards: int = 3,
                   limit: int | None = None) -> Path:
    """The demo digits of one split as a local parquet dataset in `shards` files (what `datasets` streams):
    PNG bytes in an Image column, the digit in a ClassLabel column; rows in a fixed order."""
    import datasets

    datasets.disable_progress_bars()
    files = sorted((demo_data / split).rglob("*.png"))[:limit]
    records = [{"image": {"bytes": path.read_bytes(), "path": None}, "label": int(path.parent.name)} for path in files]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)})
    folder.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_list(records, features=features)
    for shard in range(shards):
        table.shard(shards, shard, contiguous=True).to_parquet(str(folder / f"{split}-{shard:05d}.parquet"))
    return folder
