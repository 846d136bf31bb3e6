"""Streamed data (`datasets` IterableDataset) gives the same right answers as a folder: positions, labels, resume."""
from __future__ import annotations

import io
import signal
from pathlib import Path

import pytest
import torch

from conftest import error_line
from tiny_sources import digits_parquet


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_eval_stream(demo_data, tmp_path_factory) -> Path:
    """80 held-out digits as 2 parquet shards, with labels."""
    return digits_parquet(tmp_path_factory.mktemp("stream") / "test", demo_data, split="test", shards=2, limit=80)


def _streamed_evaluation(model: Path, data: Path, seed: int = 0, **extra):
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    return evaluate(EvaluateSettings(model=str(model), data=str(data), sigma=0.5, method="all", n=64, n0=16,
                                     batch_size=16, seed=seed, **extra))


def test_streamed_evaluation_draws_fresh_noise_per_batch_reproducibly(short_conversion, demo_data, tmp_path):
    """The same digit 48 times in a stream (3 batches): the Monte-Carlo estimate of each batch must use its own
    noise (shared noise would give the three batches identical numbers), and the same seed the same numbers."""
    import datasets
    from PIL import Image

    picture = sorted((demo_data / "test" / "3").glob("*.png"))[0]
    rows = [{"image": {"bytes": picture.read_bytes(), "path": None}, "label": 3}] * 48
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))})
    data = tmp_path / "same-digit"
    data.mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(data / "test.parquet"))
    assert Image.open(picture).size == (8, 8)

    first = _streamed_evaluation(short_conversion, data, write=False).per_image
    assert sorted(first["index"].tolist()) == list(range(48))  # stream positions, not -1
    gaps = first["gap_max_abs"].view(3, 16)  # noise is shared across a chunk's images: compare batches
    assert len({round(float(batch[0]), 7) for batch in gaps}) == 3
    again = _streamed_evaluation(short_conversion, data, write=False).per_image
    other = _streamed_evaluation(short_conversion, data, seed=1, write=False).per_image
    assert torch.equal(first["gap_max_abs"], again["gap_max_abs"])
    assert torch.equal(first["mc_prediction"], again["mc_prediction"])
    assert not torch.equal(first["gap_max_abs"], other["gap_max_abs"])


def test_streamed_audit_names_counterexamples_by_stream_position(short_conversion, digits_eval_stream, tmp_path):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(short_conversion, model)
    result = _streamed_evaluation(model, digits_eval_stream, audit="pgd", audit_steps=20, audit_restarts=1,
                                  calibrated=False)  # the raw radii claim most: counterexamples to name
    audit = json.loads((model / "audit.json").read_text())
    worst = audit["worst"]
    assert worst, "PGD finds counterexamples inside the 30-step conversion's claimed radii"
    assert all(row["file"] == f"stream position {row['index']}" for row in worst)
    assert len({row["index"] for row in worst}) == len(worst)
    assert all(0 <= row["index"] < result.record["num_images"] for row in worst)


def test_unlabelled_class_label_is_refused_naming_column_and_split(demo_base, demo_data, tmp_path, monkeypatch):
    """ClassLabel -1 marks a row without a label (e.g. ImageNet's test split): never the last class. Refused from the
    first rows, before a DataLoader starts workers (torn down mid-start, its queue threads closed a pipe twice)."""
    import datasets
    from typer.testing import CliRunner

    from certify_zoo import data_sources
    from certify_zoo.cli import app

    loaders = []  # the workers of each DataLoader a stream made

    def recorded(*args, **kwargs):
        loaders.append(kwargs["num_workers"])
        return torch.utils.data.DataLoader(*args, **kwargs)
    monkeypatch.setattr(data_sources, "DataLoader", recorded)

    picture = sorted((demo_data / "test" / "3").glob("*.png"))[0]
    rows = [{"image": {"bytes": picture.read_bytes(), "path": None}, "digit": -1}] * 4
    features = datasets.Features({"image": datasets.Image(), "digit": datasets.ClassLabel(names=list("0123456789"))})
    data = tmp_path / "unlabelled"
    data.mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(data / "test.parquet"))
    result = CliRunner().invoke(app, ["evaluate", str(demo_base), "--data", str(data), "--sigma", "0.5",
                                      "--batch-size", "4", "--method", "deterministic"])
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr)
    assert "label -1" in line and "'digit'" in line and "split test" in line, line
    assert loaders == []


