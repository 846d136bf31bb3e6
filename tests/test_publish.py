"""Publishing end to end over HTTP: card, plot, push, download, load, against a local Hub-compatible server."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from certify_zoo.wording import counted
from conftest import REPO, card_usage_logits, copy_with_kappa, error_line, run_cli
from hub_server import TestHub

TOKEN = "hf_testtoken_alice_9f8e7d6c5b4a"
OTHER_TOKEN = "hf_testtoken_bob_0a1b2c3d4e5f"


@pytest.fixture(scope="module")
def hub():
    server = TestHub({TOKEN: "alice", OTHER_TOKEN: "bob"}, organisations={"certified-org": {"alice"}})
    yield server
    server.close()


def hub_env(hub, tmp_path: Path, **extra) -> dict:
    """A process that talks to the test Hub: online, its own cache, the token in HF_TOKEN as users set it."""
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_XET": "1", **extra}


@pytest.fixture(scope="module")
def evaluated_output(short_conversion, demo_base, tmp_path_factory) -> Path:
    """A copy of the short conversion, certified (deterministic + Monte-Carlo) like its base, with card and plot."""
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    out = tmp_path_factory.mktemp("published") / "converted"
    # the card's handling of audited radii needs some: the calibration a smoother conversion would have stored
    copy_with_kappa(short_conversion, out, 0.5)
    for folder in (demo_base, out):  # base first: the converted model's plot and card show it dashed
        evaluate(EvaluateSettings(model=str(folder), data="demo", sigma=0.5, method="all", n=100, max_images=40,
                                  out=str(folder)))
    return out


def folder_state(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def demo_images(model, count: int = 24) -> torch.Tensor:
    from certify_zoo.data import labelled_images

    dataset = labelled_images("demo", model.transform(), model.label_names, model.num_classes)
    return torch.stack([dataset[i][0] for i in range(count)])


# -- card and plot ------------------------------------------------------------------------------------------------

def test_card_metadata_parses_back_and_equals_the_records(evaluated_output):
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    record = json.loads((evaluated_output / "certification.json").read_text())
    metadata = metadata_load(evaluated_output / "README.md")
    tags = {"certify-zoo", "certified-robustness", "randomized-smoothing", "image-classification"}
    assert tags <= set(metadata["tags"])
    assert metadata["library_name"] == "timm" and metadata["license"] == "bsd-3-clause"  # inherited from the base
    assert metadata["certify_zoo"]["sigma"] == 0.5 and metadata["certify_zoo"]["architecture"] == "vit_tiny_patch16_224"
    assert metadata["certify_zoo"]["conversion"]["steps"] == 30

    card = ModelCard.load(evaluated_output / "README.md")
    results = card.data.eval_results
    name, again = model_index_to_eval_results(eval_results_to_model_index(card.data.model_name, results))
    assert again == results  # the model-index survives huggingface_hub's own round trip
    by_name = {r.metric_name: r for r in results}
    assert by_name["clean accuracy (top-1)"].metric_value == round(100 * record["clean_accuracy"], 2)
    # a converted model's evaluate audits its deterministic radii by default (here all 40 images): only the audited
    # certificate enters the model-index, with its audit and calibration; the Lipschitz bound stays out
    audit = record["audit"]
    assert audit["attacked"] > 0 and not [name for name in by_name if "raw" in name]  # the raw claim stays out
    suffix = f"{counted(audit['counterexamples'], 'PGD counterexample')} in {counted(audit['attacked'], 'image')}"
    labels = {"monte_carlo": "Monte-Carlo", "deterministic": f"deterministic, {suffix}",
              "deterministic_lipschitz": f"deterministic Lipschitz, {suffix}"}
    checked = 0
    for key, label in labels.items():
        block = record["certificates"][key]
        for row in block["certified_accuracy"]:
            metric = by_name[f"certified accuracy @ L2 {row['radius']:g} ({label})"]
            assert metric.metric_type == "certified_accuracy"
            assert metric.metric_value == round(100 * row["accuracy"], 2)
            assert metric.metric_args["radius"] == row["radius"] and metric.metric_args["certificate"] == key
            assert metric.metric_args["sigma"] == 0.5 and metric.metric_args["num_images"] == 40
            checked += 1
        assert by_name[f"average certified radius ({label.split(',')[0]})"].metric_value == round(block["acr"], 4)
    assert checked == 15
    calibration = by_name["certified accuracy @ L2 0.5 (" + labels["deterministic"] + ")"].metric_args
    assert calibration["kappa"] == record["certificates"]["deterministic"]["calibration"]["kappa"]
    assert by_name["certified accuracy @ L2 0.5 (Monte-Carlo)"].metric_args["n"] == 100

    text = card.text
    assert "arXiv:2010.02508" in text and "certified_accuracy.png" in text and "base (unconverted)" in text
    mc_half = next(r["accuracy"] for r in record["certificates"]["monte_carlo"]["certified_accuracy"]
                   if r["radius"] == 0.5)
    assert f"| {100 * mc_half:.1f} |" in text
    # the card states what kappa promises beyond its held-out images: 1 / (m + 1)
    held_out = json.loads((evaluated_output / "certify_zoo.json").read_text())["self_check"]["held_out_images"]
    assert f"at most {1 / (held_out + 1):.1%} of claims (1 / (held-out images + 1))" in text


def test_audit_result_is_carried_by_deterministic_metrics():
    from certify_zoo.card import eval_results

    block = {"certified_accuracy": [{"radius": 0.5, "accuracy": 0.6}], "acr": 0.4, "bound": "gaussian"}
    record = {"data": "demo", "sigma": 0.5, "num_images": 200, "clean_accuracy": 0.9,
              "certificates": {"deterministic": block},
              "audit": {"attacked": 180, "counterexamples": 3, "statement": "PGD found 3 counterexamples"}}
    metric = [r for r in eval_results(record) if r.metric_type == "certified_accuracy"][0]
    assert metric.metric_name == "certified accuracy @ L2 0.5 (deterministic, 3 PGD counterexamples in 180 images)"
    assert metric.metric_args["audit"] == {"attacked": 180, "counterexamples": 3} and metric.metric_value == 60.0
    one = {**record, "audit": {"attacked": 1, "counterexamples": 1, "statement": "PGD found 1 counterexample"}}
    metric = [r for r in eval_results(one) if r.metric_type == "certified_accuracy"][0]
    assert metric.metric_name.endswith("(deterministic, 1 PGD counterexample in 1 image)")  # not '1 images'


def test_unevaluated_output_gets_a_card_without_numbers(short_conversion, tmp_path):
    from huggingface_hub import metadata_load

    from certify_zoo.card import write_card

    folder = tmp_path / "fresh"
    shutil.copytree(short_conversion, folder)
    (folder / "certification.json").unlink(missing_ok=True)
    write_card(folder)
    metadata = metadata_load(folder / "README.md")
    assert "model-index" not in metadata and metadata["certify_zoo"]["evaluated"] is False
    card = (folder / "README.md").read_text()
    assert "Not evaluated yet" in card
    # the agreement with the base on the images it trained on, and on those it never saw (what the floor read)
    record = json.loads((folder / "certify_zoo.json").read_text())
    check = record["self_check"]
    assert (f"| agreement with base's top-1 at the end | {100 * record['final_agreement_with_base']:.1f}% on its last "
            f"clean training images; {100 * check['agreement_with_base']:.1f}% on {check['held_out_images']} "
            "held-out images |") in card


def test_a_card_of_a_folder_with_spaces_and_quotes_gives_commands_and_code_that_run(short_conversion, demo_data,
                                                                                    tmp_path):
    """A folder's path went into the card as typed: `certify-zoo evaluate my models/x --data DATA` is two arguments
    in a shell, and a quote or a backslash in it broke the card's Python. Shell commands are quoted now, and the code
    names the folder as a Python string."""
    import shlex

    from PIL import Image

    from certify_zoo.card import write_card

    folder = tmp_path / 'my "best" models' / "digits 2"
    shutil.copytree(short_conversion, folder)
    assert json.loads((folder / "certify_zoo.json").read_text())["calibration"]["kappa"] == 0  # withdrawn: a command
    write_card(folder)
    card = (folder / "README.md").read_text()
    commands = re.findall(r"`(certify-zoo evaluate [^`]+)`", card)
    assert len(commands) >= 2, commands
    for command in commands:
        assert shlex.split(command)[2] in (str(folder), folder.name), command
    image = Image.open(next((demo_data / "test" / "3").glob("*.png"))).convert("RGB")
    assert card_usage_logits(folder, image).shape == (1, 10)  # the card's own code, run as written


def test_plot_is_a_png_with_one_curve_colour_per_certificate(evaluated_output):
    import numpy as np
    from PIL import Image

    from certify_zoo.plot import COLOURS

    path = evaluated_output / "certified_accuracy.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < path.stat().st_size < 500_000
    with Image.open(path) as image:
        assert 600 <= image.width <= 2000 and 300 <= image.height <= 1500
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.int32).reshape(-1, 3))
    for colour in COLOURS.values():  # every certificate is drawn
        rgb = torch.tensor([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=torch.int32)
        assert int(((pixels - rgb).abs().sum(-1) < 30).sum()) > 200


# -- Python API -----------------------------------------------------------------------------------------------------

def test_certify_api_is_one_forward_pass_of_the_deterministic_certificate(evaluated_output, monkeypatch):
    import certify_zoo
    from certify_zoo.certificates import certify_deterministic
    from certify_zoo.errors import CertifyZooError

    model = certify_zoo.load(evaluated_output)
    assert model.sigma == 0.5 and model.input_size == (3, 8, 8)
    images = demo_images(model)
    result = certify_zoo.certify(model, images)
    with torch.no_grad():
        expected = certify_deterministic(model(images), 0.5)
    calibration = json.loads((evaluated_output / "certify_zoo.json").read_text())["calibration"]
    kappa, temperature = calibration["kappa"], calibration["temperature"]
    assert (result.kappa, result.temperature) == (kappa, temperature) and kappa <= 1  # applied to what it reports
    assert torch.equal(result.prediction, expected.prediction) and torch.equal(result.radius_raw, expected.radius)
    with torch.no_grad():
        tempered = certify_deterministic(model(images), 0.5, temperature)
    assert torch.allclose(result.radius, kappa * tempered.radius)
    assert result.top_probabilities.shape == (24, 5) and torch.equal(result.top_probabilities[:, 0], expected.p1)
    assert result.labels == [str(i) for i in expected.prediction.tolist()]
    with pytest.raises(CertifyZooError, match="input size"):
        certify_zoo.certify(model, torch.rand(2, 3, 16, 16))
    with pytest.raises(CertifyZooError, match=r"\[0,1\]"):
        certify_zoo.certify(model, images * 255)
    for sigma in (-0.5, 0.0, float("nan")):  # a negative or nan sigma gave radii 0 or nan, without a word
        with pytest.raises(CertifyZooError, match=r"^sigma must be in \(0, 2\]"):
            certify_zoo.certify(model, images, sigma=sigma)
    with pytest.raises(CertifyZooError, match="^top_k must be at least 1"):
        certify_zoo.certify(model, images, top_k=0)
    as_float64 = certify_zoo.certify(model, images.double())  # torch.from_numpy gives float64 images
    assert torch.equal(as_float64.prediction, result.prediction) and torch.allclose(as_float64.radius, result.radius)
    import certify_zoo.certificates  # a large batch goes through in evaluate's pieces, not in one forward

    monkeypatch.setattr(certify_zoo.certificates, "noisy_batch_size", lambda *_: 5)
    sizes = []
    handle = model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    pieced = certify_zoo.certify(model, images)
    handle.remove()
    assert sizes == [5, 5, 5, 5, 4] and torch.allclose(pieced.radius, result.radius, atol=1e-6)


def test_certify_monte_carlo_api_gives_predicts_certificate(evaluated_output, demo_data, monkeypatch):
    """The Monte-Carlo certificate from Python: for one image and seed, the class, bound and radius that
    `predict --method monte-carlo` gives the file; repeatable by seed; abstentions as -1 and "abstain"."""
    from PIL import Image

    import certify_zoo
    from certify_zoo.errors import CertifyZooError
    from certify_zoo.predict import PredictSettings, predict

    model = certify_zoo.load(evaluated_output)
    for file in sorted((demo_data / "test").glob("*/*.png")):  # the first digit it certifies
        row = predict(PredictSettings(model=str(evaluated_output), inputs=[str(file)], monte_carlo=True, n0=50,
                                      n=300)).rows[0]
        if row["class_index"] is not None:
            break
    with Image.open(file) as picture:
        proof = certify_zoo.certify_monte_carlo(model, picture, n0=50, n=300)
    assert proof.prediction.tolist() == [row["class_index"]] and proof.labels == [row["class"]]
    assert float(proof.radius[0]) == pytest.approx(row["radius"]) and row["radius"] > 0
    assert float(proof.p_a_lower[0]) == pytest.approx(row["probability"])
    assert (proof.sigma, proof.n0, proof.n, proof.alpha) == (0.5, 50, 300, 0.001)
    images = demo_images(model, 6)
    first, again = (certify_zoo.certify_monte_carlo(model, images, n0=20, n=100, seed=3) for _ in range(2))
    assert torch.equal(first.radius, again.radius) and torch.equal(first.prediction, again.prediction)
    assert first.mean_probabilities.shape == (6, model.num_classes)
    assert certify_zoo.certify_monte_carlo(model, images, n0=20, n=100, seed=None).radius.shape == (6,)
    import certify_zoo.certificates

    # the noisy copies of every image at once (6 GB a draw for 10,000 images at 224 px): now at most a forward's worth
    monkeypatch.setattr(certify_zoo.certificates, "noisy_batch_size", lambda *_: 4)
    original, certified_together = certify_zoo.certificates.Smooth.certify_with_mean, []

    def spy(self, chunk, *args):
        certified_together.append(len(chunk))
        return original(self, chunk, *args)

    monkeypatch.setattr(certify_zoo.certificates.Smooth, "certify_with_mean", spy)
    chunked = certify_zoo.certify_monte_carlo(model, images, n0=20, n=100, seed=3)
    assert certified_together == [4, 2]
    first_four = certify_zoo.certify_monte_carlo(model, images[:4], n0=20, n=100, seed=3)
    assert chunked.radius.shape == (6,) and chunked.mean_probabilities.shape == (6, model.num_classes)
    assert torch.equal(chunked.radius[:4], first_four.radius) and len(chunked.labels) == 6
    monkeypatch.undo()
    one_draw = certify_zoo.certify_monte_carlo(model, images, n0=1, n=1)  # 1 of 1 votes bounds pA at 0.001
    assert one_draw.prediction.tolist() == [-1] * 6 and one_draw.labels == ["abstain"] * 6
    assert one_draw.radius.tolist() == [0.0] * 6
    with pytest.raises(CertifyZooError, match="n must be at least 1"):
        certify_zoo.certify_monte_carlo(model, images, n=0)
    # n = 1e2 is how Python writes counts: taken as 100 (a float had failed inside torch.randn); 2.5 is refused
    assert torch.equal(certify_zoo.certify_monte_carlo(model, images, n0=2e1, n=1e2, seed=3).radius, first.radius)
    for wrong in (2.5, True, float("inf")):
        with pytest.raises(CertifyZooError, match="^n must be a whole number"):
            certify_zoo.certify_monte_carlo(model, images, n=wrong)
    with pytest.raises(CertifyZooError, match=r"^alpha must be in \(0, 1\)"):  # the API's name, not the CLI's
        certify_zoo.certify_monte_carlo(model, images, alpha=1.5)
    with pytest.raises(CertifyZooError, match=r"^sigma must be in \(0, 2\]"):
        certify_zoo.certify_monte_carlo(model, images, sigma=3.0)
    assert torch.equal(certify_zoo.certify_monte_carlo(model, images.double(), n0=20, n=100, seed=3).radius,
                       first.radius)
    with pytest.raises(CertifyZooError, match="input size"):
        certify_zoo.certify_monte_carlo(model, torch.rand(2, 3, 16, 16))


# -- Hub round trip ---------------------------------------------------------------------------------------------------

RADII_SCRIPT = """
import json, sys, torch, certify_zoo
model = certify_zoo.load(sys.argv[1])
images = torch.load(sys.argv[2])
result = certify_zoo.certify(model, images)
print(json.dumps({"radius": result.radius.tolist(), "prediction": result.prediction.tolist(), "sigma": model.sigma}))
"""


def test_convert_evaluate_and_push_functions_run_what_the_commands_run(hub, demo_base, tmp_path):
    """certify_zoo.convert / evaluate / push: the commands' settings from the same recipe and options, the same
    records, and the same refusals, as exceptions (a misspelt keyword refused with the nearest names, not ignored)."""
    import io
    import warnings

    import timm
    from rich.console import Console

    import certify_zoo
    import certify_zoo.conversion  # noqa: F401  a submodule named convert would have replaced the function here
    import certify_zoo.evaluation  # noqa: F401
    from certify_zoo import api
    from certify_zoo.errors import CertifyZooError

    assert (certify_zoo.convert, certify_zoo.evaluate) == (api.convert, api.evaluate)
    quiet = Console(file=io.StringIO(), soft_wrap=True)
    command = run_cli("convert", str(demo_base), "--out", str(tmp_path / "cli"), "--data", "demo", "--max-steps", "6",
                      "--lr", "0.005", "--check-images", "24")
    assert command.returncode == 0, command.stderr
    result = certify_zoo.convert(demo_base, tmp_path / "api", data="demo", max_steps=6, lr=0.005, check_images=24,
                                 console=quiet)
    assert (result.out, result.steps) == (tmp_path / "api", 6)
    assert "recipe vit (chosen for architecture vit_tiny_patch16_224;" in quiet.file.getvalue()
    by_command, by_function = (json.loads((tmp_path / run / "certify_zoo.json").read_text()) for run in ("cli", "api"))
    assert {**by_command["settings"], "out": None} == {**by_function["settings"], "out": None}
    assert (by_function["settings"]["lr"], by_function["settings"]["max_steps"]) == (0.005, 6)  # options took effect

    record = certify_zoo.evaluate(result.out, data="demo", max_images=40, radii=[0.25, 0.5], console=quiet)
    assert record == json.loads((result.out / "certification.json").read_text())  # what the command writes
    assert [row["radius"] for row in record["certificates"]["deterministic"]["certified_accuracy"]] == [0.25, 0.5]
    evaluated = run_cli("evaluate", str(result.out), "--data", "demo", "--max-images", "40", "--radii", "0.25,0.5",
                        "--json", "--out", str(tmp_path / "records"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["clean_accuracy"] == record["clean_accuracy"]
    certify_zoo.evaluate(tmp_path / "cli", data="demo", max_images=8, write=False, console=quiet)
    assert not (tmp_path / "cli" / "certification.json").exists()

    with pytest.raises(CertifyZooError, match="no setting 'max_step' \\(did you mean max_steps"):
        certify_zoo.convert(demo_base, tmp_path / "misspelt", data="demo", max_step=6, console=quiet)
    with pytest.raises(CertifyZooError, match="no setting 'max_image' \\(did you mean max_images"):
        certify_zoo.evaluate(result.out, data="demo", max_image=8, console=quiet)
    in_memory = timm.create_model("resnet10t", num_classes=10)  # its str() had been taken for a file name
    with pytest.raises(CertifyZooError, match="a ResNet object cannot be read from memory: save it as a folder"):
        certify_zoo.convert(in_memory, tmp_path / "object", data="demo", console=quiet)
    with warnings.catch_warnings():  # whether 6 steps calibrate a deterministic radius is not the question here
        warnings.simplefilter("ignore")
        loaded = certify_zoo.load(result.out)
    with pytest.raises(CertifyZooError, match="the folder or Hub repo id this model was loaded from"):
        certify_zoo.evaluate(loaded, data="demo", console=quiet)
    with pytest.raises(CertifyZooError, match="already exists"):  # a finished folder is not replaced
        certify_zoo.convert(demo_base, tmp_path / "api", data="demo", max_steps=6, console=quiet)
    assert not (tmp_path / "misspelt").exists() and json.loads((tmp_path / "api" / "certify_zoo.json").read_text()) \
        == by_function

    before = folder_state(result.out)  # in a process of its own: huggingface_hub reads HF_ENDPOINT on import
    pushed = subprocess.run([sys.executable, "-c", "import sys, certify_zoo; "
                             "print(certify_zoo.push(sys.argv[1], 'alice/from-python').url)", str(result.out)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                                                 **hub_env(hub, tmp_path)}, timeout=300)
    assert pushed.returncode == 0 and pushed.stdout == f"{hub.url}/alice/from-python\n", pushed.stderr
    repo = hub.state.repos["alice/from-python"]
    uploaded = repo.commits[repo.branches["main"]]
    assert uploaded["model.safetensors"] == (result.out / "model.safetensors").read_bytes()
    assert json.loads(uploaded["certification.json"]) == {**record, "model": "alice/from-python"}
    assert folder_state(result.out) == before


def test_function_errors_name_the_keywords_the_caller_passed(demo_base, tmp_path):
    """certify_zoo.evaluate(..., n=0) said "--mc-samples must be at least 1": the command's option, which a Python
    caller never wrote. The functions' errors name their keywords; a command quoted in backticks keeps its options."""
    import certify_zoo
    from certify_zoo.errors import CertifyZooError, Interrupted

    with pytest.raises(CertifyZooError, match="^n must be at least 1, got 0$"):
        certify_zoo.evaluate(demo_base, data="demo", sigma=0.5, n=0)
    with pytest.raises(CertifyZooError, match="has no stored sigma \\(not converted by certify-zoo\\): pass sigma$"):
        certify_zoo.evaluate(demo_base, data="demo")
    with pytest.raises(CertifyZooError, match="^batch_size must be at least 1, got 0$"):
        certify_zoo.convert(demo_base, tmp_path / "o", data="demo", batch_size=0)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "certify_zoo.json").write_text("{}")
    with pytest.raises(CertifyZooError, match="choose another out or pass overwrite=True$"):
        certify_zoo.convert(demo_base, tmp_path / "o", data="demo")
    from certify_zoo.api import _named_as_keywords

    with pytest.raises(Interrupted, match="^rerun with resume=True or `certify-zoo evaluate --resume`$"):
        with _named_as_keywords("evaluate"):  # the error's class is kept (Interrupted exits 3)
            raise Interrupted("rerun with --resume or `certify-zoo evaluate --resume`")


