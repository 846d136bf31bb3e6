"""A conversion never harms a model it has not yet trained: forwards are deterministic (dropout, drop-path off in
every library), BatchNorm statistics never move, and --lr 0 returns the base exactly. Checked on a BatchNorm
ResNet, a timm Swin and ViT with drop rates, a transformers Swin, and the real EfficientNet-Lite2 on real photos."""
from __future__ import annotations

import json

import pytest
import torch

from certify_zoo.conversion import ConvertSettings, convert
from certify_zoo.forward_modes import batch_norms, set_conversion_mode, stochastic_layers
from certify_zoo.models import create_timm_model, load_classifier
from certify_zoo.recipes import choose_recipe, load_recipe
from conftest import sigterm_at_call
from real_model import check_photo_folder, efficientnet_lite2_folder, load_photos, photo_folder

SIZE = 32
DROP = 0.1


def _timm(folder, architecture, **kwargs):
    from certify_zoo.export import save_timm_model

    torch.manual_seed(0)
    net = create_timm_model(architecture, pretrained=False, num_classes=10, **kwargs,
                            pretrained_cfg_overlay=dict(input_size=(3, SIZE, SIZE), mean=(0.4,) * 3, std=(0.3,) * 3,
                                                        crop_pct=1.0, num_classes=10, hf_hub_id=None))
    save_timm_model(net.eval(), folder, [str(i) for i in range(10)])
    # timm leaves training-time rates out of the saved model_args; a user's config may carry them: write them in
    config = json.loads((folder / "config.json").read_text())
    config["model_args"].update({k: v for k, v in kwargs.items() if k.startswith(("drop", "attn_drop", "proj_drop"))})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _hf_swin(folder):
    from transformers import SwinConfig, SwinForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = SwinConfig(image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                        drop_path_rate=DROP, hidden_dropout_prob=DROP, attention_probs_dropout_prob=DROP,
                        num_labels=10)
    SwinForImageClassification(config).eval().save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.4] * 3, image_std=[0.3] * 3).save_pretrained(
        folder)
    return folder


BUILDERS = {
    "resnet-bn": lambda f: _timm(f, "test_resnet"),
    "timm-swin": lambda f: _timm(f, "swin_tiny_patch4_window7_224", img_size=SIZE, window_size=4, embed_dim=16,
                                 depths=(1, 1), num_heads=(1, 2), drop_path_rate=DROP, drop_rate=DROP),
    "timm-vit": lambda f: _timm(f, "test_vit", img_size=SIZE, drop_rate=DROP, attn_drop_rate=DROP,
                                proj_drop_rate=DROP, drop_path_rate=DROP),
    "hf-swin": _hf_swin,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def small_model(request, tmp_path_factory):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def effnet(tmp_path_factory):
    return efficientnet_lite2_folder(tmp_path_factory.mktemp("efficientnet_lite2"))


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("photos"))


