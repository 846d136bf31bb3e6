"""The bad-input table of the docs (reliability page), row by row: one line on stderr, non-zero exit, no traceback,
nothing lost."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from certify_zoo.cli import app
from certify_zoo.hub_files import PROXY_VARIABLES
from certify_zoo.models import create_timm_model
from conftest import REPO, error_line, run_cli

QUICK = ("--recipe", "demo", "--max-steps", "2", "--batch-size", "8", "--reps", "1", "--checkpoint-minutes", "0")


def cli(*args: str):
    """The real Typer app in this process; returns (exit code, stderr, stdout)."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr, result.stdout


def assert_one_line_error(code: int, stderr: str, *fragments: str, exit_code: int = 2) -> None:
    assert code == exit_code, stderr
    text = error_line(stderr)
    for fragment in fragments:
        assert fragment in text, text


def test_unknown_model(tmp_path):
    code, err, _ = cli("convert", "resnet9000", "--data", "demo", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unknown model 'resnet9000'", "did you mean")


def test_a_missing_model_folder_says_so_first(tmp_path):
    """evaluate said "has no stored sigma: pass --sigma", which sent the user after the wrong fix; convert printed a
    recipe "chosen for architecture missing" before the error."""
    for command in (("evaluate", str(tmp_path / "missing"), "--data", "demo"),
                    ("convert", str(tmp_path / "missing"), "--data", "demo", "--out", str(tmp_path / "o"))):
        code, err, _ = cli(*command)
        assert_one_line_error(code, err, f"model folder {tmp_path / 'missing'} does not exist")
        assert "recipe" not in err and not (tmp_path / "o").exists()
    # a name timm does not know, a folder name with its slash: evaluate and compare asked for --sigma first
    for command in (("evaluate", "resnet9000", "--data", "demo"), ("compare", "resnet9000", "--data", "demo")):
        code, err, _ = cli(*command)
        assert_one_line_error(code, err, "unknown model 'resnet9000'", "did you mean resnet200")
    code, err, _ = cli("evaluate", "missing/", "--data", "demo")
    assert_one_line_error(code, err, "model folder missing/ does not exist")


def test_non_classifier_backbone(tmp_path):
    from certify_zoo.demo import DEMO_ARCHITECTURE, DEMO_MODEL_ARGS
    from certify_zoo.export import save_timm_model

    backbone = create_timm_model(DEMO_ARCHITECTURE, pretrained=False, num_classes=0, **DEMO_MODEL_ARGS)
    save_timm_model(backbone, tmp_path / "backbone")
    code, err, _ = cli("convert", str(tmp_path / "backbone"), "--data", "demo", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "not an image classifier", "num_classes 0")


def test_no_network_when_a_download_is_needed(tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the session's empty, offline Hugging Face cache
    code, err, _ = cli("convert", "timm/resnet18", "--data", "demo", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "HF_HUB_OFFLINE is set", "not in the Hugging Face cache")
    assert not (tmp_path / "o" / "model.safetensors").exists()
    # a whole repo's files (download, evaluate, predict): offline by HF_HUB_OFFLINE, not "the Hub is unreachable"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    for command in (("download", "someorg/never-downloaded"),
                    ("predict", "someorg/never-downloaded", str(tmp_path / "x.png"))):
        code, err, _ = cli(*command)
        assert_one_line_error(code, err, "HF_HUB_OFFLINE is set", "not in the Hugging Face cache")


def test_data_that_cannot_be_read_says_why(demo_base, tmp_path):
    """A Hub dataset while HF_HUB_OFFLINE is set: said as for a model (it had said "it needs network access"); an
    archive of images: extract it."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    code, err, _ = cli("convert", str(demo_base), "--data", "hf:someorg/never-streamed", "--out", str(tmp_path / "o"),
                       "--max-steps", "1")
    assert_one_line_error(code, err, "cannot stream someorg/never-streamed", "HF_HUB_OFFLINE is set")
    (tmp_path / "images.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    code, err, _ = cli("convert", str(demo_base), "--data", str(tmp_path / "images.zip"), "--out",
                       str(tmp_path / "o"))
    assert_one_line_error(code, err, "images.zip is neither a folder", "archive, extract it")


def test_a_second_run_into_the_folder_a_running_one_writes_is_refused(demo_base, tmp_path, monkeypatch):
    """A conversion with --overwrite had replaced the folder of a running one mid-run, and both reported success
    (the folder held whichever finished last). The lock is the folder's, however its path is spelled; an evaluation
    writing the folder holds it too; it goes with the run that held it."""
    from certify_zoo.export import OutputLock

    out = tmp_path / "o"
    command = ["convert", str(demo_base), "--data", "demo", "--max-steps", "1", "--check-images", "0", "--overwrite"]
    evaluation = ["evaluate", str(out), "--data", "demo", "--max-images", "8", "--method", "deterministic"]
    monkeypatch.chdir(tmp_path)
    with OutputLock() as running:
        running.acquire(out)  # what a conversion running into OUT holds
        for spelled in (str(out), "o", "./o/"):
            code, err, _ = cli(*command, "--out", spelled)
            assert_one_line_error(code, err, "is being written by another certify-zoo run", "choose another folder")
        assert not out.exists()
    code, err, _ = cli(*command, "--out", str(out))  # released: the same command converts
    assert code == 0 and (out / "model.safetensors").is_file(), err
    code, err, _ = cli(*command, "--out", str(out))  # and the run that finished let it go
    assert code == 0, err
    with OutputLock() as running:
        running.acquire(out)  # an evaluation writing its records there: no conversion replaces the folder
        code, err, _ = cli(*command, "--out", str(out))
        assert_one_line_error(code, err, "is being written by another certify-zoo run")
        code, err, _ = cli(*evaluation)  # nor does a second evaluation write the same records
        assert_one_line_error(code, err, "is being written by another certify-zoo run")
        assert not (out / "certification.json").exists()
    code, err, _ = cli(*evaluation)
    assert code == 0 and (out / "certification.json").is_file(), err


def test_empty_data_folder(demo_base, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err, _ = cli("convert", str(demo_base), "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no image files in")


def test_missing_data_folder(demo_base, tmp_path):
    code, err, _ = cli("convert", str(demo_base), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "does not exist")


def test_only_corrupt_images(demo_base, tmp_path):
    data = tmp_path / "corrupt"
    data.mkdir()
    for i in range(5):
        (data / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    code, err, _ = cli("convert", str(demo_base), "--data", str(data), "--out", str(tmp_path / "o"), *QUICK)
    assert_one_line_error(code, err, "none of the 5 images", "could be decoded")
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_non_image_files_are_ignored(demo_base, demo_data, tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    pictures = sorted((demo_data / "train" / "3").glob("*.png"))[:12]
    for picture in pictures:
        (data / picture.name).write_bytes(picture.read_bytes())
    (data / "README.txt").write_text("not an image")
    (data / ".DS_Store").write_bytes(os.urandom(32))
    (data / "labels.csv").write_text("file,label\n")
    code, err, _ = cli("convert", str(demo_base), "--data", str(data), "--out", str(tmp_path / "o"), *QUICK)
    assert code == 0, err
    record = json.loads((tmp_path / "o" / "certify_zoo.json").read_text())
    # one epoch of the 12 pictures, no image dropped: 1 held out for the self-check, then batches of 8 and 3; the
    # three other files are not images
    assert record["held_out_images"] == 1
    assert record["steps"] == 2 and record["images_seen"] == 11 and record["skipped_images"] == 0

    from certify_zoo.data import unlabelled_images
    assert len(unlabelled_images(str(data), lambda image: image)) == len(pictures)


@pytest.mark.parametrize("sigma", ["0", "-0.1", "2.5"])
def test_sigma_out_of_range(tmp_path, sigma):
    code, err, _ = cli("convert", "whatever", "--data", "demo", "--out", str(tmp_path / "o"), "--sigma", sigma)
    assert_one_line_error(code, err, "--sigma must be in (0, 2]")


@pytest.mark.parametrize("command", [("evaluate", "someorg/not-downloaded"),
                                     ("compare", "someorg/not-downloaded", "someorg/other"),
                                     ("convert", "timm/resnet18", "--out", "never-made")])
@pytest.mark.parametrize("mistake, said", [(("--data", "demo", "--sigma", "-1"), "--sigma must be in (0, 2]"),
                                           (("--data", "no/such/folder"), "data no/such/folder does not exist"),
                                           (("--data", __file__), "is neither a folder of images nor a parquet")])
def test_arguments_are_checked_before_the_model_is_downloaded(command, mistake, said):
    """`evaluate ORG/REPO --sigma -1` downloaded the repo before it read --sigma, and every command downloaded the
    model before it found that --data did not exist (or was a single image, not a folder): offline they said "not in
    the Hugging Face cache", online they spent the download on a run that could not start (compare: on every model
    before it)."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the session's empty, offline Hugging Face cache
    code, err, _ = cli(*command, *mistake)
    assert_one_line_error(code, err, said)


