"""Monte-Carlo certification on a CPU: how many noisy images should one forward take?

    PYTHONPATH=. python benchmarks/noisy_batch.py --record docs/records/noisy_batch.json
    PYTHONPATH=. python benchmarks/noisy_batch.py --quick      # two models, one repeat: the format only (tests)

``evaluate`` certifies a batch of images at once, each forward carrying ``chunk // images`` noisy copies of every
image (``Smooth.sample_noise``); ``certificates.noisy_batch_size`` picks the chunk. On a GPU it keeps the input
memory of ``--batch-size`` images at 224 px ("memory-matched": 64 at 224 px, 64 x 49 = 3,136 noisy images at
32 px, the cap of 10,000 at 16 px and below), which until this benchmark was the rule on a CPU too. On a CPU it
now takes as many as fit in a budget of input elements (fewer than the batch's images at 224 px: then one noisy
copy of each, forwarded in pieces). For each model (random weights from timm configs: the demo's ViT and the gamma
study's models at their sizes, and the three models of ``benchmarks/run.py`` at 224 px; throughput does not depend
on the weights) it times ``sample_noise`` on a batch of 64 images with the chunk of each rule: the memory-matched
one and three CPU budgets (the shipped one marked). Each figure is the median of repeats after a warm-up, the rules
interleaved within each repeat so that a busy machine slows all alike; the result is the ratio to the
memory-matched rule. The forward batch reported is the largest one the model saw, not a formula.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from certify_zoo.certificates import CPU_NOISY_INPUT_ELEMENTS, Smooth, noisy_batch_size  # noqa: E402

IMAGES = 64  # evaluate's default --batch-size
BUDGETS = tuple(sorted({2 ** 18, CPU_NOISY_INPUT_ELEMENTS, 2 ** 20}))  # input elements per forward
QUICK_MODELS = ("demo", "cnn16")


def models() -> dict[str, tuple[int, int, str, dict]]:
    """name: (image size, classes, timm architecture, its arguments): the demo's ViT and the gamma study's models."""
    from certify_zoo.demo import DEMO_ARCHITECTURE, DEMO_MODEL_ARGS
    from gamma_study import ARCHITECTURES

    return {"demo": (8, 10, DEMO_ARCHITECTURE, DEMO_MODEL_ARGS), **ARCHITECTURES,
            **{name: (224, 1000, name, {}) for name in ("resnet10t", "convnext_atto", "vit_tiny_patch16_224")}}


def rules(size: int) -> dict[str, int]:
    """The chunk each rule gives a batch of IMAGES images of 3 x size x size."""
    shape = (3, size, size)
    chosen = {"memory-matched (GPU rule)": noisy_batch_size(IMAGES, shape, "cuda")}
    for budget in BUDGETS:
        mark = " (shipped)" if budget == CPU_NOISY_INPUT_ELEMENTS else ""
        chosen[f"CPU budget 2^{budget.bit_length() - 1}{mark}"] = noisy_batch_size(IMAGES, shape, "cpu",
                                                                                cpu_input_elements=budget)
    return chosen


def measure(name: str, spec: tuple, repeats: int) -> dict:
    """Noisy forwards per second of sample_noise under each rule's chunk (median over repeats)."""
    from certify_zoo.models import create_timm_model

    size, classes, architecture, kwargs = spec
    torch.manual_seed(0)
    net = create_timm_model(architecture, pretrained=False, num_classes=classes, **kwargs).eval()
    seen: list[int] = []  # the sizes of the forwards sample_noise makes (read in the warm-up)
    smooth = Smooth(lambda x: seen.append(len(x)) or net(x), classes, sigma=0.5)
    images = torch.rand(IMAGES, 3, size, size)
    chunks = rules(size)
    # every rule draws the same number of noisy copies, at least two forwards of the largest chunk
    copies = max(2 * max(chunk // IMAGES for chunk in chunks.values()), 8)
    generator = torch.Generator().manual_seed(0)
    forward_batch = {}
    for chunk in set(chunks.values()):  # warm-up: one round of forwards of each shape
        seen.clear()
        smooth.sample_noise(images, max(1, chunk // IMAGES), chunk, generator)
        forward_batch[chunk] = max(seen)
    rates: dict[str, list[float]] = {rule: [] for rule in chunks}
    for _ in range(repeats):
        for rule, chunk in chunks.items():
            start = time.perf_counter()
            smooth.sample_noise(images, copies, chunk, generator)
            rates[rule].append(IMAGES * copies / (time.perf_counter() - start))
    median = {rule: statistics.median(values) for rule, values in rates.items()}
    reference = median["memory-matched (GPU rule)"]
    row = {"model": name, "architecture": architecture, "image_size": size, "noisy_copies_per_image": copies,
           "rules": {rule: {"chunk": chunks[rule], "forward_batch": forward_batch[chunks[rule]],
                            "noisy_per_s": median[rule], "vs_memory_matched": median[rule] / reference}
                     for rule in chunks}}
    print(name, json.dumps({rule: [r["forward_batch"], round(r["noisy_per_s"]), round(r["vs_memory_matched"], 2)]
                            for rule, r in row["rules"].items()}), flush=True)
    return row


def table(rows: list[dict]) -> dict:
    """{"columns", "rows"}: per model, each rule's forward batch, noisy images/s and ratio to memory-matched."""
    names = list(rows[0]["rules"])
    columns = ["model", "image size"] + [f"{rule}: forward batch, noisy img/s (vs memory-matched)" for rule in names]
    body = [[row["model"], f"{row['image_size']} px"]
            + [f"{r['forward_batch']:,}, {r['noisy_per_s']:,.0f} ({r['vs_memory_matched']:.2f}x)"
               for r in (row["rules"][rule] for rule in names)] for row in rows]
    return {"columns": columns, "rows": body}


def summary(rows: list[dict]) -> str:
    shipped = next(rule for rule in rows[0]["rules"] if "(shipped)" in rule)
    ratios = [row["rules"][shipped]["vs_memory_matched"] for row in rows]
    spread = f"{min(ratios):.2f}x" if len(rows) == 1 else f"{min(ratios):.2f}-{max(ratios):.2f}x"
    sizes = sorted({row["image_size"] for row in rows})
    return (f"on {len(rows)} model{'s' * (len(rows) != 1)} ({', '.join(f'{s} px' for s in sizes)}) the shipped CPU "
            f"rule certified {spread} as many noisy images per second as the memory-matched batch")


def provenance(command: str, setup: str) -> dict:
    """The record's provenance: command, date, commit, this machine (threads, torch, load at start), setup."""
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").is_file() else "unknown"
    threads = torch.get_num_threads()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return {"command": command, "date": time.strftime("%Y-%m-%d"), "code": f"commit {commit}",
            "machine": f"{platform.machine()} CPU, {threads} torch thread{'s' * (threads != 1)}, "
                       f"torch {torch.__version__}, load average {load} at start",
            "setup": setup}


def finish(record: dict, path: Path | None) -> None:
    """Print the record's summary; write the record to ``path`` when given."""
    print(record["summary"])
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", type=Path)
    parser.add_argument("--models", default=None, help="comma-separated; default: all (--quick: demo,cnn16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    available = models()
    chosen = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else available)
    repeats = 1 if args.quick else args.repeats
    rows = [measure(name, available[name], repeats) for name in chosen]
    setup = (f"random weights; a batch of {IMAGES} images of uniform noise at the model's size; sample_noise as "
             f"evaluate runs it, sigma 0.5; median of {repeats} interleaved repeats after a warm-up")
    record = {"title": "Monte-Carlo certification on a CPU: noisy images per forward",
              "provenance": provenance("PYTHONPATH=. python benchmarks/noisy_batch.py --record R", setup),
              "models": rows, "table": table(rows), "summary": summary(rows)}
    finish(record, args.record)


if __name__ == "__main__":
    main()