def _held_out(demo_data, classifier, count=32):
    from certify_zoo.data import labelled_images

    dataset = labelled_images(str(demo_data / "test"), classifier.transform(), None, 10)
    return torch.stack([dataset[i][0] for i in range(0, len(dataset), len(dataset) // count)][:count])


def _convert(model, data, out, **overrides):
    recipe = load_recipe(choose_recipe(str(model)).name)
    settings = ConvertSettings.from_recipe(recipe, model=str(model), data=str(data), out=str(out), **overrides)
    convert(settings)
    return out


def _logits(folder, images):
    with torch.no_grad():
        return load_classifier(str(folder)).eval()(images)


def test_every_small_model_has_stochastic_layers_that_conversion_switches_off(small_model, demo_data):
    name, folder = small_model
    model = load_classifier(str(folder))
    images = _held_out(demo_data, model, 8)
    if name != "resnet-bn":
        assert stochastic_layers(model), name  # the test would prove nothing without them
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(images), model(images))  # train mode draws new masks
    for bn_mode in ("eval", "recompute"):
        set_conversion_mode(model, bn_mode)
        with torch.no_grad():
            assert torch.equal(model(images), model(images)), (name, bn_mode)


@pytest.mark.parametrize("estimator", ["paper", "jl"])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_lr_zero_returns_the_base_exactly(small_model, demo_data, tmp_path, estimator, batch_size):
    name, folder = small_model
    out = _convert(folder, demo_data / "train", tmp_path / "out", lr=0.0, max_steps=2, batch_size=batch_size,
                   estimator=estimator, gamma=3.0 * batch_size, check_images=0)
    images = _held_out(demo_data, load_classifier(str(folder)))
    difference = (_logits(out, images) - _logits(folder, images)).abs().max()
    assert difference <= 1e-5, (name, estimator, batch_size, float(difference))


def test_attention_biases_cached_in_eval_mode_train_and_stay_current(demo_data, tmp_path):
    """timm's LeViT (as EfficientFormer, EfficientViT and TinyViT) gathers its attention biases once per device in eval
    mode, with that forward's graph. Conversion trains the student in eval mode: a cached copy made the second
    backward fail (the graph was freed) and would have kept the biases of the first step."""
    folder = _timm(tmp_path / "levit", "levit_128s", img_size=SIZE)
    model = load_classifier(str(folder)).eval()
    images = _held_out(demo_data, model, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # two steps as conversion takes them, each through a fresh forward
        model(images).logsumexp(-1).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    fresh = load_classifier(str(folder)).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(images), fresh(images), atol=1e-5)  # the biases in force are the trained ones
    out = _convert(folder, demo_data / "train", tmp_path / "out", max_steps=3, batch_size=4, gamma=1.0,
                   check_images=0)
    converted = load_classifier(str(out)).eval()
    trained = [(name, tensor) for name, tensor in converted.state_dict().items() if name.endswith("attention_biases")]
    base = load_classifier(str(folder)).state_dict()
    assert trained and any(not torch.equal(tensor, base[name]) for name, tensor in trained)
    with torch.inference_mode():  # evaluate's forward, then the audit's input gradient on the same model
        clean = converted(images)
    x = images.clone().requires_grad_(True)
    logits = converted(x)
    (gradient,) = torch.autograd.grad(logits.max(-1).values.sum(), x)
    assert torch.allclose(logits.detach(), clean, atol=1e-5) and gradient.abs().sum() > 0


def test_a_model_returning_auxiliary_logits_is_read_by_its_main_logits():
    """timm's Inception-v3 built with aux_logits returns (logits, auxiliary logits) in every mode: the classifier's
    logits are the first (the rho and radius code needs one tensor)."""
    from certify_zoo.classifier import ImageClassifier

    torch.manual_seed(0)
    net = create_timm_model("inception_v3", pretrained=False, num_classes=10, aux_logits=True).eval()
    model = ImageClassifier(net, {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 299, 299)})
    images = torch.rand(1, 3, 299, 299)
    with torch.no_grad():
        main, auxiliary = net((images - 0.5) / 0.5)
        assert torch.equal(model(images), main) and not torch.equal(main, auxiliary)


def test_batch_statistics_never_see_a_single_image(demo_data, tmp_path):
    """With BatchNorm on batch statistics (recompute, train) a forward of one image fails wherever a feature map is
    1 x 1 (this ResNet at 32 px, squeeze-excitation blocks, BatchNorm1d heads): the epoch's last batch of one image is
    skipped, the statistics are recomputed without it, and a batch size or held-out slice of one is refused before
    anything is written."""
    import shutil

    from certify_zoo.errors import CertifyZooError

    folder = BUILDERS["resnet-bn"](tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    for picture in sorted((demo_data / "train").rglob("*.png"))[:23]:  # 2 held out, 21 = 5 x 4 + 1 train
        shutil.copy(picture, data / f"{picture.parent.name}_{picture.name}")
    model = load_classifier(str(folder))
    set_conversion_mode(model, "recompute")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(_held_out(demo_data, model, 1))  # what the conversion would have met
    out = _convert(folder, data, tmp_path / "out", bn_mode="recompute", batch_size=4, check_images=2, gamma=1.0,
                   epochs=1)
    record = json.loads((out / "certify_zoo.json").read_text())
    assert record["steps"] == 5 and record["images_seen"] == 20
    assert any(not torch.equal(value, dict(load_classifier(str(folder)).named_buffers())[name])
               for name, value in load_classifier(str(out)).named_buffers() if name.endswith("running_mean"))
    for overrides, counted in (({"batch_size": 1, "check_images": 2}, "2 held-out images"),
                               ({"batch_size": 4, "check_images": 1}, "1 held-out image)")):
        with pytest.raises(CertifyZooError, match="needs at least 2 images") as refused:
            _convert(folder, data, tmp_path / "refused", bn_mode="recompute", **overrides)
        assert counted in str(refused.value)  # counted as every message counts them: not "1 held-out images"
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("source", ["folder", "stream"])
def test_recomputed_statistics_of_a_run_resumed_after_its_last_step_are_the_uninterrupted_ones(demo_data, tmp_path,
                                                                                                 monkeypatch, source):
    """A run stopped after its last step resumes into the end alone: no training loop put its BatchNorm layers in
    train mode, so the recompute's forwards updated nothing, and the model was saved with reset statistics (mean 0,
    variance 1: up to 4.0 from the uninterrupted run's, num_batches_tracked 0). The recompute now sets train mode
    itself, and the loader's generator is put back where the uninterrupted run had it, so it draws the same batches.
    A stream (parquet files, 2 epochs of 3 steps) has no generator: its epoch is put back, so that it draws the
    last epoch's batches as the uninterrupted run did, not the first's."""
    import certify_zoo.conversion as convert_module
    from certify_zoo.errors import ConversionInterrupted
    from safetensors.torch import load_file
    from tiny_sources import digits_parquet

    folder = BUILDERS["resnet-bn"](tmp_path / "base")
    data = demo_data / "train" if source == "folder" else digits_parquet(tmp_path / "stream", demo_data, limit=54)
    overrides = dict(sigma=0.5, max_steps=4 if source == "folder" else 6, batch_size=16, reps=1, bn_mode="recompute",
                     seed=1, checkpoint_every=2, checkpoint_minutes=0)
    if source == "stream":
        overrides["check_images"] = 5
    _convert(folder, data, tmp_path / "reference", **overrides)
    real = convert_module.self_check
    monkeypatch.setattr(convert_module, "self_check", sigterm_at_call(real, 1))
    with pytest.raises(ConversionInterrupted, match="after the last step"):
        _convert(folder, data, tmp_path / "out", **overrides)
    monkeypatch.setattr(convert_module, "self_check", real)
    _convert(folder, data, tmp_path / "out", resume=True, **overrides)
    expected, got = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("reference", "out"))
    assert any(name.endswith("running_var") for name in got)
    assert {name: torch.equal(got[name], expected[name]) for name in expected} == dict.fromkeys(expected, True)


def test_one_step_at_positive_lr_keeps_every_batchnorm_buffer(demo_data, tmp_path):
    folder = BUILDERS["resnet-bn"](tmp_path / "base")
    out = _convert(folder, demo_data / "train", tmp_path / "out", lr=0.05, max_steps=1, batch_size=8, gamma=5.0,
                   check_images=0)
    base, converted = load_classifier(str(folder)), load_classifier(str(out))
    buffers = dict(base.named_buffers())
    assert batch_norms(base)
    assert any(not torch.equal(p, dict(base.named_parameters())[n]) for n, p in converted.named_parameters())
    for name, value in converted.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_recompute_sets_the_statistics_of_one_clean_pass(demo_data, tmp_path):
    """bn_mode recompute: the running statistics equal a cumulative average over clean conversion batches."""
    from certify_zoo.data_sources import conversion_loader

    folder = BUILDERS["resnet-bn"](tmp_path / "base")
    out = _convert(folder, demo_data / "train", tmp_path / "out", lr=0.0, max_steps=1, batch_size=64, gamma=5.0,
                   check_images=0, bn_mode="recompute", epochs=1)
    base, converted = load_classifier(str(folder)), load_classifier(str(out))
    # lr 0: the weights are the base's, so the statistics must be those of the clean images alone
    loader = conversion_loader(str(demo_data / "train"), base.transform(), 64, 0).loader
    original = {name: value.clone() for name, value in base.named_buffers()}
    for norm in batch_norms(base):
        norm.reset_running_stats()
        norm.train()
    seen = 0
    with torch.no_grad():  # the same images in another order: the first layer's mean agrees exactly, the rest up to
        # batching (deeper inputs are normalised with each batch's own statistics)
        for count, batch in enumerate(loader):
            if count >= 50:
                break
            for norm in batch_norms(base):
                norm.momentum = len(batch.images) / (seen + len(batch.images))
            base(batch.images)
            seen += len(batch.images)
    expected = dict(base.named_buffers())
    for name, value in converted.named_buffers():
        if "running_mean" in name:
            assert torch.allclose(value, expected[name], rtol=1e-2, atol=1e-2), name
            assert not torch.allclose(value, original[name], rtol=1e-2), name  # not the base's (made-up) statistics
        elif "running_var" in name:
            assert torch.allclose(value, expected[name], rtol=3e-2, atol=1e-3), name


def test_real_efficientnet_keeps_its_top1_on_real_photos(effnet, photos, demo_data, tmp_path):
    """The failure that started this: a real BatchNorm ImageNet model, 2 steps of its recipe at batch 4."""
    base = load_classifier(str(effnet))
    names, images = load_photos(base, photos)
    with torch.no_grad():
        probabilities = base(images).softmax(-1)
    top = probabilities.argmax(-1)
    assert base.label_names[int(top[names.index("coffee")])].startswith("espresso")  # the key mapping is right
    assert base.label_names[int(top[names.index("chelsea")])].startswith("Egyptian cat")
    confident = probabilities.max(-1).values >= 0.2
    assert confident.sum() >= 6
    out = _convert(effnet, photos, tmp_path / "out", max_steps=2, batch_size=4, sigma=0.25)
    with torch.no_grad():
        converted = load_classifier(str(out))(images).softmax(-1)
    assert torch.equal(converted.argmax(-1)[confident], top[confident])
    for name, value in load_classifier(str(out)).named_buffers():
        assert torch.equal(value, dict(base.named_buffers())[name]), name
    # the controller started at the recipe's effective weight: at 1000 classes the stated gamma is the same number
    first = json.loads((out / "certify_zoo.json").read_text())["gamma"]["trajectory"][0]  # gamma after its update
    assert first["gamma"] / first["factor"] == pytest.approx(load_recipe("efficientnet")["gamma_start"])


def test_check_photos_are_twenty_images_the_conversion_never_sees(photos, tmp_path):
    """conversion_safety.py --check-photos calibrates on these: enough for a radius, and none a conversion photo."""
    import numpy as np
    from PIL import Image

    from certify_zoo.certificate_names import MIN_CALIBRATION_IMAGES

    check = sorted(check_photo_folder(tmp_path / "check").glob("*.png"))
    assert len(check) == 20 >= MIN_CALIBRATION_IMAGES
    conversion = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(photos.glob("*.jpg"))]
    for file in check:
        image = np.asarray(Image.open(file))
        assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0, file.name
        assert not any(image.shape == other.shape and np.abs(image.astype(int) - other).mean() < 10
                       for other in conversion), file.name
    assert check_photo_folder(tmp_path / "check") == tmp_path / "check"  # written once, found again