@pytest.mark.parametrize("option, value, said", [
    ("--noise-prob", "1.5", "--noise-prob must be in [0, 1] (the share of each batch that gets noise), got 1.5"),
    ("--h", "0", "--h must be > 0 (the penalty's finite-difference step, in pixels), got 0.0"),
    ("--weight-decay", "-1", "--weight-decay must be >= 0"),
    ("--check-images", "-3", "--check-images must be >= 0, got -3"),
    ("--lr", "-1", "--lr must be >= 0 (0: no weight update), got -1.0"),
    ("--lr", "inf", "--lr must be a finite number, got inf"), ("--lr", "nan", "--lr must be a finite number"),
    ("--warmup", "nan", "--warmup must be a finite number"), ("--h", "nan", "--h must be a finite number"),
    ("--epochs", "0", "--epochs must be at least 1, got 0"), ("--max-steps", "0", "--max-steps must be at least 1"),
    ("--warmup", "1", "--warmup must be in [0, 1) (a share of the steps), got 1.0")])
def test_objective_and_optimiser_settings_out_of_range(tmp_path, option, value, said):
    """--noise-prob 1.5 had converted (every image noised, agreement 'with base 0.0%'), --h 0 ended in a division by
    zero, a negative weight decay trained; --check-images -3 was named 'check_images' beside the recipe's gamma_start,
    and --lr -1 listed the lr_min it had scaled below 0 as well. --lr inf had started a conversion; --lr nan was
    refused as '--lr-min must be in [0, lr], --warmup in [0, 1) and --clip-grad-norm >= 0'; --epochs 0 named
    --max-steps and --min-steps too: each setting is now named alone."""
    code, err, _ = cli("convert", "whatever", "--data", "demo", "--out", str(tmp_path / "o"), option, value)
    assert_one_line_error(code, err, said)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, value, said", [("--alpha", "1.5", "--alpha must be in (0, 1)"),
                                                  ("--n0", "0", "--n0 must be at least 1, got 0"),
                                                  ("--mc-batch-size", "0", "--mc-batch-size must be at least 1, got 0"),
                                                  ("--audit-steps", "0", "--audit-steps must be at least 1, got 0")])
def test_evaluate_names_the_setting_out_of_range(option, value, said):
    """One message had listed five settings ('--batch-size, --mc-batch-size, --n and --n0 must be at least 1 and
    --alpha in (0, 1)') whichever was wrong, and none of their values."""
    code, err, _ = cli("evaluate", "whatever", "--data", "demo", option, value)
    assert_one_line_error(code, err, said)


@pytest.mark.parametrize("limit, said", [("0", "--limit must be at least 1, got 0"),
                                         ("-3", "--limit must be at least 1")])
def test_list_limit_below_one(limit, said):
    """--limit 0 listed an empty table as if the Hub held no certified model; -3 ended in islice's ValueError."""
    code, err, _ = cli("list", "--limit", limit)
    assert_one_line_error(code, err, said)


@pytest.mark.parametrize("radii", ["-0.5,0,0.5", "0.5,0.25", "0,nan", "0,inf"])
def test_negative_unsorted_or_infinite_radii(tmp_path, radii):
    """nan had passed, certified every image, and then stopped in the plot with matplotlib's ValueError."""
    code, err, _ = cli("evaluate", "whatever", "--data", "demo", "--radii", radii)
    assert_one_line_error(code, err, "--radii must be finite, non-negative and sorted ascending")


def test_batch_size_zero(tmp_path):
    code, err, _ = cli("convert", "whatever", "--data", "demo", "--out", str(tmp_path / "o"), "--batch-size", "0")
    assert_one_line_error(code, err, "--batch-size must be at least 1")


