"""The PGD audit on a CPU: how many images should one forward and backward take?

    PYTHONPATH=. python benchmarks/audit_batch.py --record docs/records/audit_batch.json
    PYTHONPATH=. python benchmarks/audit_batch.py --quick      # a tiny model, 4 images, one repeat: the format only

``evaluate`` attacks the audited images of a batch together, and the conversion's self-check its held-out images in
batches of 64: each PGD step is one forward and one input-gradient backward (rho's gradients are the same work).
Until this benchmark they went through the model as one batch; on a CPU they now go in pieces of at most
``certificates.forward_piece`` images. For each model (random weights from timm configs at 224 px; throughput does
not depend on the weights) it times ``pgd_l2`` on a batch of images with each rule: the whole batch and three CPU
budgets of input elements per piece (the shipped one marked), in image-steps per second (images x forward+backward
passes). Each figure is the median of repeats after a warm-up, the rules interleaved within each repeat so that a
busy machine slows all alike; the result is the ratio to the whole batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from certify_zoo.audit import PGDSettings, pgd_l2  # noqa: E402
from certify_zoo.certificates import CPU_CHECK_INPUT_ELEMENTS, forward_piece  # noqa: E402
from noisy_batch import finish, provenance  # noqa: E402

BUDGETS = tuple(sorted({2 ** 19, CPU_CHECK_INPUT_ELEMENTS, 2 ** 21, 2 ** 22}))
MODELS = {name: (224, 1000, name) for name in ("resnet10t", "convnext_atto", "vit_tiny_patch16_224")}
QUICK_MODELS = {"test_resnet": (256, 10, "test_resnet")}  # timm's tiny test net, at a size where the pieces differ
STEPS = 2  # PGD steps per run: STEPS + 1 forward+backward passes, then one forward (the final check)


def rules(images: int, size: int) -> dict[str, int]:
    """Images per piece under each rule, for a batch of ``images`` images of 3 x size x size."""
    chosen = {"whole batch (before)": images}
    for budget in BUDGETS:
        mark = " (shipped)" if budget == CPU_CHECK_INPUT_ELEMENTS else ""
        chosen[f"CPU budget 2^{budget.bit_length() - 1}{mark}"] = forward_piece(images, (3, size, size), "cpu",
                                                                                budget)
    return chosen


def measure(name: str, spec: tuple, images: int, repeats: int) -> dict:
    from certify_zoo.models import create_timm_model

    size, classes, architecture = spec
    torch.manual_seed(0)
    net = create_timm_model(architecture, pretrained=False, num_classes=classes).eval()
    batch = torch.rand(images, 3, size, size)
    with torch.no_grad():
        target = net(batch).argmax(-1)
    radius = torch.full((images,), 1e-4)  # far inside every decision boundary: no early stop, no bisection
    settings = PGDSettings(steps=STEPS, restarts=1)
    pieces = rules(images, size)
    for piece in set(pieces.values()):  # warm-up: one run of each shape
        pgd_l2(net, batch, target, radius, settings, piece=piece)
    rates: dict[str, list[float]] = {rule: [] for rule in pieces}
    flipped = 0
    for _ in range(repeats):
        for rule, piece in pieces.items():
            start = time.perf_counter()
            result = pgd_l2(net, batch, target, radius, settings, piece=piece)
            rates[rule].append(images * (STEPS + 1) / (time.perf_counter() - start))
            flipped += int(result.flipped.sum())
    median = {rule: statistics.median(values) for rule, values in rates.items()}
    reference = median["whole batch (before)"]
    row = {"model": name, "architecture": architecture, "image_size": size, "images": images,
           "flipped": flipped, "rules": {rule: {"piece": pieces[rule], "image_steps_per_s": median[rule],
                                                 "vs_whole_batch": median[rule] / reference} for rule in pieces}}
    print(name, json.dumps({rule: [r["piece"], round(r["image_steps_per_s"], 1), round(r["vs_whole_batch"], 2)]
                            for rule, r in row["rules"].items()}), flush=True)
    return row


def table(rows: list[dict]) -> dict:
    names = list(rows[0]["rules"])
    columns = ["model", "image size", "batch"] + [f"{rule}: images per piece, image-steps/s (vs whole batch)"
                                                  for rule in names]
    body = [[row["model"], f"{row['image_size']} px", str(row["images"])]
            + [f"{r['piece']}, {r['image_steps_per_s']:,.1f} ({r['vs_whole_batch']:.2f}x)"
               for r in (row["rules"][rule] for rule in names)] for row in rows]
    return {"columns": columns, "rows": body}


def summary(rows: list[dict]) -> str:
    shipped = next(rule for rule in rows[0]["rules"] if "(shipped)" in rule)
    parts = []
    for images in dict.fromkeys(row["images"] for row in rows):
        ratios = [row["rules"][shipped]["vs_whole_batch"] for row in rows if row["images"] == images]
        spread = f"{min(ratios):.2f}x" if len(ratios) == 1 else f"{min(ratios):.2f}-{max(ratios):.2f}x"
        parts.append(f"{spread} at a batch of {images}")
    models = len({row["model"] for row in rows})
    return (f"on {models} model{'s' * (models != 1)} at {rows[0]['image_size']} px the shipped CPU pieces ran "
            f"{' and '.join(parts)} as many PGD image-steps per second as the whole batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", type=Path)
    parser.add_argument("--images", default=None, help="comma-separated batch sizes (default 32,64; --quick: 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    models, repeats = (QUICK_MODELS, 1) if args.quick else (MODELS, args.repeats)
    batches = [int(size) for size in (args.images or ("4" if args.quick else "32,64")).split(",")]
    rows = [measure(name, spec, images, repeats) for images in batches for name, spec in models.items()]
    setup = (f"random weights; batches of {' and '.join(map(str, batches))} images of uniform noise at the model's "
             f"size, each attacked inside a radius of 1e-4 (nothing flips: every run takes all its steps); pgd_l2 "
             f"with {STEPS} steps and 1 restart; median of {repeats} interleaved repeats after a warm-up")
    record = {"title": "The PGD audit on a CPU: images per forward and backward",
              "provenance": provenance("PYTHONPATH=. python benchmarks/audit_batch.py --record R", setup),
              "models": rows, "table": table(rows), "summary": summary(rows)}
    finish(record, args.record)


if __name__ == "__main__":
    main()