@pytest.mark.parametrize("estimator,batch_size", [("jl", 1), ("paper", 2), ("jl", 8)])
def test_real_efficientnet_lr_zero_returns_the_base_exactly(effnet, photos, tmp_path, estimator, batch_size):
    out = _convert(effnet, photos, tmp_path / "out", lr=0.0, max_steps=1, batch_size=batch_size,
                   estimator=estimator, gamma=0.05, check_images=0)
    images = load_photos(load_classifier(str(effnet)), photos)[1][:4]
    difference = (_logits(out, images) - _logits(effnet, images)).abs().max()
    assert difference <= 1e-5, float(difference)


def test_lr_min_follows_a_lower_lr_so_the_schedule_only_decays():
    """--lr below the recipe's lr_min used to make the cosine climb towards lr_min (efficientnet: --lr 1e-9 trained
    at up to 7.8e-6 by the last step); lr_min now follows --lr at the recipe's ratio unless it is given."""
    from certify_zoo.conversion import learning_rate

    recipe = load_recipe("efficientnet")
    for lr in (1e-9, 0.0):
        settings = ConvertSettings.from_recipe(recipe, model="m", data="d", out="o", lr=lr)
        assert settings.lr_min == pytest.approx(lr * recipe["lr_min"] / recipe["lr"])
        rates = [learning_rate(step, 100, settings) for step in range(100)]
        assert max(rates) <= lr and rates[-1] <= rates[len(rates) // 2]
    given = ConvertSettings.from_recipe(recipe, model="m", data="d", out="o", lr=0.01, lr_min=0.002)
    assert given.lr_min == 0.002