def test_output_exists(demo_base, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err, _ = cli("convert", str(demo_base), "--data", "demo", "--out", str(out))
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    code, err, _ = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--resume", "--overwrite")
    assert_one_line_error(code, err, "either --resume", "or --overwrite")
    code, err, _ = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--resume")
    assert_one_line_error(code, err, "is not a certify-zoo conversion")
    assert (out / "precious.txt").read_text() == "keep me"
    # --overwrite replaces a conversion's folder, never one of someone else's files (a mistyped --out: ., ~)
    code, err, _ = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--overwrite", *QUICK)
    assert_one_line_error(code, err, "was not made by certify-zoo (it holds precious.txt)", "choose another --out")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    (out / "certify_zoo.json").write_text("{}")  # an earlier conversion's output (with a file of the user's)
    code, err, stdout = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--overwrite", *QUICK)
    assert code == 0, err
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()


def test_overwrite_through_a_symlinked_output_folder_replaces_what_it_points_to(short_conversion, demo_base,
                                                                                tmp_path):
    """--out as a symlink to a folder on a larger disk (or a mount point, a Docker volume): --overwrite said
    'OSError: Cannot call rmtree on a symbolic link' (and on a tmpfs mount point removed the earlier conversion, then
    failed with EBUSY, measured). The folder's contents are replaced; the link and the folder stay."""
    real, link = tmp_path / "big-disk" / "run", tmp_path / "run"
    shutil.copytree(short_conversion, real)
    link.symlink_to(real, target_is_directory=True)
    code, err, _ = cli("convert", str(demo_base), "--data", "demo", "--out", str(link), "--overwrite", *QUICK)
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert json.loads((real / "certify_zoo.json").read_text())["steps"] == 2  # the 30-step conversion replaced


def test_evaluate_out_writes_no_records_into_a_folder_of_someone_elses_files(demo_base, tmp_path):
    """evaluate --out DIR replaced DIR's certification.json and per_image.json and removed its audit.json (as a
    stale record of an earlier run) whoever had written them; it still writes its records beside other files."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("# my project")
    (mine / "audit.json").write_text('{"mine": true}')
    code, err, _ = cli("evaluate", str(demo_base), "--data", "demo", "--sigma", "0.5", "--out", str(mine))
    assert_one_line_error(code, err, "holds audit.json that certify-zoo did not write")
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "audit.json"]
    assert (mine / "audit.json").read_text() == '{"mine": true}'
    (mine / "audit.json").rename(mine / "my-audit.json")  # records beside other files: the base's folder, say
    code, err, _ = cli("evaluate", str(demo_base), "--data", "demo", "--sigma", "0.5", "--out", str(mine),
                       "--max-images", "8", "--method", "deterministic")
    assert code == 0, err
    assert (mine / "README.md").read_text() == "# my project" and (mine / "certification.json").is_file()
    # another converted model's folder: its card and a push of it would have shown this run's numbers
    (mine / "certify_zoo.json").write_text(json.dumps({"sigma": 0.5}))
    before = {path.name: path.read_bytes() for path in mine.iterdir()}
    code, err, _ = cli("evaluate", str(demo_base), "--data", "demo", "--sigma", "0.5", "--out", str(mine),
                       "--max-images", "8", "--method", "deterministic")
    assert_one_line_error(code, err, f"--out {mine} is the folder of another converted model")
    assert {path.name: path.read_bytes() for path in mine.iterdir()} == before


def test_output_files_are_checked_before_any_work_and_never_replace_someone_elses(demo_base, tmp_path):
    """evaluate --output and compare --plot were written after the whole run: a folder given by mistake failed
    there with an IsADirectoryError, the run's result lost, and a json or png of the user's was silently replaced."""
    folder, mine, photo = tmp_path / "results", tmp_path / "mine.json", tmp_path / "photo.png"
    folder.mkdir()
    mine.write_text('{"mine": true}')
    from PIL import Image

    Image.new("RGB", (4, 4)).save(photo)
    quick = ("--data", "demo", "--sigma", "0.5", "--max-images", "8", "--method", "deterministic")
    for destination, said in ((folder, "is a folder"), (mine, "exists and certify-zoo did not write it"),
                              (mine / "r.json", f"{mine} is a file, not a folder")):
        code, err, _ = cli("evaluate", str(demo_base), *quick, "--output", str(destination))
        assert_one_line_error(code, err, f"--output {destination}", said)
        assert "evaluate batch" not in err  # refused before the model certified anything
        code, err, _ = cli("compare", str(demo_base), str(demo_base), *quick, "--plot", str(destination))
        assert_one_line_error(code, err, f"--plot {destination}", said)
    code, err, _ = cli("compare", str(demo_base), str(demo_base), *quick, "--plot", str(photo))
    assert_one_line_error(code, err, f"--plot {photo} exists and certify-zoo did not write it")
    assert mine.read_text() == '{"mine": true}' and Image.open(photo).size == (4, 4) and not any(folder.iterdir())
    # a file certify-zoo wrote is its own to replace: the same command runs twice
    for command in (("evaluate", str(demo_base), *quick, "--output", str(folder / "r.json")),
                    ("compare", str(demo_base), str(demo_base), *quick, "--plot", str(folder / "p.png"))):
        for _ in range(2):
            code, err, _ = cli(*command)
            assert code == 0, err
    assert json.loads((folder / "r.json").read_text())["num_images"] == 8
    assert sorted(p.name for p in folder.iterdir()) == ["p.png", "r.json"]


@pytest.mark.parametrize("refusal, said", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device: free some space, then rerun"),
    # a disk remounted read-only mid-run (an I/O error, a full ext4 journal) was told to free some space
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only: make it writable, then rerun")])
def test_disk_full_keeps_checkpoint_then_resume_finishes(refusal, said, demo_base, tmp_path, monkeypatch):
    """ENOSPC (or EROFS) while the final weights are written: one line, the checkpoint survives, --resume
    completes."""
    import importlib

    import safetensors.torch

    # accelerate binds safetensors' save_file when it is imported: imported first, its checkpoints still write (run
    # alone, this test had accelerate bind the failing one, and its checkpoint failed too)
    importlib.import_module("accelerate.utils.other")

    out = tmp_path / "o"
    args = ("convert", str(demo_base), "--data", "demo", "--out", str(out), *QUICK, "--checkpoint-every", "1")
    real = safetensors.torch.save_file

    def refused(*a, **k):
        raise refusal

    monkeypatch.setattr(safetensors.torch, "save_file", refused)  # timm's save_for_hf writes through it
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, said, "the same command with --resume")
    assert not (out / "model.safetensors").exists() and not (out / "certify_zoo.json").exists()
    # the trained state of the last step is kept too, saved before the end (self-check, save) began
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001", "step-00000002"]

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    code, err, stdout = cli(*args, "--resume")
    assert code == 0, err
    assert "resuming from step-00000002" in err and stdout == f"{out}\n"  # the log on stderr, the result on stdout
    assert "convert step" not in err  # every step was done: the end only
    assert json.loads((out / "certify_zoo.json").read_text())["steps"] == 2


def test_a_card_that_does_not_fit_leaves_the_conversion_unfinished_for_resume(demo_base, tmp_path, monkeypatch):
    """The card is written last: a full disk there had left certify_zoo.json, the mark of a finished conversion,
    and --resume answered 'already converted: nothing to redo' and removed the checkpoints, leaving no card."""
    import certify_zoo.conversion as convert_module

    out = tmp_path / "o"
    args = ("convert", str(demo_base), "--data", "demo", "--out", str(out), *QUICK, "--checkpoint-every", "2")
    real = convert_module.write_card

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_module, "write_card", full_disk)
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, "no space left on the device", "--resume (it continues from the checkpoint at "
                                                                    "step 2, which is kept)")
    assert not (out / "certify_zoo.json").exists() and (out / "checkpoints" / "step-00000002").is_dir()
    monkeypatch.setattr(convert_module, "write_card", real)
    code, err, _ = cli(*args, "--resume")
    assert code == 0, err
    assert (out / "README.md").is_file() and (out / "certify_zoo.json").is_file() and not (out / "checkpoints").exists()


def test_nan_loss_names_step_keeps_checkpoint_and_writes_no_weights(demo_base, tmp_path):
    out = tmp_path / "o"
    code, err, _ = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--recipe", "demo",
                       "--max-steps", "30", "--batch-size", "8", "--reps", "1", "--warmup", "0", "--lr", "1e20",
                       "--checkpoint-every", "1", "--checkpoint-minutes", "0")
    assert_one_line_error(code, err, "at step", "lower --lr")
    assert not (out / "model.safetensors").exists() and not (out / "certify_zoo.json").exists()
    kept = sorted((out / "checkpoints").glob("step-*"))
    assert kept, "the last good checkpoint must survive"

    # resume with settings that define the run changed: refused, every difference listed
    code, err, _ = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--recipe", "demo",
                       "--max-steps", "30", "--batch-size", "4", "--reps", "1", "--sigma", "0.3", "--resume")
    assert_one_line_error(code, err, "cannot resume", "sigma: 0.5 -> 0.3", "batch_size: 8 -> 4")
    assert sorted((out / "checkpoints").glob("step-*")) == kept


def test_unfinished_run_without_resume_points_to_resume(tmp_path):
    from certify_zoo.checkpoints import CHECKPOINTS_DIR, RUN_RECORD

    out = tmp_path / "o"
    (out / CHECKPOINTS_DIR / "step-00000012").mkdir(parents=True)
    (out / CHECKPOINTS_DIR / RUN_RECORD).write_text(json.dumps({"settings": {}}))
    code, err, _ = cli("convert", "resnet9000", "--data", "demo", "--out", str(out))
    assert_one_line_error(code, err, "holds an unfinished conversion (checkpoint at step 12)", "--resume")
    assert (out / CHECKPOINTS_DIR / "step-00000012").is_dir()
    # push says the same of it (it said "missing config.json, certify_zoo.json: run convert first"), offline
    code, err, _ = cli("push", "someone/model", str(out))
    assert_one_line_error(code, err, "holds an unfinished conversion", "--resume, then push")


def test_failed_start_does_not_block_the_next_attempt(tmp_path):
    """A run that died before its first checkpoint (here: unknown model) left only its run record behind."""
    out = tmp_path / "o"
    for _ in range(2):
        code, err, _ = cli("convert", "resnet9000", "--data", "demo", "--out", str(out))
        assert_one_line_error(code, err, "unknown model")


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(app, ["--debug", "convert", "x", "--data", "demo", "--out", str(tmp_path),
                                      "--sigma", "0"])
    assert result.exit_code != 0 and result.exception is not None
    assert "sigma" in str(result.exception)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(demo_base, tmp_path, monkeypatch):
    """ENOSPC in the middle of the second checkpoint (accelerate's torch.save): the first stays, no half-written one."""
    import torch

    out = tmp_path / "o"
    real, calls = torch.save, [0]

    def fills_up(*a, **k):
        calls[0] += 1
        if calls[0] > 2:  # the first checkpoint's optimizer + RNG state fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(torch, "save", fills_up)
    code, err, _ = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), *QUICK, "--max-steps", "3",
                       "--checkpoint-every", "1")
    assert_one_line_error(code, err, "cannot write checkpoint", "no space left on the device", "--resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["run.json", "step-00000001"]
    assert not (out / "model.safetensors").exists()


def test_a_disk_remounted_read_only_between_checkpoints_is_one_line(demo_base, tmp_path, monkeypatch):
    """Measured on a tmpfs remounted read-only mid-run: the next checkpoint's folder was refused before anything was
    written into it, as 'OSError: [Errno 30] Read-only file system: .../checkpoints/.tmp-step-00000420'."""
    real = Path.mkdir

    def read_only_from_step_2(self, *args, **kwargs):
        if self.name.startswith(".tmp-step-00000002"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_from_step_2)
    out = tmp_path / "o"
    code, err, _ = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), *QUICK, "--max-steps", "3",
                       "--checkpoint-every", "1")
    assert_one_line_error(code, err, f"cannot write checkpoint {out / 'checkpoints' / 'step-00000002'}: the file "
                                     "system is read-only: make it writable, then rerun the same command with --resume "
                                     "(it continues from the checkpoint at step 1, which is kept)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["run.json", "step-00000001"]


@pytest.mark.parametrize("largest_file, written, said", [
    # the checkpoint's optimizer state (AdamW, ~0.85 MB; its weights, ~0.42 MB, fit): torch's zip writer finds the
    # short write itself, no errno
    (600_000, "checkpoint", "the file system took only part of a write"),
    # the final weights (~0.42 MB), no checkpoint before them: safetensors' own error, "(os error 27)"
    (300_000, "the converted model", "file too large for the file system")])
def test_a_write_the_os_cuts_short_is_one_line_that_says_what_resume_will_do(demo_base, tmp_path, largest_file,
                                                                            written, said):
    """Measured on a full 1 MB tmpfs: torch's 'RuntimeError: [enforce fail at inline_container.cc:672] . unexpected
    pos 563072 vs 562964' and safetensors' 'SafetensorError: ... (os error 28)' came out as such, and the advice
    promised a kept checkpoint where none was written yet. The OS cuts the writes here too (a file size limit)."""
    out = tmp_path / "o"
    # AdamW: the optimizer state (two moments) is larger than the weights, which fit
    every = ("--checkpoint-every", "1", "--optimizer", "adamw") if written == "checkpoint" else ()
    result = run_cli("convert", str(demo_base), "--data", "demo", "--out", str(out), *QUICK, *every,
                     largest_file=largest_file)
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    assert f"cannot write {written}" in line and said in line, line
    assert "--resume (no checkpoint was written yet, so it starts again)" in line, line
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["run.json"]  # nothing half-written is left


def test_the_demo_on_a_full_disk_says_to_run_the_demo_again(tmp_path):
    """The demo has no --resume: convert's and evaluate's advice is not its own."""
    result = run_cli("demo", "--out", str(tmp_path / "d"), largest_file=300_000)  # the base's weights do not fit
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    assert "cannot write the demo's output" in line and "file too large" in line and "run the demo again" in line
    assert "--resume" not in line and "--out" not in line, line


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_records_that_do_not_fit_leave_the_earlier_evaluation_and_print_this_one(short_conversion, tmp_path):
    """A full disk at the end of an evaluation: its numbers were lost (no table, 'Error: OSError: [Errno 28]') and
    the folder kept half of its records, the earlier run's moved aside under a card that still showed them. Now the
    folder is as it was and the table is printed before the one-line error."""
    from certify_zoo.api import evaluate

    model = tmp_path / "m"
    shutil.copytree(short_conversion, model)
    quick = {"max_images": 8, "n": 20, "n0": 10, "method": "all", "audit": "pgd", "audit_steps": 2,
             "audit_restarts": 1}
    evaluate(str(model), "demo", **quick)
    before = _files(model)
    # --workers 0: a worker's shared memory obeys the file size limit too, and a batch it cannot share never arrives
    result = run_cli("evaluate", str(model), "--data", "demo", "--max-images", "200", "--mc-samples", "20", "--n0",
                     "10", "--method", "all", "--audit", "none", "--workers", "0",
                     largest_file=12_000)  # per_image.json, ~18 kB, does not fit
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    assert "cannot write this evaluation's records" in line and "file too large" in line, line
    assert "Certified accuracy" in result.stdout and "200 images" in result.stdout  # this run's numbers
    assert _files(model) == before


def test_ctrl_c_while_the_records_are_written_leaves_the_earlier_evaluation(short_conversion, tmp_path, monkeypatch):
    """The earlier run's records were moved aside first: a Ctrl-C between two of the new files left the folder
    with neither run's certification.json beside a card that still showed the earlier one."""
    import certify_zoo.export as export_module
    from certify_zoo.api import evaluate

    model = tmp_path / "m"
    shutil.copytree(short_conversion, model)
    quick = {"max_images": 8, "n": 20, "n0": 10, "method": "all", "audit": "none"}
    evaluate(str(model), "demo", **quick)
    before = _files(model)
    real, calls = export_module.write_json_atomic, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # per_image.json is written, certification.json is next
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "write_json_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(str(model), "demo", **quick)
    assert _files(model) == before


def test_a_card_and_plot_that_do_not_fit_are_a_warning_after_the_records(short_conversion, tmp_path):
    from certify_zoo.api import evaluate

    model = tmp_path / "m"
    shutil.copytree(short_conversion, model)
    quick = ("--max-images", "8", "--mc-samples", "20", "--n0", "10", "--method", "all", "--audit", "none",
             "--workers", "0")
    evaluate(str(model), "demo", **{"max_images": 8, "n": 20, "n0": 10, "method": "all", "audit": "none"})
    card, plot = (model / "README.md").read_bytes(), (model / "certified_accuracy.png").read_bytes()
    earlier = json.loads((model / "certification.json").read_text())["run"]
    result = run_cli("evaluate", str(model), "--data", "demo", *quick, largest_file=40_000)  # the plot: ~70 kB
    assert result.returncode == 0, result.stderr
    assert "its card and plot still show the earlier evaluation: file too large" in result.stderr
    assert json.loads((model / "certification.json").read_text())["run"] != earlier
    assert [p.parent.name.endswith(earlier) for p in (model / "evaluations").glob("*/certification.json")] == [True]
    assert (model / "README.md").read_bytes() == card and (model / "certified_accuracy.png").read_bytes() == plot


def test_an_output_file_or_plot_that_does_not_fit_comes_after_the_numbers(demo_base, tmp_path):
    """evaluate --output and compare --plot on a full disk: 'OSError: [Errno 28]' where the table should have been
    (both were written before it). The numbers now come first, then one line."""
    quick = ("--data", "demo", "--max-images", "8", "--mc-samples", "20", "--n0", "10", "--workers", "0")
    evaluated = run_cli("evaluate", str(demo_base), *quick, "--sigma", "0.5", "--method", "all", "--audit", "none",
                        # the record: ~3.9 kB; torch 2.3 writes a 2.4 kB module of its own when imported
                        "--output", str(tmp_path / "r.json"), largest_file=3_000)
    compared = run_cli("compare", str(demo_base), str(demo_base), "--sigma", "0.5", *quick, "--plot",
                       str(tmp_path / "p.png"), largest_file=20_000)  # the plot: tens of kB
    for result, option, table in ((evaluated, "--output", "Certified accuracy"), (compared, "--plot", "Comparison")):
        assert result.returncode == 2, result.stderr
        line = error_line(result.stderr)
        assert f"cannot write {option} {tmp_path}" in line and "file too large" in line, line
        assert table in result.stdout and "8 images" in result.stdout
    assert not list(tmp_path.iterdir())  # no half-written file


@pytest.mark.parametrize("command", ["convert", "convert --resume", "demo", "download", "evaluate --out",
                                     "evaluate --output"])
def test_a_folder_that_cannot_be_written_is_said_before_any_work(command, short_conversion, tmp_path, monkeypatch):
    """A read-only file system (measured on a tmpfs remounted read-only) was 'OSError: [Errno 30] Read-only file
    system' from convert, demo and download, and from evaluate only after the whole run. Root writes where
    permissions forbid it, so the file system's answer is simulated here: os.access says no below ``locked``."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (not (mode & os.W_OK) or locked not in
                                                                (Path(path), *Path(path).parents)) and real(path, mode))
    target = str(locked / "x")
    args = {"convert": ("convert", str(short_conversion), "--data", "demo", "--out", target, *QUICK),
            "demo": ("demo", "--out", target),
            "download": ("download", "someone/model", "--out", target),
            "evaluate --out": ("evaluate", str(short_conversion), "--data", "demo", "--out", target),
            "evaluate --output": ("evaluate", str(short_conversion), "--data", "demo", "--output", target + ".json")}
    if command == "convert --resume":  # a run stopped at a checkpoint, on a disk that is read-only now
        (locked / "x" / "checkpoints").mkdir(parents=True)
        (locked / "x" / "checkpoints" / "run.json").write_text("{}")
        args[command] = (*args["convert"], "--checkpoint-every", "1", "--resume")
    before = sorted(locked.rglob("*"))
    code, err, _ = cli(*args[command])
    assert_one_line_error(code, err, "cannot be written (a read-only file system, or no permission)")
    assert "evaluate batch" not in err and "convert step" not in err and sorted(locked.rglob("*")) == before


@pytest.mark.parametrize("command", ["convert", "demo", "download", "evaluate --out"])
def test_an_output_folder_under_a_file_is_said_before_any_work(command, short_conversion, tmp_path):
    """'NotADirectoryError: [Errno 20] Not a directory' from convert, demo and download (evaluate --out: after the
    run); now one line naming the file in the way."""
    blocking = tmp_path / "notes.txt"
    blocking.write_text("mine")
    target = str(blocking / "x")
    args = {"convert": ("convert", str(short_conversion), "--data", "demo", "--out", target, *QUICK),
            "demo": ("demo", "--out", target),
            "download": ("download", "someone/model", "--out", target),
            "evaluate --out": ("evaluate", str(short_conversion), "--data", "demo", "--out", target)}
    code, err, _ = cli(*args[command])
    assert_one_line_error(code, err, f"{target} cannot be made: {blocking} is a file, not a folder")
    assert "evaluate batch" not in err and blocking.read_text() == "mine"


def test_a_cache_that_cannot_hold_the_demo_digits_or_the_checkpoint_key_is_one_line(demo_base, tmp_path,
                                                                                     monkeypatch):
    """A read-only CERTIFY_ZOO_CACHE (measured on a tmpfs remounted read-only) was 'OSError: [Errno 30]' from the
    demo's digits, and from the key that signs checkpoints at the first save, which blamed the output folder ('free
    some space'). Both now name the cache; the key is made before OUT is."""
    from PIL import Image

    monkeypatch.setenv("CERTIFY_ZOO_CACHE", str(tmp_path / "cache"))
    real_save, saves = Image.Image.save, [0]

    def fills_up(self, *args, **kwargs):
        saves[0] += 1
        if saves[0] > 100:  # a hundred digits fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fills_up)
    code, err, _ = cli("evaluate", str(demo_base), "--data", "demo", "--sigma", "0.5", "--max-images", "8")
    assert_one_line_error(code, err, f"cannot write the demo's digits into certify-zoo's cache {tmp_path / 'cache'}: "
                                     "no space left on the device: free some space, or set CERTIFY_ZOO_CACHE to a "
                                     "folder")
    assert not list((tmp_path / "cache").iterdir())  # no half-written digits left behind
    monkeypatch.setattr(Image.Image, "save", real_save)

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith("checkpoint.key"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    out = tmp_path / "o"
    code, err, _ = cli("convert", str(demo_base), "--data", "demo", "--out", str(out), *QUICK, "--checkpoint-every",
                       "1")
    assert_one_line_error(code, err, "cannot write the key that signs checkpoints",
                          "the file system is read-only: make it writable, or set CERTIFY_ZOO_CACHE")
    assert "convert step" not in err and not out.exists()


@pytest.mark.parametrize("entered", [True, False])
@pytest.mark.parametrize("command, unreadable", [("convert", "7"), ("evaluate", "7"), ("evaluate", ".")])
def test_a_data_folder_that_cannot_be_read_is_one_line_not_a_class_left_out(command, unreadable, entered, demo_base,
                                                                           demo_data, tmp_path, monkeypatch):
    """os.walk passes over a folder it cannot list: a class folder without read permission went missing from
    convert's images and evaluate's labels, without a word. Root reads every folder, so the refusal is simulated
    (os.scandir and os.listdir say PermissionError there). A folder that cannot be entered either (chmod 000, run as
    a user) refuses to stat what it holds too: the line named data/7/certify_zoo.json as the folder."""
    data = tmp_path / "digits"
    for digit in ("3", "7"):
        shutil.copytree(demo_data / "test" / digit, data / digit)
    def forbidding(real):
        def listing(path=".", *args, **kwargs):
            if Path(path) == data / unreadable:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)
        return listing

    for name in ("scandir", "listdir"):  # os.walk lists with the first, Path.iterdir with either (3.11+)
        monkeypatch.setattr(os, name, forbidding(getattr(os, name)))
    real_iterdir = Path.iterdir  # Python 3.10's pathlib bound os.listdir when it was imported
    monkeypatch.setattr(Path, "iterdir", lambda self: forbidding(lambda path: real_iterdir(Path(path)))(self))
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if not entered and self.parent == data / unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    args = {"convert": ("convert", str(demo_base), "--data", str(data), "--out", str(tmp_path / "o"), *QUICK),
            "evaluate": ("evaluate", str(demo_base), "--data", str(data), "--sigma", "0.5")}[command]
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, f"cannot read the folder {data / unreadable}: Permission denied: make it "
                                     "readable")