WINDOW = 40  # rows per shuffle window: small, so that the kills fall in different windows
STREAM_RUN = ("--recipe", "demo", "--epochs", "3", "--batch-size", "16", "--reps", "1", "--seed", "5",
              "--checkpoint-every", "4", "--checkpoint-minutes", "0")  # 90 rows trained: 5 steps an epoch


@pytest.fixture(scope="module")
def small_stream(demo_data, tmp_path_factory) -> Path:
    """100 training digits as 3 parquet shards: three epochs of 6 batches cross windows and epochs."""
    return digits_parquet(tmp_path_factory.mktemp("stream") / "small", demo_data, limit=100)


def _convert_stream_in_process(base: Path, data: Path, out: Path, resume: bool = False) -> str:
    from rich.console import Console

    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    settings = ConvertSettings.from_recipe(load_recipe("demo"), model=str(base), data=str(data), out=str(out),
                                           epochs=3, batch_size=16, reps=1, seed=5, checkpoint_every=4,
                                           checkpoint_minutes=0, resume=resume)
    text = io.StringIO()
    convert(settings, console=Console(file=text, width=200))
    return text.getvalue()


def test_sigkill_during_a_streamed_conversion_then_resume_matches_uninterrupted_run(demo_base, small_stream,
                                                                                     tmp_path, monkeypatch):
    """kill -9 at three points of a streamed conversion (one while a checkpoint is written); --resume seeks each
    process's stream to its saved position and the weights equal an uninterrupted run's."""
    import json
    import random
    import re
    import subprocess
    import sys

    from certify_zoo import data_sources
    from test_resume import DYING_CLI, _env, _weights, max_weight_difference

    monkeypatch.setattr(data_sources, "SHUFFLE_BUFFER", WINDOW)
    reference = tmp_path / "reference"
    _convert_stream_in_process(demo_base, small_stream, reference)
    expected = _weights(reference)
    steps = json.loads((reference / "certify_zoo.json").read_text())["steps"]  # 3 epochs of the rows not held out
    assert steps >= 12
    dying = f"import certify_zoo.data_sources as d\nd.SHUFFLE_BUFFER = {WINDOW}\n" + DYING_CLI

    rng = random.Random()
    # two kills after the first checkpoint (step 4), one while a checkpoint is being written
    scenarios = [("step", rng.randint(5, steps // 2)), ("step", rng.randint(steps // 2 + 1, steps)),
                 ("checkpoint", rng.randint(2, (steps - 1) // 4))]
    report = []
    for where, at in scenarios:
        out = tmp_path / f"{where}-{at}"
        killed = subprocess.run([sys.executable, "-c", dying, "convert", str(demo_base), "--data", str(small_stream),
                                 "--out", str(out), *STREAM_RUN], env={**_env(), "DIE_IN": where, "DIE_AT": str(at)},
                                capture_output=True, text=True, timeout=600)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        log = _convert_stream_in_process(demo_base, small_stream, out, resume=True)
        match = re.search(r"resuming from step-\d+ \(step (\d+), epoch (\d+)", log)
        max_diff = max_weight_difference(out, expected)
        report.append(f"killed in {where} {at}: resumed at {match.groups() if match else 'the start'}, "
                      f"max |diff| {max_diff:.3g}")
        assert max_diff <= 1e-6, report
    print("\n".join(report))


def test_stream_position_resumes_mid_window_exactly(small_stream, monkeypatch):
    """The loader alone: positions saved after k batches, then a fresh loader resumed there, yield exactly the
    batches an uninterrupted pass yields after k, in an epoch other than the first."""
    from certify_zoo import data_sources
    from certify_zoo.data_sources import StreamLoader, open_stream, resolve_data_spec

    monkeypatch.setattr(data_sources, "SHUFFLE_BUFFER", WINDOW)
    stream, _ = open_stream(resolve_data_spec(str(small_stream)), "convert")

    def loader(seed: int | None = 7):
        made = StreamLoader(stream, "image", pixels, batch_size=16, batches=None, shuffle_seed=seed)
        made.set_epoch(2)
        return made

    whole = loader()
    batches = [(batch.indices.tolist(), batch.images) for batch in whole]
    assert [p for positions, _ in batches for p in positions] == list(range(100))  # order in the stream
    in_order = torch.cat([batch.images for batch in loader(seed=None)])
    shuffled = torch.cat([images for _, images in batches])
    assert not torch.equal(shuffled, in_order)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, in_order.tolist()))  # the same examples
    for consumed in (1, 3, 5):  # batch 3 starts in the second window, mid-window
        resumed = loader()
        resumed.resume(whole.position_after(consumed))
        again = [(batch.indices.tolist(), batch.images) for batch in resumed]
        assert [positions for positions, _ in again] == [positions for positions, _ in batches[consumed:]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again, batches[consumed:]))


def test_a_position_kept_before_streams_were_split_by_rows_is_refused_only_under_several_processes(small_stream):
    """Positions kept by a version that split a stream over processes by files name other rows under several
    processes (and datasets' state of another split): refused in one line. With one process nothing was split, and
    such a position resumes."""
    from certify_zoo.data_sources import StreamLoader, open_stream, resolve_data_spec
    from certify_zoo.errors import CertifyZooError

    stream, _ = open_stream(resolve_data_spec(str(small_stream)), "convert")
    loader = StreamLoader(stream, "image", nothing_but_zero, batch_size=16, batches=None)
    kept_before = {key: value for key, value in loader.position_after(1).items() if key != "split"}
    loader.resume(kept_before)  # one process
    batches = iter(loader)
    assert next(batches).indices.tolist() == list(range(16, 32))
    batches.close()  # its DataLoader workers stop now, not whenever the generator is collected
    loader.processes = 2
    with pytest.raises(CertifyZooError, match="split streams over processes by files"):
        loader.resume(kept_before)
    loader.resume(loader.position_after(1))  # recorded now: resumes


def test_a_conversion_position_kept_before_held_out_rows_were_filtered_is_refused(small_stream):
    """A conversion's position kept by a version that skipped the held-out rows names a state of another stream (its
    files read in order): refused in one line. An evaluation's (read in order, nothing held out) still resumes."""
    from certify_zoo.data_sources import StreamLoader, open_stream, resolve_data_spec
    from certify_zoo.errors import CertifyZooError

    stream, _ = open_stream(resolve_data_spec(str(small_stream)), "convert")
    conversion = StreamLoader(stream, "image", nothing_but_zero, batch_size=16, batches=None,
                              shuffle_seed=0)
    kept_now = conversion.position_after(1)
    kept_before = {key: value for key, value in kept_now.items() if key != "held_out"}
    with pytest.raises(CertifyZooError, match="read a stream's files in order after skipping its held-out rows"):
        conversion.resume(kept_before)
    conversion.resume(kept_now)
    evaluation = StreamLoader(stream, "image", nothing_but_zero, batch_size=16, batches=None)
    assert "held_out" in kept_now and evaluation.position_after(1)["held_out"] is None
    evaluation.resume(kept_before)


def test_held_out_rows_are_kept_out_by_their_bytes_and_the_files_still_interleave(demo_data, tmp_path, monkeypatch):
    """A class-ordered stream of 4 files, the third a copy of the first: the conversion's held-out rows (the first
    in its seed's read order) and their copies elsewhere are never trained on, and the files are still shuffled and
    read 4 at a time. Held out by skip(kept), datasets read the files in order, one at a time: the first window of
    24 rows came from the first file (3 of the 10 digits), whatever the seed."""
    from certify_zoo import data_sources
    from certify_zoo.data_sources import conversion_loader, decode_image

    monkeypatch.setattr(data_sources, "SHUFFLE_BUFFER", 24)
    source = digits_parquet(tmp_path / "ordered", demo_data, shards=3, limit=150)  # files of 50 rows, by class
    copy = tmp_path / "ordered" / "train-00003.parquet"
    copy.write_bytes((source / "train-00000.parquet").read_bytes())
    files = [sorted((demo_data / "train").rglob("*.png"))[50 * k:50 * k + 50] for k in range(3)]
    file_of = {tuple(pixels(decode_image({"bytes": path.read_bytes()})).tolist()): k for k in range(3)
               for path in files[k]}

    def first_window_and_all(seed: int):
        loader = conversion_loader(str(source), pixels, batch_size=8, seed=seed, holdout=6)
        trained = [tuple(image) for batch in loader.loader for image in batch.images.tolist()]
        held = {tuple(image) for image in loader.holdout.tolist()}
        return held, trained[:24], trained

    firsts = []
    for seed in (0, 1):
        held, first_window, trained = first_window_and_all(seed)
        # 6 rows, at least one of them twice: the first file and its copy are both among the first read
        assert 4 <= len(held) < 6 and not held & set(trained)
        removed = sum(2 if file_of[image] == 0 else 1 for image in held)  # a held-out image of file 0, and its copy
        assert len(trained) == min((200 - 6) // 8 * 8, 200 - removed)
        assert len({file_of[image] for image in held}) >= 2  # the first rows of several files
        assert len({file_of[image] for image in first_window}) >= 2
        firsts.append(first_window)
    assert firsts[0] != firsts[1]


def test_an_image_is_known_by_its_bytes_wherever_it_sits():
    """The held-out filter's key: the same bytes under two names are one image, a file-backed cell is known by its
    path, a decoded image by its pixels; a cell that is no image does not stop the stream (it is counted unreadable
    when decoded)."""
    from PIL import Image

    from certify_zoo.data_sources import content_key

    png = io.BytesIO()
    Image.new("RGB", (2, 2), (9, 0, 0)).save(png, format="PNG")
    image = png.getvalue()
    assert content_key({"bytes": image, "path": "a.png"}) == content_key({"bytes": image, "path": None})
    assert content_key({"bytes": image[:-1], "path": "a.png"}) != content_key({"bytes": image})
    assert content_key({"bytes": None, "path": "a.png"}) != content_key({"bytes": None, "path": "b.png"})
    assert content_key(Image.new("L", (2, 2), 3)) == content_key(Image.new("L", (2, 2), 3)) != content_key(
        Image.new("L", (2, 2), 4))
    assert content_key("not an image") != content_key(None)


def nothing_but_zero(image):  # a module's function, not a lambda: DataLoader workers may be started by forkserver
    return torch.zeros(1)  # (Python 3.14's default on Linux), which pickles what it hands them


def pixels(image):  # the digit itself identifies the example
    return torch.tensor(list(image.convert("L").tobytes()), dtype=torch.float32)


def test_stream_of_unknown_length_is_read_max_steps_times_grad_accum_batches_without_repeating(demo_base, small_stream,
                                                                                             tmp_path, monkeypatch):
    """A Hub stream need not say how many rows it has: --max-steps 2 --grad-accum 2 at batch 16 must train on 64
    different rows (4 micro-batches read from the stream), not on the first 32 twice."""
    import json

    from certify_zoo import data_sources
    from certify_zoo.conversion import SEEN_NAME, ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    monkeypatch.setattr(data_sources, "stream_length", lambda *args: None)
    out = tmp_path / "out"
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data=str(small_stream),
                                        out=str(out), max_steps=2, grad_accum=2, batch_size=16, reps=1, gamma=2.0,
                                        check_images=0, record_seen=True))
    record = json.loads((out / "certify_zoo.json").read_text())
    seen = [index for indices in json.loads((out / SEEN_NAME).read_text())["per_process"] for index in indices]
    assert (record["steps"], record["epochs_run"]) == (2, 1)
    assert len(seen) == 64 and len(set(seen)) == 64, sorted(seen)


def test_check_data_from_a_stream_reads_its_held_out_split_in_order(demo_data, demo_base, tmp_path):
    """--check-data from a datasets source: without a named split its validation/test split (here a local source
    with a train and a test split), the first rows in order, every process and resume alike; labels unread."""
    from PIL import Image

    from certify_zoo.data_sources import DEFAULT_CHECK_DATA, DEFAULT_DATA, check_images, resolve_data_spec
    from certify_zoo.models import load_classifier

    source = digits_parquet(tmp_path / "both", demo_data, split="train", shards=1, limit=30)
    digits_parquet(source, demo_data, split="test", shards=2, limit=20)
    transform = load_classifier(str(demo_base)).transform()
    checked = check_images(str(source), transform, 12, seed=0)
    drawn = checked.images
    assert checked.drawn == {"split": "test", "first_rows": 12}
    first_test = sorted((demo_data / "test").rglob("*.png"))[:12]
    assert torch.equal(drawn, torch.stack([transform(Image.open(path).convert("RGB")) for path in first_test]))
    assert torch.equal(drawn, check_images(str(source), transform, 12, seed=5).images)  # a stream's first rows: no draw
    # the default ImageNet source's check images come from its unlabelled test split
    assert resolve_data_spec(DEFAULT_CHECK_DATA).location == resolve_data_spec(DEFAULT_DATA).location
    assert resolve_data_spec(DEFAULT_CHECK_DATA).split == "test"
    from certify_zoo.conversion import ConvertSettings

    assert ConvertSettings(model="m", data=DEFAULT_DATA, out="o").check_data == DEFAULT_CHECK_DATA
    assert ConvertSettings(model="m", data=str(source), out="o").check_data is None  # a slice of --data
    # evaluating that same source leaves those rows out (the same split's first rows), and only then
    from certify_zoo.data_sources import evaluation_loader, left_out

    leave = left_out(str(source), {"split": "test", "first_rows": 12}, str(source))
    data = evaluation_loader(str(source), transform, None, 10, batch_size=4, leave_out=leave)
    assert data.left_out == 12 and data.num_images == 8
    labels = [label for batch in data.loader for label in batch.labels.tolist()]
    first_labels = [int(path.parent.name) for path in sorted((demo_data / "test").rglob("*.png"))[:20]]
    assert labels == first_labels[12:]
    other = digits_parquet(tmp_path / "other", demo_data, split="test", limit=5)
    assert left_out(str(source), {"split": "test", "first_rows": 12}, str(other)) is None


def test_a_class_ordered_stream_is_named_when_its_held_out_slice_is_one_class(demo_base, demo_data,
                                                                              short_conversion, tmp_path):
    """The digits stream in one file lists class 0 first, so its first rows, the held-out slice, are all zeros (with
    several files, datasets reads the first rows of several): the conversion says so before its first step and in
    its self-check (gamma and the calibration were measured on one class). A folder's held-out images are drawn at
    random and are not named."""
    import json

    from rich.console import Console

    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    out, text = tmp_path / "ordered", io.StringIO()
    one_file = digits_parquet(tmp_path / "one-file", demo_data, shards=1)
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data=str(one_file),
                                        out=str(out), max_steps=3, batch_size=64),  # 192 images: 19 held out
            console=Console(file=text, width=400))
    said = text.getvalue()
    check = json.loads((out / "certify_zoo.json").read_text())["self_check"]
    assert check["held_out_images"] == 19 and check["base_top_class_share"] >= 0.9  # the base is ~96% right
    warning = f"the base predicts one class for {check['base_top_class_share']:.0%} of the 19 held-out images"
    assert warning in said and said.index(warning) < said.index("self-check on")  # before the run, and after it
    assert any(warning in w for w in check["warnings"])
    drawn = json.loads((short_conversion / "certify_zoo.json").read_text())["self_check"]
    assert drawn["base_top_class_share"] < 0.5
    assert not any("predicts one class" in w for w in drawn["warnings"])


