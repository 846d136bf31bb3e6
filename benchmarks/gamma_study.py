"""The gamma / soundness study: convert models the recipes were not tuned on with each recipe's defaults
(--gamma auto, calibrated radius), then certify each on its whole held-out split: Monte-Carlo, deterministic
(raw and calibrated) and L2 PGD inside both radii.

    python benchmarks/gamma_study.py --work /tmp/study --record docs/records/gamma_study.json \
        --models demo,cnn16,convnext32 --seeds 0,1,2,3 [--n 10000] [--overrides '{"gamma": 0.05}' --tag gamma0.05]

Models: ``demo`` (the demo's 2-block ViT, 8x8 digits, recipe demo), ``cnn16`` (a BatchNorm resnet10t trained
here on tinted 16x16 digits, recipe resnet, 10 epochs), ``convnext32`` (timm's test ConvNeXt, LayerNorm, on a
5-class subset of the digits at 32x32, recipe convnext, 10 epochs), ``effnet16`` (timm's test EfficientNet:
BatchNorm, depthwise convolutions, SiLU, on the tinted 16x16 digits, recipe efficientnet, 10 epochs), ``vit16``
(timm's test ViT with 4x4 patches on the tinted 16x16 digits, recipe vit: AdamW, 10 epochs), ``mvit32`` (timm's
mobilevit_xxs: BatchNorm convolutions and attention blocks, on the tinted digits at 32x32, recipe generic, the one an
architecture of no known family gets, 10 epochs), ``regnet32`` (timm's regnetx_002, BatchNorm, grouped convolutions,
on the grey digits at 32x32, recipe regnet, 10 epochs), ``swin32`` (a two-stage Swin: shifted 4x4 windows over
2x2 patches, LayerNorm, on the grey digits at 32x32, recipe swin: AdamW, 10 epochs). Kappa is
calibrated on conversion images held out of training; the evaluation split (scikit-learn digits' held-out part) is
disjoint from both. One record row per (model, seed) is appended as soon as it is measured, so a run can be watched
and resumed.

Where the calibration's images come from: ``--half`` certifies on half of the evaluation split, and
``--overrides '{"check_data": "half"}'`` calibrates on the other half (``convert --check-data``: images the base
never trained on) and certifies on the same half; ``--flip-ratios --tags T`` then measures, for saved runs, PGD flips
inside the calibrated radius on held-out, trained and evaluation images.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from certify_zoo.conversion import ConvertSettings, convert
from certify_zoo.demo import train_demo_base
from certify_zoo.evaluation import EvaluateSettings, evaluate
from certify_zoo.recipes import choose_recipe, load_recipe

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
SIGMA = 0.5
# models trained on the tinted digits (colour channels with their own means), not the grey ones
TINTED = ("cnn16", "effnet16", "vit16", "mvit32")
# the models built here: (image size, classes, timm architecture, its arguments)
ARCHITECTURES = {
    "cnn16": (16, 10, "resnet10t", dict(stem_width=16, channels=(16, 32, 64, 64))),
    "convnext32": (32, 5, "test_convnext", {}),
    "effnet16": (16, 10, "test_efficientnet", {}),
    "vit16": (16, 10, "test_vit", dict(img_size=16, patch_size=4)),
    "mvit32": (32, 10, "mobilevit_xxs", {}),
    "regnet32": (32, 10, "regnetx_002", {}),
    "swin32": (32, 10, "swin_tiny_patch4_window7_224",
               dict(img_size=32, patch_size=2, window_size=4, embed_dim=48, depths=(2, 2), num_heads=(2, 4))),
}
# base training other than the default 15 epochs at AdamW lr 3e-3: the Swin reached 77.5% clean with those and
# 90.6% with these, near the other bases (a base that weak would test its own noise, not the recipe)
BASE_TRAINING = {"swin32": dict(epochs=40, lr=1e-3)}


def _digits_folders(root: Path, size: int, classes: int, tinted: bool) -> tuple[Path, Path]:
    """Train (flat, no labels) and test (class folders) image folders of scikit-learn's digits at size x size."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    keep = np.flatnonzero(digits.target < classes)
    pixels = torch.tensor(digits.images[keep] / 16.0).unsqueeze(1)
    pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear").clamp(0, 1)
    tints = rng.uniform(0.3, 1.0, size=(len(keep), 3)) if tinted else np.ones((len(keep), 3))
    images = (pixels.squeeze(1).numpy()[..., None] * tints[:, None, None, :] * 255).round().astype(np.uint8)
    split = int(0.8 * len(keep))
    for position, index in enumerate(keep):
        if position < split:
            folder = root / "train"
            name = f"img_{index:04d}.png"
        else:
            folder = root / "test" / str(digits.target[index])
            name = f"img_{index:04d}.png"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[position]).save(folder / name)
    return root / "train", root / "test"