def cannot_enter(monkeypatch, folder: Path) -> None:
    """``folder`` as chmod 000 makes it for a user (root enters every folder, so it is simulated): nothing in it can
    be seen, listed, opened or made, and the folder itself cannot be written."""
    import builtins
    import io

    def inside(path) -> bool:
        return folder in Path(os.fsdecode(path)).absolute().parents

    def refusing(real, refused):
        def call(path, *args, **kwargs):
            if refused(path):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "stat", refusing(os.stat, lambda path: not isinstance(path, int) and inside(path)))
    for module in (io, builtins):  # the same function, bound under two names
        monkeypatch.setattr(module, "open", refusing(io.open, lambda path: not isinstance(path, int)
                                                     and inside(path)))
    for name in ("stat", "open"):  # Python 3.10's pathlib bound os.stat and io.open when it was imported
        monkeypatch.setattr(Path, name, refusing(getattr(Path, name), inside))
    for name in ("scandir", "listdir"):
        monkeypatch.setattr(os, name, refusing(getattr(os, name), lambda path=".": Path(path).absolute() == folder
                                               or inside(path)))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path).absolute() != folder and not inside(path)
                        and real_access(path, mode, **kw))


@pytest.mark.parametrize("command", ["convert --out", "demo --out", "evaluate --out", "evaluate --output",
                                     "download --out"])
