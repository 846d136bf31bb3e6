"""Run under ``torchrun --nproc_per_node 2``: the real CLI (convert twice, evaluate once) in one process group,
then a gradient check of the Boot Camp penalty under DDP. Arguments: BASE DATA45 DATA48 WORKDIR."""
from __future__ import annotations

import atexit
import contextlib
import copy
import faulthandler
import io
import json
import sys
import time
from pathlib import Path

import torch


def run_cli(*args: str) -> None:
    from certify_zoo.cli import app

    try:
        app(list(args), standalone_mode=False)
    except SystemExit as exc:  # typer.Exit from friendly_errors
        if exc.code:
            raise


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def penalty_under_ddp(bn_mode: str, estimator: str) -> dict:
    """DDP gradient of the loss (several student calls per step, autograd.grad w.r.t. the input; for "jl" also
    several backward calls) against the single-process reference: the mean of the two halves' gradients, each
    half a separate forward (local BN)."""
    from accelerate.utils import set_seed

    from certify_zoo.distributed import make_accelerator
    from certify_zoo.draws import keyed_draws
    from certify_zoo.models import ImageClassifier, create_timm_model, preprocessing_config
    from certify_zoo.objective import ObjectiveSettings, boot_camp_step

    accelerator = make_accelerator()
    set_seed(0)
    net = create_timm_model("test_resnet", pretrained=False, num_classes=10)
    model = ImageClassifier(net, {**preprocessing_config(net), "input_size": (3, 32, 32)})
    with torch.no_grad():  # non-trivial running statistics, so that bn eval mode is not the identity
        model.train()(torch.rand(16, 3, 32, 32))
    base = copy.deepcopy(model).eval().requires_grad_(False)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    settings = ObjectiveSettings(sigma=0.25, reps=3, estimator=estimator, probes=2)

    def set_mode(m):
        m.train()
        if bn_mode == "eval":
            for child in m.modules():
                if isinstance(child, torch.nn.BatchNorm2d):
                    child.eval()

    halves = []
    for half in range(2):
        reference = copy.deepcopy(model)
        set_mode(reference)
        draws = keyed_draws(0, 1, 4 * half, 8, images[4 * half: 4 * half + 4].shape, 10, settings, torch.device("cpu"))
        boot_camp_step(reference, base, images[4 * half: 4 * half + 4], settings, 0.5, draws)
        halves.append(flat_grads(reference))
    expected = (halves[0] + halves[1]) / 2

    student = accelerator.prepare(copy.deepcopy(model))
    set_mode(student)
    rank = accelerator.process_index
    local = images[4 * rank: 4 * rank + 4]
    draws = keyed_draws(0, 1, 4 * rank, 8, local.shape, 10, settings, accelerator.device)
    result = {"ok": False}
    try:
        boot_camp_step(student, base, local, settings, 0.5, draws, accelerator.backward)
        got = flat_grads(accelerator.unwrap_model(student))
        result = {"ok": True, "max_abs_diff": float((got - expected).abs().max()),
                  "max_abs_grad": float(expected.abs().max()),
                  # how far the unsynchronised local gradient is: shows the all-reduce happened
                  "local_half_diff": float((halves[rank] - expected).abs().max())}
    except Exception as exc:  # reported to the test, which shows it
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    accelerator.free_memory()
    return result


def tiny_resnet():
    from certify_zoo.models import create_timm_model

    torch.manual_seed(0)
    return create_timm_model("resnet10t", num_classes=10, stem_width=8, channels=(8, 16, 16, 16))


def alone_and_shared(net, measure) -> list[tuple]:
    """``measure(model, shard)`` run by this process alone, then as its share under the conversion's shard (the parts
    summed over the processes): each result with the number of images ``net`` forwarded for it."""
    from certify_zoo.conversion import check_shard_of
    from certify_zoo.distributed import make_accelerator
    from certify_zoo.smoothness import ALONE

    forwarded = []

    def model(x):
        forwarded.append(x.shape[0])
        return net(x)

    results = []
    for shard in (ALONE, check_shard_of(make_accelerator())):
        forwarded.clear()
        results.append((measure(model, shard), sum(forwarded)))
    return results


