"""How far a deterministic certificate can reach: the same model's soft and hard Gaussian smoothing side by side.

The deterministic radius sigma/2 (PhiInv(p1) - PhiInv(p2)) is a proof for the soft Gaussian average
g(x) = E softmax m(x + eta); Cohen et al.'s Monte-Carlo certificate is one for the hard vote, the class m predicts
most often under the same noise. Per model and held-out image, from n noisy copies (one seeded draw shared by the
models): certified accuracy at each radius of

- "v(x)": the deterministic radius from one forward pass (raw: kappa 1, temperature 1);
- "soft average": the same bound applied to the estimated g(x) itself, what a perfect approximation of it would give;
- "hard vote": Cohen's radius sigma PhiInv(pA) of the vote share pA (pB = 1 - pA).

All three are point estimates (no confidence bound): a ceiling for what each certificate reaches on these models, not
certificates. For the base f, the soft average is what the conversion's student v approximates (its deterministic
radius' ideal); for v, the hard vote is what `evaluate --method monte-carlo` certifies (there with a bound).

    PYTHONPATH=. python benchmarks/soft_vs_hard.py --work W --models demo,cnn16 --tag paper --seeds 0,1,2,3 \\
        --record docs/records/soft_vs_hard.json

W is benchmarks/gamma_study.py's work folder: W/MODEL/base and W/MODEL/TAG-seedS, converted at sigma 0.5.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.seeds import t_interval  # noqa: E402
from certify_zoo.certificates import Smooth, gaussian_radius  # noqa: E402
from certify_zoo.data import demo_folder  # noqa: E402
from certify_zoo.models import load_classifier  # noqa: E402

SIGMA = 0.5
RADII = (0.0, 0.25, 0.5, 0.75)
EFFNET_SIGMA = 0.25  # the penalty study's EfficientNet-Lite2 conversions
KINDS = ("v(x)", "soft average", "hard vote")


def held_out_images(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class folders of PNGs at the model's input size, in [0,1]."""
    import numpy as np
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    pixels = [np.asarray(Image.open(f).convert("RGB").resize((size, size)), dtype=np.float32) / 255 for f in files]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2), torch.tensor([int(f.parent.name) for f in files])


def smoothing(model: torch.nn.Module, images: torch.Tensor, n: int, seed: int, sigma: float = SIGMA,
              batch_size: int = 400) -> dict[str, torch.Tensor]:
    """softmax m(x), its Gaussian average and the vote shares, from n noisy copies of every image (the noise and
    counting of `evaluate`'s Monte-Carlo certificate: certificates.Smooth)."""
    with torch.no_grad():
        clean = model(images).softmax(-1)
    votes, sums = Smooth(model, clean.shape[1], sigma).sample_noise(
        images, n, batch_size, torch.Generator().manual_seed(seed), with_probabilities=True)
    return {"clean": clean, "soft": sums / n, "votes": votes.float() / n}


def certified_accuracies(probabilities: dict[str, torch.Tensor], labels: torch.Tensor, n: int,
                         sigma: float = SIGMA, radii: tuple[float, ...] = RADII) -> dict[str, list]:
    """Per kind: certified accuracy (%) at each of ``radii``."""
    out = {}
    for kind, source in zip(KINDS, ("clean", "soft", "votes")):
        top = probabilities[source].topk(2, dim=-1)
        p1, p2 = top.values[:, 0], top.values[:, 1]
        if kind == "hard vote":  # Cohen's radius; a share of 1 read as 1 - 1/n (one vote short), not infinity
            radius = sigma * torch.special.ndtri(p1.clamp(max=1 - 1 / n)).clamp_min(0.0)
        else:
            radius = gaussian_radius(p1, p2, sigma)
        correct = top.indices[:, 0] == labels
        out[kind] = [100.0 * float(((radius >= r) & correct).float().mean()) for r in radii]
    return out


def study(work: Path, models: list[str], tag: str, seeds: list[int], n: int) -> dict:
    rows = []
    for name in models:
        root = work / name
        data = demo_folder() / "test" if name == "demo" else root / "data" / "test"
        for label, folder in [("base", root / "base")] + [(f"{tag} seed {s}", root / f"{tag}-seed{s}") for s in seeds]:
            model = load_classifier(str(folder)).eval()
            images, labels = held_out_images(data, model.input_size[-1])
            result = certified_accuracies(smoothing(model, images, n, seed=0), labels, n)
            rows.append({"model": name, "network": label, "images": len(labels), **result})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows, "table": summary_table(rows, tag)}