def on_one_thread(function):
    """Run ``function`` on one torch thread, whatever the machine: a seed fixes the draws, not the order of float
    sums, and the ViT's base came out of the same seed at 70.0% clean on one thread and 50.6% on two (15 epochs;
    after 2 epochs the weights already differed): the study's three ViT bases differ for that reason."""

    @functools.wraps(function)
    def on_one(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return on_one


@on_one_thread
def _train_timm(folder: Path, train: Path, test: Path, architecture: str, size: int, classes: int,
                mean, std, epochs: int = 15, lr: float = 3e-3, noise: float = 0.0, start: Path | None = None,
                seed: int = 0, **kwargs) -> float:
    """Cross-entropy training of a timm model on the train folder (labels from a side table), clean test accuracy.
    ``noise``: N(0, noise^2) pixel noise on a random half of each batch, as Cohen et al. train a base for smoothing
    (benchmarks/noise_capacity.py); ``start``: a timm folder to fine-tune instead of new weights."""
    from sklearn.datasets import load_digits

    from certify_zoo.data import labelled_images
    from certify_zoo.export import save_timm_model
    from certify_zoo.models import ImageClassifier, create_timm_model, load_timm_folder, preprocessing_config

    torch.manual_seed(seed)
    if start is not None:
        net = load_timm_folder(start).net
    else:
        net = create_timm_model(architecture, pretrained=False, num_classes=classes, **kwargs,
                                pretrained_cfg_overlay=dict(input_size=(3, size, size), mean=mean, std=std,
                                                            crop_pct=1.0, interpolation="bilinear",
                                                            num_classes=classes, hf_hub_id=None, url=None))
    classifier = ImageClassifier(net, preprocessing_config(net))
    transform = classifier.transform()
    from PIL import Image

    target = load_digits().target
    files = sorted(train.glob("*.png"))
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    y = torch.tensor([int(target[int(f.stem.split("_")[1])]) for f in files])
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.01)
    classifier.train()
    for epoch in range(epochs):
        for batch in torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch + 1000 * seed)).split(64):
            images = x[batch]
            if noise:
                noisy = (torch.rand(len(batch)) < 0.5).view(-1, 1, 1, 1)
                images = torch.where(noisy, images + noise * torch.randn_like(images), images)
            loss = torch.nn.functional.cross_entropy(classifier(images), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    save_timm_model(net, folder, [str(i) for i in range(classes)])
    evaluation = labelled_images(str(test), transform, [str(i) for i in range(classes)], classes)
    with torch.no_grad():
        images = torch.stack([evaluation[i][0] for i in range(len(evaluation))])
        labels = torch.tensor([evaluation[i][1] for i in range(len(evaluation))])
        return float((classifier(images).argmax(-1) == labels).float().mean())


def _halves(test: Path, root: Path) -> tuple[Path, Path]:
    """The evaluation split cut in two, alternate images of each class: (check half, rest half). The check half is
    what --check-data calibrates on (images the base never trained on, as a user's validation images would be), the
    rest half what the runs that compare calibrations are certified on."""
    import shutil

    check, rest = root / "test_check", root / "test_rest"
    if not rest.is_dir():
        for folder in sorted(p for p in test.iterdir() if p.is_dir()):
            for position, image in enumerate(sorted(folder.glob("*.png"))):
                target = (check if position % 2 == 0 else rest) / folder.name
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(image, target / image.name)
    return check, rest


def _test_folder(spec: dict) -> Path:
    """The evaluation split as a folder (the demo's is the embedded digits' test split)."""
    from certify_zoo.data import demo_folder

    return demo_folder() / "test" if spec["test"] == "demo" else Path(spec["test"])


def normalisation(model: str) -> tuple[tuple, tuple]:
    """The (mean, std) a study model's base normalises with: the tinted digits' colours have their own means."""
    return ((0.45, 0.40, 0.35), (0.22, 0.25, 0.28)) if model in TINTED else ((0.2,) * 3, (0.35,) * 3)


def prepare(model: str, work: Path) -> dict:
    """(base folder, conversion data, evaluation data, extra convert overrides) for a study model."""
    root = work / model
    if model == "demo":
        base = root / "base"
        if not (base / "config.json").is_file():
            train_demo_base(base, seed=0)
        return {"base": base, "train": "demo", "test": "demo", "overrides": {}}
    size, classes, architecture, kwargs = ARCHITECTURES[model]
    train, test = root / "data" / "train", root / "data" / "test"
    if not train.is_dir():
        _digits_folders(root / "data", size, classes, tinted=model in TINTED)
    base = root / "base"
    if not (base / "config.json").is_file():
        _train_timm(base, train, test, architecture, size, classes, *normalisation(model),
                    **BASE_TRAINING.get(model, {}), **kwargs)
    return {"base": base, "train": str(train), "test": str(test), "overrides": {"epochs": 10}}


def _at(record: dict, block: str, radius: float):
    rows = record["certificates"].get(block, {}).get("certified_accuracy", [])
    return next((row["accuracy"] for row in rows if abs(row["radius"] - radius) < 1e-9), None)


def base_record(model: str, spec: dict, work: Path, n: int, suffix: str = "") -> dict:
    """The base's Monte-Carlo certification (seed 0), once per model and evaluation set: every seed converts the same
    base."""
    cached = work / model / f"base-certification-n{n}{suffix}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    record = evaluate(EvaluateSettings(model=str(spec["base"]), data=spec["test"], radii=RADII, sigma=SIGMA,
                                       method="monte-carlo", n=n, seed=0, write=False)).record
    cached.write_text(json.dumps(record))
    return record