def test_push_download_round_trip_is_bit_identical(hub, evaluated_output, tmp_path):
    import subprocess

    import timm

    import certify_zoo

    before = folder_state(evaluated_output)
    pushed = run_cli("push", "alice/digits-certified", str(evaluated_output), env=hub_env(hub, tmp_path))
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout == f"{hub.url}/alice/digits-certified\n"  # the result only; what was pushed is logged
    assert folder_state(evaluated_output) == before  # pushing never changes the local folder
    repo = hub.state.repos["alice/digits-certified"]
    files = repo.commits[repo.branches["main"]]
    assert len(repo.commits) == 2  # creation + exactly one upload commit
    assert {"model.safetensors", "config.json", "certify_zoo.json", "certification.json", "certified_accuracy.png",
            "README.md"} <= set(files)
    assert "hf-hub:alice/digits-certified" in files["README.md"].decode()  # the card is written for this repo
    assert not hub.state.unhandled  # every call huggingface_hub made has a real route

    out = tmp_path / "downloaded"
    got = run_cli("download", "alice/digits-certified", "--local-dir", str(out), env=hub_env(hub, tmp_path))
    assert got.returncode == 0, got.stderr
    assert got.stdout == f"{out}\n"  # one line, the path, as `hf download` prints
    for name in ("model.safetensors", "config.json", "certified_accuracy.png"):
        assert (out / name).read_bytes() == (evaluated_output / name).read_bytes()
    local_record = json.loads((evaluated_output / "certification.json").read_text())
    # the same record, except that it names the repo instead of the local folder
    assert json.loads((out / "certification.json").read_text()) == {**local_record, "model": "alice/digits-certified"}

    local = certify_zoo.load(evaluated_output)
    images = demo_images(local)
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(plain((images - local.classifier.mean) / local.classifier.std), local(images))

    torch.save(images, tmp_path / "images.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO),
           **hub_env(hub, tmp_path, HF_HOME=str(tmp_path / "fresh-cache"))}
    loaded = subprocess.run([sys.executable, "-c", RADII_SCRIPT, "alice/digits-certified", str(tmp_path / "images.pt")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert loaded.returncode == 0, loaded.stderr
    remote = json.loads(loaded.stdout.strip().splitlines()[-1])
    expected = certify_zoo.certify(local, images)
    assert remote["radius"] == expected.radius.tolist() and remote["prediction"] == expected.prediction.tolist()
    assert remote["sigma"] == 0.5


def test_predict_with_a_published_model_gives_its_calibrated_radius(hub, evaluated_output, demo_data, tmp_path):
    """`predict ORG/REPO` on a certified model read only local folders' records: from the Hub it said "not a
    certificate" and gave no radius."""
    env = hub_env(hub, tmp_path)
    assert run_cli("push", "alice/digits-predict", str(evaluated_output), env=env).returncode == 0
    image = str(sorted((demo_data / "test").rglob("*.png"))[0])
    local = run_cli("predict", str(evaluated_output), image, "--json")
    remote = run_cli("predict", "alice/digits-predict", image, "--json", env=env)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    row, local_row = json.loads(remote.stdout), json.loads(local.stdout)
    assert row["radius"] is not None and row["certificate"].startswith("deterministic (Gaussian bound, calibrated")
    assert row == local_row


def test_evaluate_a_hub_repo_and_push_the_results(hub, evaluated_output, tmp_path):
    env = hub_env(hub, tmp_path)
    pushed = run_cli("push", "certified-org/digits", str(evaluated_output), "--private", "--revision", "candidate",
                     "--commit-message", "Candidate for review", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert f"{hub.url}/certified-org/digits/tree/candidate" in pushed.stdout
    org_repo = hub.state.repos["certified-org/digits"]
    assert org_repo.private and org_repo.messages[org_repo.branches["candidate"]] == "Candidate for review"
    assert "certify_zoo.json" not in org_repo.commits[org_repo.branches["main"]]  # only the branch got the model
    anonymous = run_cli("download", "certified-org/digits", "--revision", "candidate", env={**env, "HF_TOKEN": ""})
    assert anonymous.returncode != 0 and "not found, or private" in anonymous.stderr  # private: needs the token

    record_file = tmp_path / "reevaluated.json"
    result = run_cli("evaluate", "certified-org/digits", "--revision", "candidate", "--data", "demo", "--method",
                     "all", "--n", "100", "--max-images", "40", "--push-to", "alice/digits-reevaluated",
                     "--output", str(record_file), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(record_file.read_text())["certificates"] == json.loads(
        (evaluated_output / "certification.json").read_text())["certificates"]  # --output works for a Hub repo
    repo = hub.state.repos["alice/digits-reevaluated"]
    files = repo.commits[repo.branches["main"]]
    remote, local = (json.loads(files["certification.json"]), json.loads((evaluated_output / "certification.json")
                                                                        .read_text()))
    assert remote["certificates"] == local["certificates"] and remote["clean_accuracy"] == local["clean_accuracy"]
    assert "certified accuracy @ L2 0.5 (Monte-Carlo)" in files["README.md"].decode()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on exit: nothing listens there


@pytest.mark.parametrize("case", ["bad token", "unreachable", "no rights"])
def test_failed_push_is_one_line_and_leaves_everything_intact(case, hub, evaluated_output, tmp_path, closed_port):
    env = hub_env(hub, tmp_path)
    repo_id = "alice/never-pushed"
    if case == "bad token":
        env["HF_TOKEN"] = "hf_wrongtoken_deadbeef1234"
    elif case == "unreachable":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port}"
    else:
        env["HF_TOKEN"] = OTHER_TOKEN  # bob may not write to alice's namespace
        repo_id = "certified-org/not-bobs"
    before = folder_state(evaluated_output)
    result = run_cli("push", repo_id, str(evaluated_output), env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "unchanged" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert folder_state(evaluated_output) == before
    assert repo_id not in hub.state.repos
    for secret in (TOKEN, OTHER_TOKEN, env["HF_TOKEN"]):
        assert secret not in result.stdout + result.stderr
        assert not any(secret.encode() in p.read_bytes() for p in evaluated_output.rglob("*") if p.is_file())


def test_a_push_refuses_a_folder_that_a_running_run_writes(hub, evaluated_output, tmp_path, monkeypatch):
    """A push copied the folder while a conversion (--overwrite) replaced it or an evaluation rewrote its records,
    and published half of each. The copy is now taken under the folder's lock (convert --push-to pushes after its
    own lock is let go: test_convert_push_to_publishes_a_card_that_says_not_evaluated)."""
    from certify_zoo.export import OutputLock

    env = hub_env(hub, tmp_path, CERTIFY_ZOO_CACHE=str(tmp_path / "cache"))
    monkeypatch.setenv("CERTIFY_ZOO_CACHE", env["CERTIFY_ZOO_CACHE"])
    before = folder_state(evaluated_output)
    with OutputLock() as running:
        running.acquire(evaluated_output)  # what an evaluation writing its records there holds
        result = run_cli("push", "alice/half-written", str(evaluated_output), env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "is being written by another certify-zoo run" in lines[0]
    assert "alice/half-written" not in hub.state.repos and folder_state(evaluated_output) == before
    result = run_cli("push", "alice/half-written", str(evaluated_output), env=env)
    assert result.returncode == 0 and "alice/half-written" in hub.state.repos, result.stderr


def test_convert_push_to_publishes_a_card_that_says_not_evaluated(hub, demo_base, tmp_path):
    out = tmp_path / "converted"
    result = run_cli("convert", str(demo_base), "--data", "demo", "--out", str(out), "--recipe", "demo",
                     "--max-steps", "2", "--push-to", "alice/two-steps", env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    files = hub.state.repos["alice/two-steps"].commits[hub.state.repos["alice/two-steps"].branches["main"]]
    assert "Not evaluated yet" in files["README.md"].decode() and "certification.json" not in files
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()


def test_the_old_push_order_still_works_with_a_note_and_the_token_option(hub, evaluated_output, tmp_path):
    env = {**hub_env(hub, tmp_path), "HF_TOKEN": ""}  # the token comes from --token only
    result = run_cli("push", str(evaluated_output), "alice/old-order", "--token", TOKEN, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{hub.url}/alice/old-order\n"
    note = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert note == [f"Note: `push FOLDER REPO_ID` is deprecated: use `certify-zoo push alice/old-order "
                    f"{evaluated_output}` (the order of `hf upload`)."]
    assert "model.safetensors" in hub.state.repos["alice/old-order"].commits[
        hub.state.repos["alice/old-order"].branches["main"]]
    assert TOKEN not in result.stdout + result.stderr
    anonymous = run_cli("push", "alice/anonymous", str(evaluated_output), env=env)  # no token at all: refused
    assert anonymous.returncode != 0 and len(anonymous.stderr.strip().splitlines()) == 1


def test_push_create_pr_opens_a_pull_request_and_leaves_main_alone(hub, evaluated_output, tmp_path):
    env = hub_env(hub, tmp_path)
    result = run_cli("push", "alice/reviewed", str(evaluated_output), "--create-pr", "--commit-message",
                     "For review", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{hub.url}/alice/reviewed/discussions/1\n" and "pull request" in result.stderr
    repo = hub.state.repos["alice/reviewed"]
    assert list(repo.commits[repo.branches["main"]]) == [".gitattributes"]  # main: only the repo's creation
    assert "model.safetensors" in repo.commits[repo.branches["refs/pr/1"]]
    assert repo.messages[repo.branches["refs/pr/1"]] == "For review"
    refused = run_cli("push", "alice/reviewed", str(evaluated_output), "--create-pr", "--revision", "dev", env=env)
    assert refused.returncode == 2 and error_line(refused.stderr).endswith("drop --revision")


def test_download_errors_are_one_line(hub, tmp_path):
    result = run_cli("download", "alice/does-not-exist", "--out", str(tmp_path / "x"), env=hub_env(hub, tmp_path))
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "not found" in result.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("where", ["--out", "cache", "convert"])
def test_a_download_that_does_not_fit_is_one_line_naming_where(where, hub, evaluated_output, tmp_path):
    """Measured on a full tmpfs: 'Error: OSError: [Errno 28] No space left on device', naming neither the folder
    nor where else to write. The OS cuts the weights (~0.4 MB) short here too (a file size limit). convert fetches
    its model into the Hugging Face cache."""
    repo_id = f"alice/too-large-{where.strip('-')}"
    pushed = run_cli("push", repo_id, str(evaluated_output), env=hub_env(hub, tmp_path))
    assert pushed.returncode == 0, pushed.stderr
    out = tmp_path / "downloaded"
    command = {"--out": ("download", repo_id, "--out", str(out)), "cache": ("download", repo_id),
               "convert": ("convert", repo_id, "--data", "demo", "--out", str(out))}[where]
    got = run_cli(*command, env=hub_env(hub, tmp_path), largest_file=100_000)
    assert got.returncode == 2, got.stderr
    line = error_line(got.stderr)
    written = out if where == "--out" else tmp_path / "hf-home" / "hub"
    action, elsewhere = (("get", "HF_HOME or HF_HUB_CACHE moves the Hugging Face cache") if where == "convert" else
                         ("download", "download --out DIR, or HF_HOME for the Hugging Face cache"))
    assert f"cannot {action} {repo_id}: file too large for the file system in {written}: free some space, or write " \
           f"elsewhere ({elsewhere})" in line, line
    assert not out.exists()  # a folder the download made goes again


def test_the_hubs_own_free_space_warnings_give_way_to_the_one_line(recwarn):
    """huggingface_hub warns once per file ('UserWarning: Not enough free disk space ...', with its source line)
    before the write fails: measured on a full tmpfs, three such pairs of lines came before the error."""
    import errno
    import warnings

    from certify_zoo.errors import CertifyZooError
    from certify_zoo.hub_files import hub_errors

    with pytest.raises(CertifyZooError, match="cannot download a/b: no space left on the device"):
        with hub_errors("download", "a/b"):
            warnings.warn("Not enough free disk space to download the file. The expected file size is: 0.42 MB.",
                          UserWarning)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not [w for w in recwarn if "free disk space" in str(w.message)]
    with pytest.warns(UserWarning, match="another warning"):  # the others still reach the user
        with hub_errors("download", "a/b"):
            warnings.warn("another warning", UserWarning)


def test_a_push_whose_staging_copy_does_not_fit_is_one_line_naming_tmpdir(hub, evaluated_output, tmp_path):
    """Measured with a full TMPDIR: 'OSError: [Errno 28] No space left on device: ... -> .../config.json'."""
    assert (evaluated_output / "README.md").stat().st_size > 8_000  # the card written for the repo does not fit
    before = folder_state(evaluated_output)
    pushed = run_cli("push", "alice/no-room-to-stage", str(evaluated_output), env=hub_env(hub, tmp_path),
                     largest_file=8_000)
    assert pushed.returncode == 2, pushed.stderr
    line = error_line(pushed.stderr)
    assert "cannot push to alice/no-room-to-stage: file too large for the file system in " in line, line
    assert "(TMPDIR moves push's staging copy)" in line and f"{evaluated_output} is unchanged" in line, line
    assert folder_state(evaluated_output) == before and "alice/no-room-to-stage" not in hub.state.repos


PUSH_SCRIPT = "import sys; from certify_zoo.hub import push; push(sys.argv[1], sys.argv[2])"
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:/|~/|[A-Za-z]:\\)[\w.@+=-]+(?:[/\\][\w.@+=-]+)+")


def test_pushed_files_hold_no_local_path(hub, short_conversion, demo_base, demo_data, tmp_path):
    """Records, card and config of a pushed folder name a Hub id or a folder's name, never a path on this machine;
    the card still compares with the base model, found through the local record."""
    import subprocess

    from certify_zoo.evaluation import EvaluateSettings, evaluate

    base, out = tmp_path / "my-base", tmp_path / "runs" / "digits-ct"
    shutil.copytree(demo_base, base)
    shutil.copytree(short_conversion, out)
    metadata = json.loads((out / "certify_zoo.json").read_text())
    metadata["base_model"] = metadata["settings"]["model"] = str(base)  # as if converted from this folder
    metadata["data"] = metadata["settings"]["data"] = str(demo_data / "train")  # ... on these images
    metadata["settings"]["out"] = str(out)
    metadata["settings"]["check_data"] = str(tmp_path / "my-check-images")  # ... calibrated on these (--check-data)
    (out / "certify_zoo.json").write_text(json.dumps(metadata))
    data = str(demo_data / "test")  # a local labelled folder: the audit names its image files
    for folder in (base, out):  # raw radii: a 30-step conversion overclaims, so audit.json names image files
        evaluate(EvaluateSettings(model=str(folder), data=data, sigma=0.5, method="all", n=50, max_images=24,
                                  audit="pgd", audit_steps=3, audit_restarts=1, calibrated=False, out=str(folder)))
    assert str(base) in (out / "certify_zoo.json").read_text() and str(out) in (out / "audit.json").read_text()

    env = {**os.environ, "PYTHONPATH": str(REPO), **hub_env(hub, tmp_path)}
    pushed = subprocess.run([sys.executable, "-c", PUSH_SCRIPT, str(out), "alice/no-local-paths"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert pushed.returncode == 0, pushed.stderr
    repo = hub.state.repos["alice/no-local-paths"]
    files = repo.commits[repo.branches["main"]]
    assert {"certify_zoo.json", "certification.json", "audit.json", "config.json", "README.md"} <= set(files)
    local_places = {str(tmp_path), str(REPO), str(Path.home()), str(demo_data), os.environ["CERTIFY_ZOO_CACHE"]}
    for name, content in files.items():
        for place in local_places:
            assert place.encode() not in content, f"{name} holds the local path {place}"
        if name.endswith((".json", ".md")):
            assert not ABSOLUTE_PATH.findall(content.decode()), f"{name}: {ABSOLUTE_PATH.findall(content.decode())}"

    published = json.loads(files["certify_zoo.json"])
    assert published["base_model"] == "my-base" and published["settings"]["model"] == "my-base"
    assert published["data"] == published["settings"]["data"] == "train"
    assert published["settings"]["out"] == "digits-ct" and published["settings"]["check_data"] == "my-check-images"
    assert json.loads(files["certification.json"])["model"] == "alice/no-local-paths"
    worst = json.loads(files["audit.json"])["worst"]
    assert worst and all(entry["file"].startswith("test/") for entry in worst)  # kept below the data folder
    card = files["README.md"].decode()
    assert "base (unconverted)" in card and "`my-base`" in card  # the comparison with the base survives


def test_public_names_keep_hub_ids_urls_and_text_and_drop_local_places():
    from certify_zoo.public import public_spec, public_text

    assert public_spec("timm/resnet18.a1_in1k") == "timm/resnet18.a1_in1k" and public_spec("demo") == "demo"
    assert public_spec("hf:ORG/images:train") == "hf:ORG/images:train"
    assert public_spec("/home/me/.cache/huggingface/hub/models--alice--net/snapshots/0123abc") == "alice/net"
    assert public_spec("C:\\Users\\me\\models\\net") == "net" and public_spec("./runs/cnx/") == "cnx"
    prose = "radius sigma / sqrt(2/pi), see https://arxiv.org/abs/2010.02508 and/or timm/resnet18"
    assert public_text(prose, []) == prose
    assert public_text("file /home/me/photos/cat.png unreadable", []) == "file cat.png unreadable"
    assert public_text("/data/imagenet/val/n01440764/x.JPEG", [("/data/imagenet/val", "val")]) == \
        "val/n01440764/x.JPEG"


@pytest.mark.parametrize("case", ["unreachable", "no such repo"])
def test_loading_a_model_from_the_hub_fails_in_one_line_naming_the_cause(case, hub, tmp_path, closed_port):
    """The model loader had its own translation of huggingface_hub's errors: with the network up it said "offline
    (HF_HUB_OFFLINE or no network)" for an unreachable endpoint. It shares push's now: the endpoint is named."""
    env = hub_env(hub, tmp_path)
    if case == "unreachable":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port}"
    result = run_cli("convert", "alice/not-there", "--data", "demo", "--out", str(tmp_path / "o"), env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    if case == "unreachable":
        assert f"the Hub at http://127.0.0.1:{closed_port} is unreachable (nothing accepts connections at " \
            f"127.0.0.1:{closed_port})" in lines[0] and "offline" not in lines[0]
    else:
        assert "Hub repo alice/not-there not found" in lines[0]
    assert not (tmp_path / "o").exists()


def test_push_with_only_a_folder_says_the_repo_id_is_missing(hub, evaluated_output, tmp_path):
    """`push OUT` alone took OUT for the repo id and the current folder for what to push ("'.' is not a complete
    certify-zoo output"), or, run inside another output folder, would have pushed that one to a repo named OUT."""
    result = run_cli("push", str(evaluated_output), env=hub_env(hub, tmp_path), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{evaluated_output} is a certify-zoo output folder, not a repo id" in lines[0]
    assert f"certify-zoo push NAMESPACE/NAME {evaluated_output}" in lines[0]
    assert not hub.state.repos.get(str(evaluated_output).strip("/"))


def test_every_file_of_an_output_folder_has_the_usual_mode(evaluated_output):
    """Records, card and plot were renamed in from mkstemp's 0600 temporary files, and safetensors writes weights
    0600: a folder shared with a group showed its config.json (0644) and nothing else. Every file now gets what
    open() would give under the umask, as config.json does."""
    umask = os.umask(0)
    os.umask(umask)
    files = {p.name: p.stat().st_mode & 0o777 for p in evaluated_output.iterdir() if p.is_file()}
    assert {"model.safetensors", "config.json", "certify_zoo.json", "certification.json", "README.md",
            "certified_accuracy.png"} <= set(files)
    assert files == dict.fromkeys(files, 0o666 & ~umask)


def test_a_hub_that_answers_late_shows_a_passing_status_on_a_terminal_and_nothing_in_a_log(hub, tmp_path):
    """huggingface_hub retries a request the Hub does not answer for up to half a minute, and its retry warnings were
    silenced to keep errors on one line: a terminal stayed silent all that time. Now the first retry starts a
    spinner saying what is awaited, erased when the call ends; a log (stderr not a terminal) stays as it was."""
    import pty

    env = {**os.environ, "PYTHONPATH": str(REPO), **hub_env(hub, tmp_path), "COLUMNS": "200"}
    command = [sys.executable, "-m", "certify_zoo", "convert", "alice/not-there", "--data", "demo", "--out",
               str(tmp_path / "o")]
    # huggingface_hub asks twice (the second time with backoff): both fail, its first retry is answered (404)
    hub.state.fail_with, hub.state.fail_next = 503, 2
    terminal, other_end = pty.openpty()
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=other_end,
                                   env=env)
        os.close(other_end)
        seen = b""
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # the process closed its end
                break
            if not chunk:
                break
            seen += chunk
        assert process.wait(timeout=120) == 2
    finally:
        os.close(terminal)
        hub.state.fail_with, hub.state.fail_next = None, 0
    said = seen.decode(errors="replace")
    assert "does not answer (HTTP Error 503): huggingface_hub retries" in said, said[-2000:]
    assert "Hub repo alice/not-there not found" in said
    hub.state.fail_with, hub.state.fail_next = 503, 2
    try:
        logged = run_cli(*command[3:], env=hub_env(hub, tmp_path))
    finally:
        hub.state.fail_with, hub.state.fail_next = None, 0
    lines = logged.stderr.strip().splitlines()
    assert logged.returncode == 2 and len(lines) == 1 and "Hub repo alice/not-there not found" in lines[0], lines