def efficientnet_lite2(work: Path, tag: str, seeds: list[int], n: int) -> dict:
    """The real EfficientNet-Lite2 (ImageNet-1k weights) on the shipped photos, as the penalty study converted it
    (sigma 0.25, 20 steps): label-free, "correct" is agreeing with the base's top-1 on the clean photo."""
    sys.path.insert(0, str(REPO / "tests"))
    from real_model import load_photos

    radii = tuple(EFFNET_SIGMA * r / SIGMA for r in RADII)  # the same multiples of sigma as the labelled models
    rows, labels = [], None
    for label, folder in [("base", work / "efficientnet_lite2")] + [
            (f"{tag} seed {s}", work / f"{tag}-seed{s}") for s in seeds]:
        model = load_classifier(str(folder)).eval()
        _, images = load_photos(model, work / "photos")
        probabilities = smoothing(model, images, n, seed=0, sigma=EFFNET_SIGMA, batch_size=48)  # 260 px photos
        labels = probabilities["clean"].argmax(-1) if labels is None else labels  # the base comes first
        rows.append({"model": "efficientnet_lite2", "network": label, "images": len(labels),
                     **certified_accuracies(probabilities, labels, n, EFFNET_SIGMA, radii)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"sigma": EFFNET_SIGMA, "radii": list(radii), "n": n, "rows": rows,
            "table": summary_table(rows, tag, radii, "agreement with the base's top-1 at r = {:g} %")}


def summary_table(rows: list[dict], tag: str, radii: tuple[float, ...] = RADII,
                  heading: str = "r = {:g} %") -> dict:
    """Per model, the base and the mean over the converted seeds [95% t interval], each kind at each radius."""
    columns = ["model", "network", "certificate"] + [heading.format(r) for r in radii]
    table = []
    for name in dict.fromkeys(row["model"] for row in rows):
        base = next(row for row in rows if row["model"] == name and row["network"] == "base")
        converted = [row for row in rows if row["model"] == name and row["network"] != "base"]
        for kind in KINDS:
            table.append([name, "base", kind] + [f"{value:.1f}" for value in base[kind]])
        for kind in KINDS if converted else ():
            cells = []
            for i in range(len(radii)):
                values = [row[kind][i] for row in converted]
                low, high = t_interval(values)
                cells.append(f"{sum(values) / len(values):.1f} [{max(0.0, low):.1f}, {min(100.0, high):.1f}]")
            table.append([name, f"converted ({tag}, {len(converted)} seeds)", kind] + cells)
    return {"columns": columns, "rows": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="gamma_study.py's work folder (with --models)")
    parser.add_argument("--models", default="demo,cnn16",
                        help="labelled models; '' keeps those of --record and measures only the EfficientNet-Lite2")
    parser.add_argument("--tag", default="paper")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--n", type=int, default=1000, help="noisy copies per image")
    parser.add_argument("--effnet-work", type=Path, default=None,
                        help="also the real EfficientNet-Lite2: penalty_cost_study.py's work folder")
    parser.add_argument("--effnet-tag", default="paper", help="its conversions: EFFNET_WORK/TAG-seedS")
    parser.add_argument("--effnet-seeds", default="0,1")
    parser.add_argument("--effnet-n", type=int, default=500, help="noisy copies per photo (260 px: slow on a CPU)")
    parser.add_argument("--record", type=Path, default=None)
    parser.add_argument("--provenance", default="{}", help="JSON: command, code, date, machine")
    args = parser.parse_args()
    if args.models:
        if args.work is None:
            parser.error("--models needs --work")
        result = study(args.work, args.models.split(","), args.tag, [int(s) for s in args.seeds.split(",")], args.n)
        record = {"title": "Soft and hard Gaussian smoothing of the same models", "sigma": SIGMA,
                  "radii": list(RADII), "n": args.n, **result}
    elif args.record is None or not args.record.is_file():
        parser.error("--models '' keeps the labelled models of an existing --record: name one")
    else:
        record = json.loads(args.record.read_text())
    record["provenance"] = json.loads(args.provenance)
    if args.effnet_work is not None:
        record["efficientnet_lite2"] = efficientnet_lite2(args.effnet_work, args.effnet_tag,
                                                          [int(s) for s in args.effnet_seeds.split(",")], args.effnet_n)
    if args.record:
        args.record.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["table"], indent=1))


if __name__ == "__main__":
    main()