def test_agreement_counts_near_ties_and_tells_them_apart():
    """The agreement with the base counts every image, near-ties too (the gamma controller's floor reads it); the
    agreement where the base is sure leaves them out, and exists only where there are both kinds."""
    import torch

    from certify_zoo.selfcheck import BaseAnswers

    base = BaseAnswers.of(torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.1, 0.09, 0.0], [0.0, 0.1, 0.11]]))
    assert base.near_ties == 2
    near_ties_flipped = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert base.agreement(near_ties_flipped) == 0.5 and base.sure_agreement(near_ties_flipped) == 1.0
    sure_flipped = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert base.agreement(sure_flipped) == 0.75 and base.sure_agreement(sure_flipped) == 0.5
    unsure = BaseAnswers.of(torch.tensor([[0.1, 0.09], [0.0, 0.01]]))
    assert unsure.agreement(torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == 0.5
    assert unsure.sure_agreement(torch.tensor([[1.0, 0.0], [1.0, 0.0]])) is None
    assert BaseAnswers.of(torch.tensor([[4.0, 0.0]])).sure_agreement(torch.tensor([[0.0, 1.0]])) is None


def test_near_ties_in_the_held_out_images_are_named_before_the_run(demo_base, demo_data, tmp_path):
    """Check images on which the base hesitates between two classes (two digits blended at the point where its
    top-1 changes) change under any fine-tuning: more of them than the agreement floor lets change would hold gamma
    down, so the conversion says so before its first step, and the self-check tells the agreement where the base is
    sure from the agreement on all. The demo's own held-out digits are not near-ties."""
    import json

    import numpy as np
    import torch
    from PIL import Image
    from rich.console import Console

    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.models import load_classifier
    from certify_zoo.recipes import load_recipe
    from certify_zoo.selfcheck import NEAR_TIE_MARGIN, BaseAnswers, top_two_margin

    def warning(margins):
        return BaseAnswers(torch.zeros(len(margins), dtype=torch.long), torch.tensor(margins)).near_tie_warning(0.85)

    assert warning([0.05, 0.5, 0.9, 0.9]) is not None  # 25% near-ties > 15% allowed
    assert warning([0.05] + [0.5] * 9) is None  # 10%: within what the floor allows
    base = load_classifier(str(demo_base))
    transform = base.transform()
    digits = [transform(Image.open(f).convert("RGB")) for f in sorted((demo_data / "test").glob("*/*.png"))]

    def quantised(image):  # as the PNG file will hold it
        return (image * 255).round() / 255

    check = tmp_path / "near_ties"
    check.mkdir()
    written = 0
    with torch.no_grad():
        for first, second in zip(digits, digits[len(digits) // 2:]):  # the folders are by class: two classes
            top = [int(base(quantised(image).unsqueeze(0)).argmax()) for image in (first, second)]
            if top[0] == top[1]:
                continue
            low, high = 0.0, 1.0  # bisect the blend for the last point still predicted as the first digit's class
            for _ in range(16):
                middle = (low + high) / 2
                blend = quantised((1 - middle) * first + middle * second)
                low, high = (middle, high) if int(base(blend.unsqueeze(0)).argmax()) == top[0] else (low, middle)
            image = quantised((1 - low) * first + low * second)
            if float(top_two_margin(base(image.unsqueeze(0)))) < NEAR_TIE_MARGIN:
                Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
                    check / f"{written}.png")
                written += 1
            if written == 20:
                break
    assert written == 20
    with torch.no_grad():
        sure = [image for image in digits[:40] if float(top_two_margin(base(quantised(image)[None]))) > 0.5][:8]
    for image in sure:
        Image.fromarray((quantised(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            check / f"{written}.png")
        written += 1
    assert written == 28
    text = io.StringIO()
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(tmp_path / "o"),
                                        max_steps=2, batch_size=64, check_data=str(check)),
            console=Console(file=text, width=400))
    said = text.getvalue()
    assert "of each other on 71% of the 28 held-out images" in said
    assert said.index("of each other on") < said.index("self-check on")  # before the run
    record = json.loads((tmp_path / "o" / "certify_zoo.json").read_text())
    check = record["self_check"]
    assert check["base_near_ties"] == 20
    assert check["agreement_where_base_sure"] == 1.0  # two steps do not move digits the base is sure of
    assert "on the 8 the base is sure of" in said
    text = io.StringIO()
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(tmp_path / "d"),
                                        max_steps=2, batch_size=64), console=Console(file=text, width=400))
    assert "of each other on" not in text.getvalue()