def test_an_output_in_a_folder_that_cannot_be_entered_is_one_line(command, short_conversion, demo_base, tmp_path,
                                                                  monkeypatch):
    """Run as a user, --out locked/x with locked chmod 000: Path.exists raised PermissionError (pathlib lets EACCES
    through), so each command ended in 'PermissionError: [Errno 13] Permission denied: locked/x' instead of the
    line that an unwritable folder gets."""
    locked = tmp_path / "locked"
    locked.mkdir()
    target = str(locked / "x")
    args = {"convert --out": ("convert", str(demo_base), "--data", "demo", "--out", target, *QUICK),
            "demo --out": ("demo", "--out", target),
            "evaluate --out": ("evaluate", str(short_conversion), "--data", "demo", "--out", target),
            "evaluate --output": ("evaluate", str(short_conversion), "--data", "demo", "--output", target + ".json"),
            "download --out": ("download", "me/demo", "--out", target)}[command]
    cannot_enter(monkeypatch, locked)
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, f"{target}{'.json' if command.endswith('output') else ''} cannot be written "
                                     "(a read-only file system, or no permission)")


@pytest.mark.parametrize("command", ["info", "evaluate", "predict"])
def test_a_model_folder_that_cannot_be_entered_is_one_line(command, short_conversion, demo_data, tmp_path,
                                                           monkeypatch):
    """A model folder chmod 000, run as a user: 'PermissionError: [Errno 13] Permission denied: m0/config.json
    (rerun with --debug for details)'. A permission refused anywhere now says what it is and what to do."""
    model = tmp_path / "m0"
    shutil.copytree(short_conversion, model)
    image = next((demo_data / "test" / "3").iterdir())
    args = {"info": ("info", str(model)), "evaluate": ("evaluate", str(model), "--data", "demo"),
            "predict": ("predict", str(model), str(image))}[command]
    cannot_enter(monkeypatch, model)
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, f"permission denied on {model}", "change its permissions (or its folder's)")


