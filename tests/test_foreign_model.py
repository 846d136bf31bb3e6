"""A model the demo did not build: a small timm CNN with its own normalisation, trained here on tinted
16x16 digits, its training images exported as a plain folder, then converted and evaluated from the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from certify_zoo.models import create_timm_model
from conftest import card_usage_logits, error_line, run_cli

MEAN, STD = (0.45, 0.40, 0.35), (0.22, 0.25, 0.28)


@pytest.fixture(scope="module")
def foreign_model_and_data(tmp_path_factory):
    from sklearn.datasets import load_digits

    from certify_zoo.export import save_timm_model

    root = tmp_path_factory.mktemp("foreign")
    digits = load_digits()
    rng = np.random.default_rng(0)
    tints = rng.uniform(0.3, 1.0, size=(len(digits.images), 3))
    up = np.kron(digits.images / 16.0, np.ones((2, 2)))  # 16x16
    images = (up[:, :, :, None] * tints[:, None, None, :] * 255).round().astype(np.uint8)
    train, test = range(300, 1300), range(0, 300)  # a few seconds of training on a CPU
    for index in train:  # a plain folder: no class structure, conversion needs no labels
        Image.fromarray(images[index]).save(_mkdir(root / "train") / f"img_{index:04d}.jpg", quality=95)
    for index in test:
        folder = _mkdir(root / "test" / str(digits.target[index]))
        Image.fromarray(images[index]).save(folder / f"img_{index:04d}.png")

    torch.manual_seed(0)
    net = create_timm_model("resnet10t", pretrained=False, num_classes=10, stem_width=16, channels=(16, 32, 64, 64),
                            pretrained_cfg_overlay=dict(input_size=(3, 16, 16), mean=MEAN, std=STD, crop_pct=1.0,
                                                        interpolation="bilinear", hf_hub_id=None, url=None))
    x = (torch.tensor(images[list(train)]).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.tensor(digits.target[list(train)])
    _train(net, x, y)
    save_timm_model(net.eval(), root / "model", [str(i) for i in range(10)])
    return root


def _train(net, x: torch.Tensor, y: torch.Tensor) -> None:
    """Five epochs of cross-entropy with AdamW: a few seconds on a CPU for these 16x16 digits."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(5):
        for batch in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_convert_and_evaluate_a_foreign_timm_cnn_from_the_cli(foreign_model_and_data):
    root = foreign_model_and_data
    config = json.loads((root / "model" / "config.json").read_text())
    assert tuple(config["pretrained_cfg"]["mean"]) == MEAN and config["architecture"] == "resnet10t"
    out = root / "converted"
    result = run_cli("convert", str(root / "model"), "--data", str(root / "train"), "--out", str(out),
                     "--sigma", "0.25", "--gamma", "2", "--lr", "0.005", "--max-steps", "6", "--batch-size", "32")
    assert result.returncode == 0, result.stderr
    metadata = json.loads((out / "certify_zoo.json").read_text())
    assert metadata["steps"] == 6 and metadata["images_seen"] == 6 * 32 and metadata["sigma"] == 0.25
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["mean"] == list(MEAN)

    result = run_cli("evaluate", str(out), "--data", str(root / "test"), "--method", "all", "--n", "100")
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "certification.json").read_text())
    assert record["num_images"] == 300 and record["sigma"] == 0.25
    assert record["space"] == "[0,1] pixels at 3x16x16"
    assert record["clean_accuracy"] > 0.5  # six short fine-tuning steps keep a trained CNN well above chance (10%)
    assert "monte_carlo" in record["certificates"]
    # n = 100 draws at alpha 0.001 certify no radius above 0.375 (sigma 0.25): the table and the card say so, where a
    # zero at r = 0.5 would otherwise read as a model that is not robust there
    farthest = record["certificates"]["monte_carlo"]["certified_accuracy"][-1]
    assert farthest["radius"] > 0.375 and farthest["accuracy"] == 0
    said = " ".join(result.stdout.split())
    assert "Monte-Carlo n=100 certifies no radius above 0.375 (all n draws one class)" in said, result.stdout
    assert "alpha = 0.001; no radius above 0.375 with n draws)" in (out / "README.md").read_text()