def rho_in_shards() -> dict:
    """The gamma controller's rho as a conversion on two processes measures it (each process every second chunk, the
    parts summed by an all-reduce) against this process measuring every chunk alone, on a BatchNorm network on batch
    statistics (a chunk's answer depends on its companions): the images each measured, and whether the values are
    the same bits."""
    from certify_zoo.forward_modes import set_conversion_mode
    from certify_zoo.smoothness import rho_at_probe_points

    net = tiny_resnet()
    set_conversion_mode(net, "train")
    images = torch.rand(21, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    (alone, alone_measured), (shared, shared_measured) = alone_and_shared(
        net, lambda model, shard: rho_at_probe_points(model, images, 0.5, torch.Generator().manual_seed(2), shard, 4))
    return {"same_bits": torch.equal(alone, shared), "measured": shared_measured, "measured_alone": alone_measured}


def self_check_in_shards() -> dict:
    """A conversion's self-check on two processes (each attacks and measures its share, the parts summed in the
    conversion's check group) against this process checking alone, on a network confident enough that PGD breaks the
    claims of its sharpest temperature: whether the records are equal, and each process's forwards."""
    from certify_zoo.audit import PGDSettings
    from certify_zoo.selfcheck import BaseAnswers, self_check

    net = tiny_resnet().eval()
    images = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        net.get_classifier().weight.mul_(100.0)
        base = BaseAnswers.of(net(images))

    def check(model, shard):
        record = self_check(model, base, images, 0.5, 0, pgd=PGDSettings(steps=20, restarts=2), batch_size=8,
                            shard=shard)
        return {"record": record.to_record(), "calibration": record.calibration()}

    (alone, alone_forwards), (shared, shared_forwards) = alone_and_shared(net, check)
    return {"same_record": alone == shared, "candidates": shared["calibration"]["candidates"],
            "forwards": shared_forwards, "forwards_alone": alone_forwards}


class NoDecoding(torch.utils.data.Dataset):
    """In place of the loader's image decoding: a batch carries each row's example (as its label) and position."""

    def __getitem__(self, rows):
        from certify_zoo.data import Batch

        return Batch(torch.zeros(len(rows), 3, 2, 2), torch.tensor([row.label for row in rows]),
                     torch.tensor([row.position for row in rows]), 0)


def stream_split() -> list[list[int]]:
    """A streamed dataset of 4 shards (21 examples, split unevenly) through the streams' own split
    (data_sources.StreamLoader: split_dataset_by_node, one loader per process) and lockstep: the examples each
    process saw, and the stream positions it gave them."""
    from datasets import IterableDataset
    from certify_zoo.data_sources import StreamLoader
    from certify_zoo.distributed import gather_seen, lockstep, make_accelerator

    def examples(shards):
        for shard in shards:
            yield from ({"index": i} for i in range(5 * shard, 5 * shard + (6 if shard == 3 else 5)))

    def label_is_the_example(value):  # the "label" the loader maps is the example's own index
        return int(value)

    accelerator = make_accelerator()
    stream = IterableDataset.from_generator(examples, gen_kwargs={"shards": [0, 1, 2, 3]})
    loader = StreamLoader(stream, "index", None, batch_size=2, batches=None, labels=label_is_the_example,
                          label_column="index")
    loader.decode = NoDecoding()
    seen = [(int(example), int(position)) for batch, _ in lockstep(loader, accelerator)
            for example, position in zip(batch.labels.tolist(), batch.indices.tolist())]
    return gather_seen(seen, accelerator)


class RowFromPath(torch.utils.data.Dataset):
    """In place of the loader's image decoding: a batch carries each row's number, read from its image's path."""

    def __getitem__(self, rows):
        from certify_zoo.data import Batch

        numbers = [int(row.image["path"].removeprefix("row-").removesuffix(".png")) for row in rows]
        return Batch(torch.zeros(len(rows), 3, 2, 2), torch.tensor(numbers),
                     torch.tensor([row.position for row in rows]), 0)


def streams_through_the_loaders(folder: Path) -> dict:
    """A local parquet dataset of 96 rows in 4 files of unequal length (40, 8, 40, 8), read by the real
    conversion loader (6 rows held out) and evaluation loader (a calibration's first 5 rows left out): the rows held
    out, and the rows each process got, in lockstep as convert and evaluate take them. Split by file (datasets'
    default for 4 files over 2 processes), one process got 80 rows and the other 16."""
    import datasets
    from PIL import Image

    from certify_zoo.data_sources import conversion_loader, evaluation_loader
    from certify_zoo.distributed import gather_seen, lockstep, make_accelerator

    accelerator = make_accelerator()

    def png(k: int) -> bytes:  # row k's image: its red channel is k (held-out rows are kept out by their bytes)
        pixel = io.BytesIO()
        Image.new("RGB", (2, 2), (k, 0, 0)).save(pixel, format="PNG")
        return pixel.getvalue()

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    rows = datasets.Dataset.from_list([{"image": {"bytes": png(k), "path": f"row-{k}.png"}, "label": k % 10}
                                       for k in range(96)], features=features)
    if accelerator.is_main_process:
        folder.mkdir()
        first = 0
        for part, length in enumerate((40, 8, 40, 8)):
            rows.select(range(first, first + length)).to_parquet(str(folder / f"train-{part:05d}.parquet"))
            first += length
    accelerator.wait_for_everyone()

    def to_tensor(image):  # the held-out images say which rows they are
        return torch.full((3, 2, 2), float(image.getpixel((0, 0))[0]))

    def taken(loader, to_the_end: bool) -> tuple[list[list[int]], int]:
        """The rows each process took, and the number of steps in lockstep (what a progress bar counts)."""
        loader.decode = RowFromPath()
        steps = [batch for batch, _ in lockstep(loader, accelerator, to_the_end=to_the_end)]
        mine = [number for batch in steps if batch is not None for number in batch.labels.tolist()]
        return gather_seen(mine, accelerator), len(steps)

    conversion = conversion_loader(str(folder), to_tensor, batch_size=4, seed=0, holdout=6)
    evaluation = evaluation_loader(str(folder), to_tensor, None, 10, batch_size=4,
                                   leave_out={"split": "train", "first_rows": 5})
    (trained, _), (evaluated, evaluation_steps) = taken(conversion.loader, False), taken(evaluation.loader, True)
    return {"held_out": conversion.holdout[:, 0, 0, 0].int().tolist(), "trained": trained, "evaluated": evaluated,
            "evaluation_batches": len(evaluation.loader), "evaluation_steps": evaluation_steps}


def restorations_under_ddp(base: str, out: Path) -> list:
    """A conversion that breaches the agreement floor (the demo at 5x its lr, from 10x its gamma): the steps at which
    this process went back and a checksum of the state it went back to. Every process decides on its own (same
    weights, same held-out images), so the lists must be equal, or the processes' weights part."""
    from certify_zoo import rollback
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    restored, original = [], rollback.LastGoodState.restore

    def logged(self, model, optimizer):
        original(self, model, optimizer)
        state = [value.double().sum().item() for value in model.state_dict().values()]
        restored.append([self.step, round(sum(state), 6)])

    rollback.LastGoodState.restore = logged
    try:
        convert(ConvertSettings.from_recipe(load_recipe("demo"), model=base, data="demo", out=str(out), max_steps=40,
                                            batch_size=8, warmup=0.0, lr=0.1, gamma_start=2.0, agreement_floor=0.95))
    finally:
        rollback.LastGoodState.restore = original
    return restored


def lr_levers_under_ddp(base: str, out: Path) -> list:
    """An AdamW conversion whose controller raises the lr (the penalty is most of the loss from the start): every
    check's lever, lr scale and penalty share as this process saw them. The share comes from each process's own
    batches, gathered: the processes must agree on it, or their learning rates and weights part."""
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe
    from certify_zoo.smoothness import GammaController

    seen, original = [], GammaController.observe

    def logged(self, *args, **kwargs):
        restore = original(self, *args, **kwargs)
        seen.append([self.history[-1][key] for key in ("step", "lever", "lr_scale", "penalty_share")])
        return restore

    GammaController.observe = logged
    try:
        convert(ConvertSettings.from_recipe(load_recipe("demo"), model=base, data="demo", out=str(out), max_steps=30,
                                            batch_size=8, warmup=0.0, optimizer="adamw", lr=1e-5,
                                            clip_grad_norm=0.0))
    finally:
        GammaController.observe = original
    return seen


def evaluation_with_unreadable_images(base: str, data: str) -> dict:
    """evaluate on two processes where unreadable images leave them different numbers of images per batch."""
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    result = evaluate(EvaluateSettings(model=base, data=data, sigma=0.5, method="all", n=32, n0=8, batch_size=4,
                                       audit="pgd", audit_steps=5, audit_restarts=1, write=False))
    return {"record": result.record, "index": result.per_image["index"].tolist()}


@contextlib.contextmanager
def main_slow_to_make_out_other_slow_to_start(record_delay: float = 5.0, start_delay: float = 1.5):
    """The main process slow to write OUT's run record after creating OUT (an fsync on a busy disk) and the other
    process slow to start the command: the other process must not judge OUT by itself while the main process is
    making it (it would find a half-made folder that is not a conversion's and refuse it, and the main process then
    fail at the next collective, as a CI run once did)."""
    from certify_zoo import checkpoints

    original, delayed = checkpoints.write_json_atomic, []

    def slow(path, data):
        if not delayed:
            delayed.append(path)
            time.sleep(record_delay)
        original(path, data)

    if torch.distributed.get_rank() == 0:
        checkpoints.write_json_atomic = slow
    else:
        time.sleep(start_delay)
    try:
        yield
    finally:
        checkpoints.write_json_atomic = original


def main() -> None:
    # the whole driver takes under a minute: a process still running after 5 minutes is stuck; print where every
    # thread of it is (the test shows the end of stderr) and exit, instead of waiting out the test's timeout
    faulthandler.dump_traceback_later(300, exit=True)
    base, data45, data48, work, unreadable = sys.argv[1:6]
    work = Path(work)
    # no held-out images: the data-parallel arithmetic below counts every image; without them gamma stays fixed (the
    # controller's measurements would turn the 1-vs-2-process float differences into different gammas)
    common = ["--recipe", "demo", "--batch-size", "8", "--workers", "1", "--epochs", "1", "--record-seen",
              "--check-images", "0"]
    run_cli("convert", base, "--data", data45, "--out", str(work / "out45"), *common)
    with main_slow_to_make_out_other_slow_to_start():
        run_cli("convert", base, "--data", data48, "--out", str(work / "out48"), *common)
    run_cli("convert", base, "--data", unreadable, "--out", str(work / "out_unreadable"), *common)
    run_cli("evaluate", str(work / "out48"), "--data", "demo", "--method", "all", "--n", "64", "--n0", "16",
            "--batch-size", "8", "--workers", "1", "--max-images", "40")
    checks = {f"{mode}/{estimator}": penalty_under_ddp(mode, estimator)
              for mode in ("train", "eval") for estimator in ("paper", "jl")}
    streamed = stream_split()
    through_the_loaders = streams_through_the_loaders(work / "parquet")
    with_unreadable = evaluation_with_unreadable_images(base, unreadable)
    restored = restorations_under_ddp(base, work / "breach")
    (work / f"restorations_{torch.distributed.get_rank()}.json").write_text(json.dumps(restored))
    levers = lr_levers_under_ddp(base, work / "adamw")
    (work / f"rho_in_shards_{torch.distributed.get_rank()}.json").write_text(json.dumps(rho_in_shards()))
    (work / f"self_check_in_shards_{torch.distributed.get_rank()}.json").write_text(json.dumps(self_check_in_shards()))
    (work / f"lr_levers_{torch.distributed.get_rank()}.json").write_text(json.dumps(levers))
    if torch.distributed.get_rank() == 0:
        (work / "unreadable_eval.json").write_text(json.dumps(with_unreadable))
        (work / "ddp_penalty.json").write_text(json.dumps(checks))
        (work / "stream_split.json").write_text(json.dumps(streamed))
        (work / "streams_through_the_loaders.json").write_text(json.dumps(through_the_loaders))
    rank = torch.distributed.get_rank()
    print(f"DRIVER DONE rank {rank}")
    # what the interpreter does at exit, run now to see that it took the process group down, and joined its gloo
    # worker threads, before finalisation (certify_zoo.distributed._destroy_process_group_at_exit)
    workers_before = gloo_worker_threads()
    atexit._run_exitfuncs()
    (work / f"exit_hooks_{rank}.json").write_text(json.dumps({
        "initialized": torch.distributed.is_initialized(), "gloo_workers_before": workers_before,
        "gloo_workers_after": gloo_worker_threads()}))


def gloo_worker_threads() -> int:
    """This process's gloo worker threads (torch names them pt_gloo_runloop), from /proc."""
    tasks = Path("/proc/self/task")
    return sum((task / "comm").read_text().strip() == "pt_gloo_runloop" for task in tasks.iterdir())


if __name__ == "__main__":
    main()