@pytest.mark.parametrize("command", ["convert --out", "evaluate --out", "evaluate --output", "compare --plot"])
def test_an_output_name_longer_than_the_file_system_takes_is_refused_before_any_work(command, short_conversion,
                                                                                     demo_base, tmp_path):
    """A 300-character name: 'OSError: [Errno 36] File name too long', from evaluate --out after the whole run."""
    target = str(tmp_path / ("a" * 300))
    args = {"convert --out": ("convert", str(demo_base), "--data", "demo", "--out", target, *QUICK),
            "evaluate --out": ("evaluate", str(short_conversion), "--data", "demo", "--out", target),
            "evaluate --output": ("evaluate", str(short_conversion), "--data", "demo", "--output", target),
            "compare --plot": ("compare", str(short_conversion), "--data", "demo", "--plot", target)}[command]
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, f"{command.split()[1] if 'convert' not in command else 'output folder'} "
                                     f"{target} has a name of 300 bytes, longer than its file system takes")
    assert "batch" not in err and not list(tmp_path.iterdir())


def test_an_input_name_too_long_is_one_short_line(tmp_path):
    """Where no check comes first, the CLI's last net words an OSError by its errno, the name cut to fit."""
    code, err, _ = cli("info", str(tmp_path / ("a" * 300)))
    assert_one_line_error(code, err, "file name too long for the file system on ", "...",
                          ": choose a shorter path")
    assert len(error_line(err)) < 320  # the name whole made it 500


def test_weights_that_cannot_be_read_say_permission_not_missing(short_conversion, tmp_path, monkeypatch):
    """model.safetensors chmod 000, run as a user: safetensors reports 'No such file or directory' for a file it may
    not open, and the line said so of a file that is there. Root reads every file: the refusal is simulated."""
    import safetensors.torch

    model = tmp_path / "m0"
    shutil.copytree(short_conversion, model)
    weights = model / "model.safetensors"

    def not_permitted(path, *args, **kwargs):  # safetensors' own wording, measured
        raise FileNotFoundError(f"No such file or directory: {path}")

    monkeypatch.setattr(safetensors.torch, "load_file", not_permitted)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != weights and real_access(path, mode, **kw))
    code, err, _ = cli("evaluate", str(model), "--data", "demo", "--max-images", "8")
    assert_one_line_error(code, err, f"cannot read weights {weights}: permission denied: make it readable")


def test_a_model_folder_that_cannot_be_written_is_still_evaluated(short_conversion, tmp_path, monkeypatch):
    model = tmp_path / "shared" / "model"
    shutil.copytree(short_conversion, model)
    before = _files(model)
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (not (mode & os.W_OK) or Path(path) != model)
                        and real(path, mode))
    code, err, out = cli("evaluate", str(model), "--data", "demo", "--max-images", "8", "--method", "deterministic")
    assert code == 0, err
    assert f"records not written: {model} cannot be written" in err and "Certified accuracy" in out
    assert _files(model) == before