def test_a_grey_model_converts_and_certifies_on_the_luma_of_the_images(foreign_model_and_data, tmp_path):
    """A model trained on grey images (in_chans 1; MNIST-like or medical models) reads the luma of the RGB images
    it is given, as PIL's "L" mode, instead of failing at its first convolution; its radii live in 1 x H x W
    pixels, and the converted model reloads with its one input channel."""
    from sklearn.datasets import load_digits

    from certify_zoo.export import save_timm_model
    from certify_zoo.models import load_classifier

    root = foreign_model_and_data
    files = sorted((root / "train").glob("*.jpg"))
    luma = torch.stack([torch.tensor(np.asarray(Image.open(f).convert("L")), dtype=torch.float32) / 255 for f in files])
    torch.manual_seed(0)
    net = create_timm_model("resnet10t", pretrained=False, num_classes=10, in_chans=1, stem_width=16,
                            channels=(16, 32, 64, 64),
                            pretrained_cfg_overlay=dict(input_size=(1, 16, 16), mean=(0.4,), std=(0.25,),
                                                        crop_pct=1.0, interpolation="bilinear", hf_hub_id=None,
                                                        url=None))
    x, y = (luma.unsqueeze(1) - 0.4) / 0.25, torch.tensor(load_digits().target[[int(f.stem[4:]) for f in files]])
    _train(net, x, y)
    save_timm_model(net.eval(), tmp_path / "grey", [str(i) for i in range(10)])
    seen = load_classifier(str(tmp_path / "grey")).transform()(Image.open(files[0]).convert("RGB"))
    assert seen.shape == (1, 16, 16) and (seen[0] - luma[0]).abs().max() <= 2 / 255

    out = tmp_path / "converted"
    result = run_cli("convert", str(tmp_path / "grey"), "--data", str(root / "train"), "--out", str(out),
                     "--sigma", "0.25", "--gamma", "2", "--lr", "0.005", "--max-steps", "6", "--batch-size", "32")
    assert result.returncode == 0, result.stderr
    result = run_cli("evaluate", str(out), "--data", str(root / "test"), "--method", "all", "--n", "100")
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "certification.json").read_text())
    assert record["space"] == "[0,1] pixels at 1x16x16" and record["num_images"] == 300
    assert record["clean_accuracy"] > 0.5 and "monte_carlo" in record["certificates"]
    assert load_classifier(str(out)).net.conv1[0].in_channels == 1
    from certify_zoo.card import render_card

    card = str(render_card(out))  # its usage says what the model takes, and plain timm's code gives its logits
    assert "images: N x 1 x 16x16 floats in [0,1]" in card and 'transform(image.convert("L"))' in card
    photo = Image.open(files[0]).convert("RGB")
    converted = load_classifier(str(out))
    with torch.no_grad():  # PIL's "L" rounds the luma to 8 bits, certify-zoo keeps it in float: 0.5/255 a pixel
        assert torch.allclose(card_usage_logits(out, photo), converted(converted.transform()(photo)[None]), atol=0.03)