def _finished_conversion(out: Path, settings: ConvertSettings) -> float | None:
    """The seconds a finished conversion in ``out`` took, if it ran with ``settings`` (its output folder aside):
    a run stopped after converting is certified without converting again. None where there is none to reuse."""
    metadata_file = out / "certify_zoo.json"
    if not metadata_file.is_file():
        return None
    metadata = json.loads(metadata_file.read_text())
    wanted = json.loads(json.dumps(settings.to_record()))  # tuples as the record stores them
    if {**metadata["settings"], "out": None} != {**wanted, "out": None}:
        raise SystemExit(f"{out} holds a conversion with other settings than this run's: move it away")
    return metadata["seconds"]


def measure(model: str, seed: int, work: Path, n: int, overrides: dict, tag: str, half: bool = False,
            reuse: bool = False) -> dict:
    """One conversion and its certification. ``half``: certify on the rest half of the evaluation split only, so
    that a run calibrated on its check half (overrides ``{"check_data": "half"}``) is compared on the same images.
    ``reuse``: certify a finished conversion of the same settings found in the run's folder instead of converting."""
    spec = prepare(model, work)
    half = half or overrides.get("check_data") == "half"
    if half:
        check, rest = _halves(_test_folder(spec), work / model / "data")
        spec = {**spec, "test": str(rest)}
        overrides = {**overrides, **({"check_data": str(check)} if overrides.get("check_data") == "half" else {})}
    out = work / model / f"{tag}-seed{seed}"
    recipe_name = choose_recipe(str(spec["base"])).name if model != "demo" else "demo"
    settings = ConvertSettings.from_recipe(load_recipe(recipe_name, SIGMA), model=str(spec["base"]),
                                           data=spec["train"], out=str(out), seed=seed, overwrite=True,
                                           **{"sigma": SIGMA, **spec["overrides"], **overrides})
    seconds = _finished_conversion(out, settings) if reuse else None
    if seconds is None:
        started = time.perf_counter()
        convert(settings)
        seconds = time.perf_counter() - started
    metadata = json.loads((out / "certify_zoo.json").read_text())
    common = dict(data=spec["test"], radii=RADII, seed=seed, write=False)
    base = base_record(model, spec, work, n, "-rest" if half else "")
    full = evaluate(EvaluateSettings(model=str(out), method="all", n=n, audit="pgd", **common)).record
    raw = evaluate(EvaluateSettings(model=str(out), method="deterministic", audit="pgd", calibrated=False,
                                    **common)).record
    return {
        "model": model, "seed": seed, "tag": tag, "recipe": recipe_name,
        "overrides": {k: ("half" if k == "check_data" else v) for k, v in overrides.items()},
        **({"evaluated_on": "rest half"} if half else {}),
        "steps": metadata["steps"], "convert_seconds": round(seconds, 1),
        "gamma_final_effective": metadata["effective_gamma"], "gamma_mode": metadata["gamma"]["mode"],
        "kappa": metadata.get("calibration", {}).get("kappa", 1.0),
        "self_check": metadata.get("self_check"), "num_images": full["num_images"],
        "base_clean": base["clean_accuracy"], "clean": full["clean_accuracy"],
        "base_mc": {str(r): _at(base, "monte_carlo", r) for r in RADII},
        "mc": {str(r): _at(full, "monte_carlo", r) for r in RADII},
        "det_calibrated": {str(r): _at(full, "deterministic", r) for r in RADII},
        "det_raw": {str(r): _at(raw, "deterministic", r) for r in RADII},
        "pgd_calibrated": {k: full["audit"][k] for k in ("attacked", "counterexamples", "steps", "restarts")},
        "pgd_raw": {k: raw["audit"][k] for k in ("attacked", "counterexamples", "steps", "restarts")},
        "gamma_trajectory": metadata["gamma"].get("trajectory", []),
    }