def test_a_conversion_that_noises_every_image_reports_no_agreement_instead_of_zero(demo_base, tmp_path):
    """--noise-prob 1 leaves no clean image in a batch to compare with the base: the run said 'agreement with base
    0.0%' and recorded 0; it now says why there is no number and records none."""
    code, err, out = cli("convert", str(demo_base), "--data", "demo", "--recipe", "demo", "--max-steps", "2",
                         "--out", str(tmp_path / "o"), "--noise-prob", "1")
    assert code == 0, err
    assert "no clean image to measure agreement with the base" in " ".join((out + err).split())
    assert json.loads((tmp_path / "o" / "certify_zoo.json").read_text())["final_agreement_with_base"] is None


def test_model_that_cannot_run_at_its_own_input_size(tmp_path):
    from certify_zoo.export import save_timm_model

    # ConvNeXt's 4x4 stem and three 2x2 downsamplings leave less than a kernel of a 24x32 image
    net = create_timm_model("convnext_atto", pretrained=False, num_classes=3, pretrained_cfg_overlay=dict(
        input_size=(3, 24, 32), test_input_size=(3, 24, 32)))
    save_timm_model(net, tmp_path / "tiny")
    for command, out in (("convert", "o"), ("evaluate", "e")):
        sigma = ("--sigma", "0.5") if command == "evaluate" else ()  # a base has no stored sigma
        code, err, _ = cli(command, str(tmp_path / "tiny"), "--data", "demo", *sigma, "--out", str(tmp_path / out))
        assert_one_line_error(code, err, "cannot classify an image at the input size its config gives, 3x24x32",
                              "padded input size")
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_predict_names_a_url_as_one(tmp_path):
    """A URL, as timm's and transformers' pipelines take, was reported as a missing file."""
    from certify_zoo.errors import CertifyZooError
    from certify_zoo.predict import image_files

    with pytest.raises(CertifyZooError, match="is a URL: predict reads local image files only"):
        image_files(["https://example.com/cat.jpg"])
    with pytest.raises(CertifyZooError, match="does not exist"):
        image_files([str(tmp_path / "cat.jpg")])


NO_DNS = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid",  # RFC 2606: .invalid never resolves
          **{name: "" for name in PROXY_VARIABLES}}


def test_a_hub_whose_name_does_not_resolve_fails_at_once_without_retries(tmp_path):
    """huggingface_hub retries a file missing from its cache for ~23 s on any connection error; a name no DNS knows
    is asked first, so an offline machine gets its line without the retries (no "Retrying" reached the logger)."""
    done = run_cli("convert", "someorg/some-model", "--data", "demo", "--out", str(tmp_path / "o"),
                   env={**NO_DNS, "HF_HUB_CACHE": str(tmp_path / "cache")})
    line = error_line(done.stderr)
    assert done.returncode == 2 and "the Hub at https://hub.invalid is unreachable (its host name does not resolve)" \
        in line and "not in the Hugging Face cache" in line, done.stderr
    assert "Retrying" not in done.stderr and not (tmp_path / "o").exists()


def test_a_repo_id_the_hub_would_refuse_is_one_line_before_any_request(tmp_path):
    """download 'bad id!' printed huggingface_hub's HFValidationError, class name and all."""
    for repo_id in ("bad id!", "a/b/c"):
        code, err, _ = cli("download", repo_id, "--local-dir", str(tmp_path / "d"))
        assert_one_line_error(code, err, f"{repo_id!r} is not a Hub repo id (NAMESPACE/NAME")
        assert "HFValidationError" not in err and not (tmp_path / "d").exists()


