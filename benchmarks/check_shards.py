"""The gamma controller's check on several processes: every process measuring all of it, or each its share.

    PYTHONPATH=. python benchmarks/check_shards.py --record docs/records/check_shards.json
    PYTHONPATH=. python benchmarks/check_shards.py --quick      # timm's tiny test net, 8 images, one repeat

Every process needs the check's rho values to take the same decision. Until this benchmark each process measured
all of them (``whole``); now each of N processes takes the input gradients of every N-th chunk and an all-reduce
sums the parts (``shared``, what ``convert`` runs: ``convert.check_shard_of``). The script starts itself under
``torch.distributed.run`` with N CPU processes of one torch thread each (gloo), builds the three benchmark models
from their timm configs (random weights: the time does not depend on them) in the conversion mode of a large
ImageNet run (BatchNorm on batch statistics), and times one check of a held-out slice both ways, interleaved, the
median of repeats after a warm-up; each time is the slowest process's. It also says whether both ways gave every
process the same values, bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from noisy_batch import finish, provenance  # noqa: E402

MODELS = {name: (224, 1000, name) for name in ("resnet10t", "convnext_atto", "vit_tiny_patch16_224")}
QUICK_MODELS = {"test_resnet": (256, 10, "test_resnet")}  # timm's tiny test net, at a size that makes several chunks


def check_seconds(model, images: torch.Tensor, shard) -> tuple[torch.Tensor, float]:
    """One controller check's rho values (convert._steer_gamma's measurement) and its wall time, the slowest
    process's (all wait at a barrier before the clock stops)."""
    from certify_zoo.smoothness import rho_at_probe_points

    torch.distributed.barrier()
    start = time.perf_counter()
    values = rho_at_probe_points(model, images, 0.25, torch.Generator().manual_seed(0), shard)
    torch.distributed.barrier()
    return values, time.perf_counter() - start


def measure(name: str, spec: tuple, images: int, repeats: int, accelerator) -> dict:
    from certify_zoo.conversion import check_shard_of
    from certify_zoo.forward_modes import set_conversion_mode
    from certify_zoo.models import create_timm_model
    from certify_zoo.smoothness import ALONE, CHECK_BATCH, _piece, chunks

    size, classes, architecture = spec
    torch.manual_seed(0)
    net = create_timm_model(architecture, pretrained=False, num_classes=classes)
    set_conversion_mode(net, "recompute")
    held_out = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(1))
    ways = {"whole": ALONE, "shared": check_shard_of(accelerator)}
    for shard in ways.values():  # warm-up
        check_seconds(net, held_out, shard)
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    values: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for way, shard in ways.items():
            values[way], elapsed = check_seconds(net, held_out, shard)
            seconds[way].append(elapsed)
    median = {way: statistics.median(times) for way, times in seconds.items()}
    same = torch.tensor(float(torch.equal(values["whole"], values["shared"])))
    same_everywhere = bool(accelerator.reduce(same, "min").item())
    points = images * 4  # the images, a neighbour of each, two points along each claim
    piece = _piece(CHECK_BATCH, held_out)  # the descent's chunks of images, then rho's of points
    return {"model": name, "architecture": architecture, "image_size": size, "held_out_images": images,
            "points": points, "chunks": len(list(chunks(images, piece))) + len(list(chunks(points, piece))),
            "whole_s": median["whole"], "shared_s": median["shared"],
            "speedup": median["whole"] / median["shared"], "same_values": same_everywhere}


def worker(out: Path, models: dict, images: int, repeats: int) -> None:
    from certify_zoo.distributed import make_accelerator

    accelerator = make_accelerator()
    rows = [measure(name, spec, images, repeats, accelerator) for name, spec in models.items()]
    if accelerator.is_main_process:
        for row in rows:
            print(row["model"], json.dumps({key: row[key] for key in ("whole_s", "shared_s", "speedup",
                                                                      "same_values")}), flush=True)
        out.write_text(json.dumps({"rows": rows}))


def table(rows: list[dict], processes: int) -> dict:
    columns = ["model", "image size", "held-out images (points)", "chunks", "every process measures all: s",
               f"each of {processes} measures its share: s", "speed-up", "same values on every process"]
    body = [[row["model"], f"{row['image_size']} px", f"{row['held_out_images']} ({row['points']})",
             str(row["chunks"]), f"{row['whole_s']:.2f}", f"{row['shared_s']:.2f}", f"{row['speedup']:.2f}x",
             "yes" if row["same_values"] else "no"] for row in rows]
    return {"columns": columns, "rows": body}


def summary(rows: list[dict], processes: int) -> str:
    speedups = [row["speedup"] for row in rows]
    spread = f"{min(speedups):.2f}x" if len(rows) == 1 else f"{min(speedups):.2f}-{max(speedups):.2f}x"
    same = "the same" if all(row["same_values"] for row in rows) else "NOT the same"
    return (f"on {processes} CPU processes, one gamma-controller check of {rows[0]['held_out_images']} held-out "
            f"images ran {spread} faster shared than measured whole by every process ({len(rows)} "
            f"model{'s' * (len(rows) != 1)} at {rows[0]['image_size']} px), with {same} values bit for bit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", type=Path)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=None, help="held-out images (default 32; --quick: 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # set when the script starts itself
    args = parser.parse_args()
    models, repeats = (QUICK_MODELS, 1) if args.quick else (MODELS, args.repeats)
    images = args.images or (8 if args.quick else 32)
    if args.worker:
        worker(args.worker, models, images, repeats)
        return
    processes = args.processes
    torch.set_num_threads(1)  # what the workers run with, for the record's machine line
    setup = (f"{processes} processes under torch.distributed.run (gloo), one torch thread each; random weights in "
             f"the conversion mode of a large run (BatchNorm on batch statistics); {images} held-out images of "
             f"uniform noise at the model's size, sigma 0.25; one check = the probe points and rho at each, as "
             f"convert measures them; median of {repeats} interleaved repeats after a warm-up, each the slowest "
             f"process's time")
    measured_on = provenance(f"PYTHONPATH=. python benchmarks/check_shards.py --processes {processes} --record R",
                             setup)  # before the run: its load average is the machine's at the start
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="check-shards-") as scratch:
        out = Path(scratch) / "rows.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(port), __file__, "--worker", str(out), "--images", str(images),
                   "--repeats", str(repeats)] + (["--quick"] if args.quick else [])
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": scratch}
        subprocess.run(command, check=True, env=environment)
        rows = json.loads(out.read_text())["rows"]
    record = {"title": "The gamma controller's check on several processes: whole on each, or shared",
              "provenance": measured_on, "models": rows, "table": table(rows, processes),
              "summary": summary(rows, processes)}
    finish(record, args.record)


if __name__ == "__main__":
    main()