def apply_cap(record: dict, work: Path) -> None:
    """Runs measured before the final rule on kappa (selfcheck.final_kappa: capped, withdrawn below a floor): apply
    it as the conversion now would (a function of the refined kappa alone: the same number) and certify the
    deterministic radius again; Monte-Carlo and the raw radius do not depend on kappa."""
    from certify_zoo.selfcheck import final_kappa

    for run in record["runs"]:
        kappa = final_kappa(run["kappa"], run["self_check"]["held_out_images"])
        if kappa == run["kappa"]:
            continue
        out = work / run["model"] / f"{run['tag']}-seed{run['seed']}"
        metadata_file = out / "certify_zoo.json"
        metadata = json.loads(metadata_file.read_text())
        metadata["calibration"] = {**metadata["calibration"], "kappa": kappa}
        metadata_file.write_text(json.dumps(metadata, indent=1))
        spec = prepare(run["model"], work)
        full = evaluate(EvaluateSettings(model=str(out), data=spec["test"], radii=RADII, seed=run["seed"],
                                         method="deterministic", audit="pgd", write=False)).record
        run.update(kappa=kappa, kappa_before_final_rule=run["kappa"],
                   det_calibrated={str(r): _at(full, "deterministic", r) for r in RADII},
                   pgd_calibrated={k: full["audit"][k] for k in ("attacked", "counterexamples", "steps", "restarts")})