def test_a_cached_file_is_still_read_when_the_hub_does_not_resolve(tmp_path):
    """The name is asked only for a file the cache lacks: a cached config is read, offline or not."""
    snapshot = tmp_path / "cache" / "models--someorg--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3}))
    (tmp_path / "cache" / "models--someorg--cached" / "refs").mkdir()
    (tmp_path / "cache" / "models--someorg--cached" / "refs" / "main").write_text("a" * 40)
    done = subprocess.run([sys.executable, "-c", "from certify_zoo.hub_files import hub_config; "
                           "print(hub_config('someorg/cached')['num_classes'])"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **NO_DNS,
                               "HF_HUB_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr[-2000:]


def test_the_endpoint_is_asked_for_what_no_retry_fixes_and_left_to_a_proxy(monkeypatch):
    import socket

    from huggingface_hub import constants

    from certify_zoo.hub_files import why_unreachable

    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    assert why_unreachable() == "its host name does not resolve"
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert why_unreachable() is None  # something listens: the request decides
    assert why_unreachable() == f"nothing accepts connections at 127.0.0.1:{port}"  # closed now
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")  # the proxy resolves names: the request decides
    assert why_unreachable() is None


def test_check_data_never_draws_an_image_the_conversion_trains_on(demo_base, demo_data, tmp_path):
    """--check-data the same folder as --data (or one holding it) drew its "unseen" calibration images from the
    conversion's own: the card then said the calibration was measured on images the conversion never saw."""
    import shutil

    from certify_zoo.data import list_image_files
    from certify_zoo.data_sources import check_images
    from certify_zoo.models import load_classifier

    mixed = tmp_path / "mixed"
    for split, folder in (("train", "seen"), ("test", "unseen")):
        (mixed / folder).mkdir(parents=True)
        for file in sorted((demo_data / split / "3").glob("*.png"))[:12]:
            shutil.copy(file, mixed / folder / file.name)
    transform = load_classifier(str(demo_base)).transform()
    checked = check_images(str(mixed), transform, 20, seed=0, trained_files=list_image_files(mixed / "seen"))
    assert checked.left_out_trained == 12 and checked.images.shape[0] == 12
    assert all(name.startswith("unseen/") for name in checked.drawn["files"])
    assert checked.drawn["left_out_as_conversion_data"] == 12
    code, err, _ = cli("convert", str(demo_base), "--data", str(mixed / "seen"), "--check-data", str(mixed / "seen"),
                       "--out", str(tmp_path / "o"), *QUICK)
    assert_one_line_error(code, err, "--check-data", "holds only images the conversion trains on")
    assert not (tmp_path / "o").exists()
    # a datasets source of one split gives the check the split the conversion streams: refused, not drawn from
    from tiny_sources import digits_parquet

    table = digits_parquet(tmp_path / "table", demo_data, shards=1, limit=40)
    code, err, _ = cli("convert", str(demo_base), "--data", str(table), "--check-data", str(table),
                       "--out", str(tmp_path / "o"), *QUICK)
    assert_one_line_error(code, err, "--check-data", "reads split 'train' of the data the conversion trains on")
    assert not (tmp_path / "o").exists()


def test_evaluating_a_model_on_its_own_conversion_data_says_so(demo_base, demo_data, tmp_path):
    """Certified accuracy on the images a conversion trained on reads as a held-out measure; evaluate now says what
    they are (a folder, or the same split of a datasets source), and nothing for other images."""
    import shutil

    from certify_zoo.card import dataset_of
    from certify_zoo.data_sources import DataSpec, is_conversion_data, resolve_data_spec
    from tiny_sources import parquet_dataset

    digits = tmp_path / "digits"
    for digit in ("3", "5"):
        shutil.copytree(demo_data / "test" / digit, digits / digit)
    out = tmp_path / "o"
    assert cli("convert", str(demo_base), "--data", str(digits), "--out", str(out), *QUICK)[0] == 0
    note = "these are the images this model was converted on"
    for data, said in ((str(digits), True), (str(demo_data / "test"), False)):
        code, err, _ = cli("evaluate", str(out), "--data", data, "--method", "deterministic", "--audit", "none",
                           "--max-images", "8")
        assert code == 0 and (note in " ".join(err.split())) == said, err
        # the record, the card and info say it too: a card had shown these numbers as any others
        assert json.loads((out / "certification.json").read_text())["on_conversion_images"] == said
        card = " ".join((out / "README.md").read_text().split())
        assert ("These are the images the model was converted on" in card) == said
        assert ("split: train" if said else "split: test") in (out / "README.md").read_text()  # the model-index
        assert ("(the images it was converted on)" in " ".join(cli("info", str(out))[2].split())) == said
    assert [dataset_of("hf:org/x", on)["split"] for on in (True, False)] == ["train", "validation"]
    table = parquet_dataset(tmp_path / "table", rows=4, corrupt_rows=0)
    train, validation = (DataSpec("datasets", str(table), split) for split in ("train", "validation"))  # as read
    assert is_conversion_data(str(table), train) and not is_conversion_data(str(table), validation)
    hub_train, hub_validation = (DataSpec("datasets", "org/x", split, hub=True) for split in ("train", "validation"))
    assert is_conversion_data("hf:org/x", hub_train) and not is_conversion_data("hf:org/x", hub_validation)
    assert is_conversion_data("hf:org/x:validation", hub_validation) and not is_conversion_data("hf:org/y", hub_train)
    assert not is_conversion_data("demo", resolve_data_spec("demo")) and not is_conversion_data(str(tmp_path / "gone"),
                                                                                                 train)
    # the split named in a local spec, or the one the conversion read (certify_zoo.json's data_split) where it had
    # read a source's only split, not named train
    assert is_conversion_data(f"{table}:validation", validation) and not is_conversion_data(f"{table}:x", validation)
    assert is_conversion_data(str(table), validation, trained_split="validation")


def test_a_local_datasets_source_of_other_splits_is_read_by_path_and_split(demo_base, demo_data, tmp_path):
    """A local parquet folder whose splits are neither train nor validation: evaluate said 'choose one with --data
    DIR:SPLIT', and that spelling was then refused as a path that does not exist. Now PATH:SPLIT reads the split, the
    conversion's record says which split it read, and an evaluation of it says these are the conversion's images."""
    import shutil

    from tiny_sources import digits_parquet

    source = tmp_path / "digits"
    for split in ("labelled", "holdout"):  # data/SPLIT-00000-of-00001.parquet: the Hub's layout, split by file name
        digits_parquet(source / "data", demo_data, split="test", shards=1, limit=60)
        (source / "data" / "test-00000.parquet").rename(source / "data" / f"{split}-00000-of-00001.parquet")
    code, err, _ = cli("evaluate", str(demo_base), "--data", str(source), "--sigma", "0.5")
    assert_one_line_error(code, err, f"has splits holdout, labelled: choose one with --data {source}:SPLIT")
    code, err, _ = cli("evaluate", str(demo_base), "--data", f"{source}:holdout", "--sigma", "0.5", "--method",
                       "deterministic", "--audit", "none", "--max-images", "8")
    assert code == 0 and f"datasets: {source}, split holdout" in " ".join(err.split()), err
    code, err, _ = cli("evaluate", str(demo_base), "--data", f"{source}:missing", "--sigma", "0.5")
    assert_one_line_error(code, err, "has no split 'missing' (it has holdout, labelled)")
    folder = demo_data / "test"  # a folder of image files has no splits; and ':x:' stays text, not an emoji
    code, err, _ = cli("evaluate", str(demo_base), "--data", f"{folder}:x", "--sigma", "0.5")
    assert_one_line_error(code, err, f"data {folder}:x: {folder} is a folder of image files, which has no splits")

    out = tmp_path / "converted"
    code, err, _ = cli("convert", str(demo_base), "--data", f"{source}:labelled", "--out", str(out),
                       "--check-data", f"{source}:labelled", *QUICK)
    assert_one_line_error(code, err, "reads split 'labelled' of the data the conversion trains on")
    code, err, _ = cli("convert", str(demo_base), "--data", f"{source}:labelled", "--out", str(out),
                       "--check-data", f"{source}:holdout", *QUICK)
    assert code == 0, err
    record = json.loads((out / "certify_zoo.json").read_text())
    assert record["data_split"] == "labelled"
    assert record["check_images_drawn"] == {"split": "holdout", "first_rows": 60}  # all of it: 128 were asked for
    code, err, _ = cli("evaluate", str(out), "--data", f"{source}:labelled", "--method", "deterministic", "--audit",
                       "none", "--max-images", "8")
    assert code == 0 and "these are the images this model was converted on" in " ".join(err.split()), err
    code, err, _ = cli("evaluate", str(out), "--data", f"{source}:holdout", "--method", "deterministic")
    assert_one_line_error(code, err, f"every image of {source}:holdout (60) is one of the conversion's --check-data "
                                     "images")  # it said 'no readable images (0 unreadable)'

    few = tmp_path / "few"  # the same for a folder all of whose images the calibration drew
    for digit in ("3", "5"):
        few.joinpath(digit).mkdir(parents=True)
        for image in sorted((demo_data / "test" / digit).glob("*.png"))[:12]:
            shutil.copy(image, few / digit / image.name)
    code, err, _ = cli("convert", str(demo_base), "--data", f"{source}:labelled", "--out", str(tmp_path / "c2"),
                       "--check-data", str(few), *QUICK)
    assert code == 0, err
    code, err, _ = cli("evaluate", str(tmp_path / "c2"), "--data", str(few), "--method", "deterministic")
    assert_one_line_error(code, err, f"every image of {few} (24) is one of the conversion's --check-data images")


def test_evaluate_on_the_demo_digits_needs_a_model_of_the_ten_digits(tmp_path):
    """A 1000-class model evaluated on --data demo had its digit folders 0-9 matched to its first ten classes by index
    (tench, goldfish, ...) and scored 0% without a word; a ten-class model named otherwise (CIFAR-10's) too. A model
    of ten unnamed classes (what the demo's are, or transformers' LABEL_0, ...) is still evaluated."""
    from certify_zoo.export import save_timm_model

    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for classes, names, said in ((1000, None, "this model has 1000 classes ('tench, Tinca tinca', 'goldfish, "),
                                 (10, cifar, "this model has 10 classes ('airplane', 'automobile', ...)"),
                                 (10, None, None)):
        folder = tmp_path / f"{classes}-{bool(names)}"
        save_timm_model(create_timm_model("resnet10t", pretrained=False, num_classes=classes,
                                          pretrained_cfg_overlay=dict(input_size=(3, 16, 16), hf_hub_id=None)).eval(),
                        folder, names)
        code, err, _ = cli("evaluate", str(folder), "--data", "demo", "--sigma", "0.5", "--method", "deterministic",
                           "--max-images", "4")
        if said is None:
            assert code == 0, err
        else:
            assert_one_line_error(code, err, "--data demo is scikit-learn's 8x8 digits, classes 0-9", said)


def test_data_that_is_one_image_says_so(tmp_path):
    """--data photo.jpg said only that it was neither a folder of images nor a parquet/arrow file."""
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    code, err, _ = cli("convert", "resnet18", "--data", str(photo), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "nor a parquet/arrow file: it is one image, pass the folder of images it belongs")
    assert not (tmp_path / "o").exists()