def test_a_stopped_streamed_evaluation_resumes_where_its_stream_stood(demo_base, digits_eval_stream, tmp_path,
                                                                      monkeypatch):
    """A stream has no batches to skip: the kept results hold where the stream stood, and --resume reads on from
    there (mid-window after SIGTERM at batch 2, at a window's start after a crash past the save of batch 4), reading
    no row twice; the records equal an uninterrupted run's."""
    import json
    import os

    import certify_zoo.evaluation as evaluate_module
    from certify_zoo import data_sources
    from certify_zoo.errors import Interrupted

    monkeypatch.setattr(data_sources, "READ_AHEAD_BATCHES", 4)  # windows of 64 rows: batch 5 starts the second
    run = dict(audit="pgd", audit_steps=5, audit_restarts=1, check_images=40)
    reference = _streamed_evaluation(demo_base, digits_eval_stream, out=str(tmp_path / "whole"), **run)
    real, calls = evaluate_module.gather_rows_into, []

    def gather(columns, rows, accelerator, stop_at=None, how=None):
        calls.append(None if rows is None else rows["index"].tolist())
        if len(calls) == stop_at and how == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        elif len(calls) == stop_at:
            raise RuntimeError("the machine went away")
        return real(columns, rows, accelerator)

    out = tmp_path / "stopped"
    monkeypatch.setattr(evaluate_module, "gather_rows_into", lambda *a: gather(*a, stop_at=2, how="SIGTERM"))
    with pytest.raises(Interrupted, match="after batch 2 of 5.*--resume"):
        _streamed_evaluation(demo_base, digits_eval_stream, out=str(out), **run)
    state = json.loads((out / "evaluate-partial" / "state.json").read_text())
    assert state["batches_done"] == 2 and state["rows"] == 32
    assert state["streams"] == [{"batches": 2, "position": {"epoch": 0, "window": 0, "source": None, "offset": 32,
                                                    "split": "rows", "held_out": None}}]

    calls.clear()
    monkeypatch.setattr(evaluate_module, "SAVE_EVERY_MINUTES", 0.0)  # a save after every batch
    monkeypatch.setattr(evaluate_module, "gather_rows_into", lambda *a: gather(*a, stop_at=3, how="crash"))
    with pytest.raises(RuntimeError, match="went away"):  # batch 5 of 5: the save after batch 4 stands
        _streamed_evaluation(demo_base, digits_eval_stream, out=str(out), resume=True, **run)
    assert calls[:2] == [list(range(32, 48)), list(range(48, 64))]  # read on from row 32, not from the start
    state = json.loads((out / "evaluate-partial" / "state.json").read_text())
    assert state["batches_done"] == 4 and state["streams"][0]["position"]["window"] == 1

    calls.clear()
    monkeypatch.setattr(evaluate_module, "gather_rows_into", lambda *a: gather(*a))
    resumed = _streamed_evaluation(demo_base, digits_eval_stream, out=str(out), resume=True, **run)
    assert calls == [list(range(64, 80))]  # the one batch left, then the stream's end
    assert {k: v for k, v in resumed.record.items() if k not in ("created", "run")} == \
        {k: v for k, v in reference.record.items() if k not in ("created", "run")}
    for key, value in reference.per_image.items():
        assert torch.equal(resumed.per_image[key].nan_to_num(-1), value.nan_to_num(-1)), key
    assert not (out / "evaluate-partial").exists()