def rescore_monte_carlo(record: dict, work: Path, n: int, tags: list[str] | None = None) -> Iterator[dict]:
    """Certify every run's saved model (and each base) again with Monte-Carlo at ``n`` samples, replacing the
    Monte-Carlo columns: conversion, kappa, the deterministic radii and PGD do not depend on n."""
    for run in record["runs"]:
        if run.get("n") == n or (tags and run["tag"] not in tags):
            continue
        spec = prepare(run["model"], work)
        out = work / run["model"] / run.get("folder", f"{run['tag']}-seed{run['seed']}")
        base = base_record(run["model"], spec, work, n)
        mc = evaluate(EvaluateSettings(model=str(out), data=spec["test"], radii=RADII, seed=run["seed"],
                                       method="monte-carlo", n=n, write=False)).record
        run.update(n=n, base_mc={str(r): _at(base, "monte_carlo", r) for r in RADII},
                   mc={str(r): _at(mc, "monte_carlo", r) for r in RADII})
        yield run


def flip_ratios(record: dict, work: Path, tags: list[str]) -> Iterator[dict]:
    """Are the calibration's held-out images drawn like the evaluation's? For each run of ``tags``: PGD inside the
    raw claims (the calibration's temperature) of its held-out conversion images, of other conversion images (which
    the student trained on) and of the whole evaluation split; per set, how many flips fell inside the calibrated
    radius (distance < kappa x the raw claim) and the shortest flip as a share of the raw claim."""
    from certify_zoo.certificates import certify_deterministic
    from certify_zoo.data import labelled_images
    from certify_zoo.data_sources import conversion_loader
    from certify_zoo.models import load_classifier
    from certify_zoo.selfcheck import REFINE_PGD, _audit

    for run in record["runs"]:
        if run["tag"] not in tags or "flip_ratios" in run:
            continue
        spec = prepare(run["model"], work)
        out = work / run["model"] / f"{run['tag']}-seed{run['seed']}"
        metadata = json.loads((out / "certify_zoo.json").read_text())
        calibration = metadata.get("calibration", {})
        # the reported kappa; where it was withdrawn (0), the refined one it would have been
        kappa, temperature = calibration["kappa"] or calibration["by_refinement"], calibration["temperature"]
        student = load_classifier(str(out)).eval()
        transform = student.transform()
        conversion = conversion_loader(spec["train"], transform, 64, run["seed"],
                                       holdout=metadata["settings"]["check_images"])
        trained = conversion.loader.dataset
        test = _test_folder(spec)
        classes = sorted(p.name for p in test.iterdir())
        evaluation = labelled_images(str(test), transform, classes, len(classes))
        sets = {"held-out": conversion.holdout,
                "trained": torch.stack([trained[i][0] for i in range(0, len(trained), max(1, len(trained) // 200))]),
                "evaluation": torch.stack([evaluation[i][0] for i in range(len(evaluation))])}
        generator = torch.Generator().manual_seed(run["seed"])
        found = {}
        for name, images in sets.items():
            with torch.no_grad():
                logits = torch.cat([student(images[i:i + 64]) for i in range(0, len(images), 64)])
            ratios, attacked, _ = _audit(student, images, certify_deterministic(logits, SIGMA, temperature),
                                         REFINE_PGD, generator, 64)
            finite = ratios[torch.isfinite(ratios)]
            found[name] = {"images": int(images.shape[0]), "attacked": attacked,
                           "inside_calibrated": int((ratios < kappa).sum()),
                           "shortest": round(float(finite.min()), 4) if finite.numel() else None}
        run["flip_ratios"] = {"kappa": kappa, "temperature": temperature, "pgd": REFINE_PGD.to_dict(), **found}
        yield run


def _tags(text: str) -> list[str]:
    """--tags: comma-separated, where a comma followed by a space belongs to a tag ('30 epochs, gamma only')."""
    return re.split(r",(?! )", text)


def study_parser(doc: str, models: str, seeds: str, n: int) -> argparse.ArgumentParser:
    """The arguments every study on these models takes: where to work, the record, which models and seeds, and the
    Monte-Carlo n."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--models", default=models)
    parser.add_argument("--seeds", default=seeds)
    parser.add_argument("--n", type=int, default=n)
    return parser


def main() -> None:
    parser = study_parser(__doc__, "demo,cnn16,convnext32", "0,1,2,3", 10_000)
    parser.add_argument("--overrides", default="{}", help="JSON of convert settings, e.g. '{\"gamma\": 0.05}'")
    parser.add_argument("--tag", default="defaults")
    parser.add_argument("--half", action="store_true",
                        help="certify on half of the evaluation split; the other half is what --overrides "
                             "'{\"check_data\": \"half\"}' calibrates on")
    parser.add_argument("--apply-cap", action="store_true",
                        help="only re-certify the runs of --record whose kappa is above the current cap")
    parser.add_argument("--rescore-mc", action="store_true",
                        help="only certify the saved models of --record again with Monte-Carlo at --n samples")
    parser.add_argument("--tags", default=None,
                        help="with --rescore-mc or --flip-ratios: only the runs of these tags (comma-separated; a "
                             "comma followed by a space belongs to a tag)")
    parser.add_argument("--flip-ratios", action="store_true",
                        help="only measure, for the runs of --tags in --record, flips inside the calibrated radius "
                             "on held-out, trained and evaluation images")
    parser.add_argument("--reuse", action="store_true",
                        help="certify a finished conversion with the same settings found in a run's folder")
    parser.add_argument("--merge", nargs="*", type=Path, default=[],
                        help="only join these records' runs into --record (no measuring); the docs render the means")
    args = parser.parse_args()
    if args.apply_cap:
        record = json.loads(args.record.read_text())
        apply_cap(record, args.work)
        args.record.write_text(json.dumps(record, indent=1) + "\n")
        return
    if args.rescore_mc:
        record = json.loads(args.record.read_text())
        for run in rescore_monte_carlo(record, args.work, args.n, _tags(args.tags) if args.tags else None):
            args.record.write_text(json.dumps(record, indent=1) + "\n")
            print(json.dumps({k: run[k] for k in ("model", "seed", "tag", "n", "mc", "base_mc")}), flush=True)
        return
    if args.flip_ratios:
        record = json.loads(args.record.read_text())
        for run in flip_ratios(record, args.work, _tags(args.tags)):
            args.record.write_text(json.dumps(record, indent=1) + "\n")
            print(json.dumps({k: run[k] for k in ("model", "seed", "tag", "flip_ratios")}), flush=True)
        return
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        merged = {**parts[0], "runs": [r for p in parts for r in p["runs"]]}  # the first record's keys, in order
        args.record.write_text(json.dumps(merged, indent=1) + "\n")
        return
    record = json.loads(args.record.read_text()) if args.record.is_file() else {
        "what": "gamma / soundness study (benchmarks/gamma_study.py)", "sigma": SIGMA, "radii": list(RADII),
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}", "runs": []}
    done = {(r["model"], r["seed"], r["tag"]) for r in record["runs"]}
    for model in args.models.split(","):
        for seed in map(int, args.seeds.split(",")):
            if (model, seed, args.tag) in done:
                continue
            row = measure(model, seed, args.work, args.n, json.loads(args.overrides), args.tag, args.half,
                          args.reuse)
            row["n"] = args.n
            record["runs"].append(row)
            args.record.parent.mkdir(parents=True, exist_ok=True)
            args.record.write_text(json.dumps(record, indent=1) + "\n")
            print(json.dumps({k: row[k] for k in ("model", "seed", "tag", "kappa", "clean", "mc", "det_calibrated",
                                                  "pgd_calibrated", "pgd_raw")}), flush=True)


if __name__ == "__main__":
    main()
