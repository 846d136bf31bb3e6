"""The offline demo: train a small base on real digits, convert it, and certify both side by side.

It runs the same `convert` and `evaluate` functions as the CLI; only the base model is built here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .conversion import ConvertSettings, convert
from .data import collate_skipping_unreadable, demo_folder, labelled_images
from .evaluation import EvaluateSettings, evaluate
from . import __version__
from .errors import CertifyZooError, Interrupted, StoppedWithNothingKept, disk_error_reason, disk_remedy
from .export import holds_one_of, prepare_output_folder, read_json, save_timm_model, write_json_atomic
from .recipes import load_recipe

DEMO_ARCHITECTURE = "vit_tiny_patch16_224"
# A 2-block ViT with 4x4 patches: 4 tokens on an 8x8 digit, ~0.1M parameters, seconds to train on a CPU.
DEMO_MODEL_ARGS = dict(img_size=8, patch_size=4, embed_dim=64, depth=2, num_heads=2)
# Non-trivial normalisation (the digits' own statistics) so that the pixel-space noise path is exercised.
DEMO_MEAN, DEMO_STD = (0.3, 0.3, 0.3), (0.4, 0.4, 0.4)
DEMO_SIGMA = 0.5
DEMO_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
# Written first into every demo output: a later `certify-zoo demo` into the same folder replaces it without
# --overwrite, while any other existing folder is refused (with --overwrite too).
DEMO_MARKER = "certify_zoo_demo.json"


@dataclass
class DemoResult:
    base_dir: Path
    converted_dir: Path
    base_record: dict
    converted_record: dict


def train_demo_base(folder: Path, epochs: int = 30, seed: int = 0) -> Path:
    """Ordinary cross-entropy training of a tiny timm ViT on the demo digits; saved in timm format."""
    from .models import create_timm_model

    torch.manual_seed(seed)
    labels = [str(i) for i in range(10)]
    net = create_timm_model(DEMO_ARCHITECTURE, pretrained=False, num_classes=10, **DEMO_MODEL_ARGS,
                            pretrained_cfg_overlay=dict(input_size=(3, 8, 8), mean=DEMO_MEAN, std=DEMO_STD,
                                                        crop_pct=1.0, interpolation="bilinear", num_classes=10,
                                                        hf_hub_id=None, url=None, license="bsd-3-clause",
                                                        tag="digits"))
    from .classifier import ImageClassifier
    from .models import preprocessing_config

    classifier = ImageClassifier(net, preprocessing_config(net), labels)
    train = labelled_images(str(demo_folder() / "train"), classifier.transform(), labels, 10)
    loader = DataLoader(train, batch_size=64, shuffle=True, collate_fn=collate_skipping_unreadable,
                        generator=torch.Generator().manual_seed(seed))
    batches = [(b.images, b.labels) for b in loader]  # 1,400 8x8 images: decode once, keep in memory
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3, weight_decay=0.01)
    classifier.train()
    for _ in range(epochs):
        for index in torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed + _)).tolist():
            images, targets = batches[index]
            loss = torch.nn.functional.cross_entropy(classifier(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    save_timm_model(classifier.net.eval(), folder, labels)
    return folder


def is_demo_output(folder: Path) -> bool:
    """Whether `folder` carries the marker `certify-zoo demo` writes first into its output."""
    if not holds_one_of(folder, (DEMO_MARKER,)):  # also where the folder cannot be entered
        return False
    try:
        return read_json(Path(folder) / DEMO_MARKER).get("made_by") == "certify-zoo demo"
    except CertifyZooError:  # not json: not our marker
        return False


def prepare_demo_folder(out: Path, overwrite: bool = False) -> Path:
    """A fresh demo output: a new folder, or an earlier demo's (replaced; also with ``overwrite``, which replaces no
    folder of someone else's files)."""
    out = prepare_output_folder(Path(out).expanduser(), overwrite or is_demo_output(Path(out).expanduser()),
                                ours=(DEMO_MARKER,))
    write_json_atomic(out / DEMO_MARKER, {"made_by": "certify-zoo demo", "certify_zoo_version": __version__,
                                          "note": "the next `certify-zoo demo` into this folder replaces it"})
    return out


def run_demo(out: Path, overwrite: bool = False, n: int = 2_000, seed: int = 0, console=None,
             epochs: int | None = None) -> DemoResult:
    """Base -> convert -> evaluate both (deterministic + Monte-Carlo) on the held-out digits."""
    out = prepare_demo_folder(out, overwrite)
    try:
        return _run_demo_in(out, n, seed, console, epochs)
    except (Interrupted, StoppedWithNothingKept) as exc:  # 'rerun the same command with --resume': the demo has none
        stopped = str(exc).split(";", 1)[0]  # 'stopped by SIGINT at step 2 of 840'
        raise StoppedWithNothingKept(f"{stopped}, in the demo: run it again (it starts over; the demo has no "
                                     "--resume)") from exc
    except Exception as exc:  # convert's and evaluate's advice (--resume, --out) is not the demo's
        reason = disk_error_reason(exc) or (disk_error_reason(exc.__cause__) if exc.__cause__ else None)
        if reason is None:
            raise
        raise CertifyZooError(f"cannot write the demo's output in {out}: {reason}: "
                              f"{disk_remedy(reason)}, then run the demo again") from exc


def _run_demo_in(out: Path, n: int, seed: int, console, epochs: int | None) -> DemoResult:
    say = console.print if console is not None else (lambda *a, **k: None)
    base_dir = out / "base"
    say(f"[bold]1/4[/] training a base classifier ({DEMO_ARCHITECTURE}, 8x8 digits) by cross-entropy")
    train_demo_base(base_dir, seed=seed)
    say("[bold]2/4[/] converting it with the Boot Camp objective (recipe demo)")
    recipe = load_recipe("demo")
    converted_dir = out / "converted"
    convert(ConvertSettings.from_recipe(recipe, model=str(base_dir), data="demo", out=str(converted_dir),
                                        seed=seed, epochs=epochs), console=console)
    records = []
    for step, folder in ((3, base_dir), (4, converted_dir)):
        say(f"[bold]{step}/4[/] certifying {folder.name} on the held-out digits (Monte-Carlo n = {n:,}, PGD audit)")
        records.append(evaluate(EvaluateSettings(model=str(folder), data="demo", sigma=recipe["sigma"],
                                                 radii=DEMO_RADII, method="all", n=n, seed=seed,
                                                 audit="pgd", out=str(folder), resumable=False),
                                console=console).record)
    return DemoResult(base_dir, converted_dir, records[0], records[1])
