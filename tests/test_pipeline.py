"""End to end on real digits: convert, evaluate, and plain timm loading of the output."""
from __future__ import annotations

import json

import torch

from conftest import run_cli


def test_output_loads_in_plain_timm_with_same_logits(short_conversion, demo_data):
    import timm

    from certify_zoo.data import labelled_images
    from certify_zoo.models import load_classifier

    ours = load_classifier(str(short_conversion))
    plain = timm.create_model(f"local-dir:{short_conversion}", pretrained=True).eval()
    cfg = timm.data.resolve_data_config({}, model=plain)
    # tuples from timm 1.0.31 on, lists (as read from config.json) before
    assert tuple(cfg["input_size"]) == (3, 8, 8) and tuple(cfg["mean"]) != (0.485, 0.456, 0.406)
    images = torch.stack([labelled_images("demo", ours.transform(), ours.label_names, 10)[i][0] for i in range(16)])
    normalised = (images - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(plain(normalised), ours(images))


def test_cli_evaluate_writes_certification_record(short_conversion):
    result = run_cli("evaluate", str(short_conversion), "--data", "demo", "--method", "all", "--n", "200",
                     "--max-images", "40")
    assert result.returncode == 0, result.stderr
    record = json.loads((short_conversion / "certification.json").read_text())
    assert record["num_images"] == 40 and record["sigma"] == 0.5
    mc = record["certificates"]["monte_carlo"]
    assert mc["n"] == 200 and [row["radius"] for row in mc["certified_accuracy"]] == [0, 0.25, 0.5, 0.75, 1.0]
    accuracies = [row["accuracy"] for row in record["certificates"]["deterministic"]["certified_accuracy"]]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] == record["clean_accuracy"] > 0.5


def test_evaluate_compiled_or_channels_last_gives_the_eager_certificates(short_conversion):
    """--compile (torch.compile, inductor on CPU) and --channels-last are speed options only: the same predictions
    and radii."""
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    runs = {}
    for option in ("eager", "compile", "channels_last"):
        flags = {option: True} if option != "eager" else {}
        runs[option] = evaluate(EvaluateSettings(model=str(short_conversion), data="demo", method="deterministic",
                                                 max_images=48, batch_size=16, write=False, **flags)).per_image
    for option in ("compile", "channels_last"):
        assert torch.equal(runs["eager"]["prediction"], runs[option]["prediction"])
        torch.testing.assert_close(runs[option]["radius"], runs["eager"]["radius"], rtol=1e-4, atol=1e-5)