def test_a_grey_transformers_model_reads_the_luma_and_converts(tmp_path):
    """transformers' num_channels 1 (its image processor still lists three means): the same luma, one mean."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    from certify_zoo.models import load_classifier

    folder = tmp_path / "grey"
    ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              num_labels=10)).save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    processor.save_pretrained(folder)
    classifier = load_classifier(str(folder))
    seen = classifier.transform()(Image.new("RGB", (20, 20), (200, 100, 50)))
    assert classifier.input_size == (1, 16, 16) and seen.shape == (1, 16, 16)
    assert abs(float(seen[0, 0, 0]) - (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255) < 2 / 255
    result = run_cli("convert", str(folder), "--data", "demo", "--out", str(tmp_path / "o"), "--max-steps", "2",
                     "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    converted = load_classifier(str(tmp_path / "o"))
    assert converted.input_size == (1, 16, 16)
    # plain transformers' code on the card reads the luma too
    photo = Image.fromarray((np.random.default_rng(0).random((24, 20, 3)) * 255).astype(np.uint8))
    with torch.no_grad():  # as above: PIL's 8-bit luma against certify-zoo's float one
        assert torch.allclose(card_usage_logits(tmp_path / "o", photo), converted(converted.transform()(photo)[None]),
                              atol=0.03)


@pytest.mark.parametrize("channels, classes, says", [
    (4, 3, "takes 4-channel images: certify-zoo reads images as RGB (3 channels) or grey (1)"),
    # softmax of one logit is 1 everywhere: it had failed in torch's words ("selected index k out of range")
    (3, 1, "has a single output logit (a sigmoid binary classifier?)")])
def test_a_model_certify_zoo_cannot_read_is_refused_in_one_line(tmp_path, channels, classes, says):
    from certify_zoo.export import save_timm_model

    net = create_timm_model("test_resnet", pretrained=False, num_classes=classes, in_chans=channels,
                            pretrained_cfg_overlay=dict(input_size=(channels, 32, 32), mean=(0.5,) * channels,
                                                        std=(0.25,) * channels, hf_hub_id=None, url=None))
    save_timm_model(net, tmp_path / "model", ["a", "b", "c"][:classes])
    result = run_cli("convert", str(tmp_path / "model"), "--data", "demo", "--out", str(tmp_path / "o"),
                     "--max-steps", "1")
    assert result.returncode != 0 and says in error_line(result.stderr) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("timm_records_arguments", [True, False])
def test_a_timm_model_of_non_default_size_saves_and_loads_back_whatever_timm_records(timm_records_arguments,
                                                                                      tmp_path, monkeypatch):
    """timm records a model's arguments (``_model_args``, which save_for_hf writes) only from 1.0.31 on: under
    1.0.29 the demo's 2-block ViT was saved without them and loaded back as a default vit_tiny (size mismatch on a
    GPU machine). Both ways, the saved folder must rebuild the same network."""
    import timm

    from certify_zoo.demo import DEMO_ARCHITECTURE, DEMO_MODEL_ARGS
    from certify_zoo.export import save_timm_model
    from certify_zoo.models import create_timm_model, load_timm_folder

    if not timm_records_arguments:  # what timm before 1.0.31 returns: a model with no record of its arguments
        original = timm.create_model

        def create_model_without_record(*args, **kwargs):
            net = original(*args, **kwargs)
            net.__dict__.pop("_model_args", None)
            return net

        monkeypatch.setattr(timm, "create_model", create_model_without_record)
    torch.manual_seed(0)
    net = create_timm_model(DEMO_ARCHITECTURE, pretrained=False, num_classes=10, **DEMO_MODEL_ARGS).eval()
    if timm_records_arguments and not hasattr(net, "_model_args"):
        pytest.skip(f"timm {timm.__version__} records no arguments (before 1.0.31): the other case is what it does")
    assert hasattr(net, "_model_args") == timm_records_arguments
    save_timm_model(net, tmp_path / "saved", [str(i) for i in range(10)])
    saved_args = json.loads((tmp_path / "saved" / "config.json").read_text())["model_args"]
    assert (saved_args["embed_dim"], saved_args["depth"]) == (64, 2)
    loaded = load_timm_folder(tmp_path / "saved")
    images = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.net.eval()(images), net(images))
    # and saved again from the loaded copy (a conversion's output), the arguments survive
    save_timm_model(loaded.net, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_args"]["embed_dim"] == 64


def test_a_timm_model_that_shares_a_module_across_blocks_saves_and_loads_with_plain_timm(tmp_path):
    """timm's CoaT uses one convolutional position encoding in several blocks: its state dict names one tensor
    several times, which safetensors refuses to write (the converted CoaT could not be saved). Every name is written
    and plain timm loads it back strictly, with the same logits."""
    import timm

    from certify_zoo.export import save_timm_model

    torch.manual_seed(0)
    net = create_timm_model("coat_lite_tiny", pretrained=False, num_classes=3, img_size=32,
                            pretrained_cfg_overlay=dict(input_size=(3, 32, 32), hf_hub_id=None, url=None)).eval()
    state = net.state_dict()
    assert state["cpe1.proj.weight"].data_ptr() == state["serial_blocks1.0.cpe.proj.weight"].data_ptr()
    save_timm_model(net, tmp_path / "coat", ["a", "b", "c"])
    again = timm.create_model(f"local-dir:{tmp_path / 'coat'}", pretrained=True).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(images), net(images))


def test_a_timm_imagenet_model_without_label_names_shows_imagenet_class_names(tmp_path):
    """A timm ImageNet checkpoint carries no label names (timm/resnet50.a1_in1k): predict showed "281", where timm's
    inference script shows "tabby, tabby cat". Shown, not saved: the converted config stays as the base's."""
    from timm.data import ImageNetInfo

    import certify_zoo
    from certify_zoo.export import save_timm_model
    from certify_zoo.predict import PredictSettings, predict

    descriptions = ImageNetInfo().label_descriptions()
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(photo)
    for classes in (1000, 7):
        folder = tmp_path / f"classes-{classes}"
        torch.manual_seed(0)
        save_timm_model(create_timm_model("resnet10t", pretrained=False, num_classes=classes,
                                          pretrained_cfg_overlay=dict(input_size=(3, 32, 32), hf_hub_id=None)).eval(),
                        folder)
        assert "label_names" not in json.loads((folder / "config.json").read_text())
        row = predict(PredictSettings(model=str(folder), inputs=[str(photo)], sigma=0.25)).rows[0]
        shown = descriptions[row["class_index"]] if classes == 1000 else str(row["class_index"])
        assert row["class"] == shown and row["top_k"][1]["class"] != row["class"]
        with pytest.warns(UserWarning, match="not converted by certify-zoo: the radii certify.. gives it are not"):
            model = certify_zoo.load(folder, sigma=0.25)
        result = certify_zoo.certify(model, model.transform()(Image.open(photo).convert("RGB")).unsqueeze(0))
        assert result.labels == ([descriptions[int(result.prediction[0])]] if classes == 1000 else None)
    # and evaluate reads class folders named as ImageNet names its classes (it had asked for synsets or indices)
    from certify_zoo.evaluation import EvaluateSettings, evaluate

    for name in ("tabby cat", "goldfish", "n01443537"):
        (tmp_path / "named" / name).mkdir(parents=True)
        Image.open(photo).save(tmp_path / "named" / name / "photo.png")
    evaluation = evaluate(EvaluateSettings(model=str(tmp_path / "classes-1000"), data=str(tmp_path / "named"),
                                           sigma=0.25, method="deterministic", audit="none", write=False))
    assert evaluation.record["num_images"] == 3
    assert sorted(evaluation.per_image["label"].tolist()) == [1, 1, 281]  # n01443537 is goldfish's synset
