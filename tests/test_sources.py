"""Any classifier in, any images in: every model family and data source through the CLI, all offline.

Models: tiny timm ResNet / ViT / ConvNeXt and transformers ViT / ResNet / distilled DeiT (with teacher), each from
a local folder and by Hub id from a pre-filled Hugging Face cache (HF_HUB_OFFLINE=1). Data: digits folders, a
nested folder of odd images with a corrupt file, a local parquet dataset streamed by `datasets`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from certify_zoo.models import create_timm_model
from conftest import card_usage_logits, error_line
from tiny_sources import (LABELS, SIZE, TIMM_MODELS, TRANSFORMERS_MODELS, odd_image_folder, parquet_dataset,
                          png_bytes, put_in_hub_cache, save_model, save_timm, save_transformers)

FAMILIES = [*TIMM_MODELS, *TRANSFORMERS_MODELS]
FAST = ("--max-steps", "2", "--batch-size", "4")


def cli(*args: str):
    """The real Typer app in-process (argument parsing, @friendly_errors, exit codes) without a new interpreter."""
    from certify_zoo.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def says(result, text: str) -> bool:
    """The console wraps long lines (paths) at its width: compare without any whitespace."""
    return "".join(text.split()) in "".join(result.output.split())


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    line = error_line(result.stderr)
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a shared, oversubscribed CPU, torch's intra-op threads wait on each other: one thread is ~100x faster
    for these tiny models (measured 0.01 s vs 7 s per step with 2 threads at load 20)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hub_cache(offline_cache) -> Path:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # every Hub id in these tests resolves from the cache, never the network
    return Path(constants.HF_HUB_CACHE)


@pytest.fixture(scope="module")
def models(tmp_path_factory, hub_cache) -> dict[str, Path]:
    """Each family saved in its library's own format, and the same files as Hub repo testorg/<family>."""
    root = tmp_path_factory.mktemp("tiny-models")
    folders = {}
    for family in FAMILIES:
        folders[family] = save_model(root / family, family)
        put_in_hub_cache(hub_cache, f"testorg/{family}", folders[family])
    return folders


@pytest.fixture(scope="module")
def converted(models, demo_data, tmp_path_factory):
    """convert through the CLI once per (family, source); later calls reuse the output."""
    outputs: dict[tuple[str, str], tuple[Path, object]] = {}
    root = tmp_path_factory.mktemp("converted-sources")

    def run(family: str, source: str):
        if (family, source) not in outputs:
            spec = {"local": str(models[family]), "hub": f"testorg/{family}",
                    "hf-hub": f"hf-hub:testorg/{family}"}[source]
            out = root / f"{family}-{source}"
            outputs[family, source] = out, cli("convert", spec, "--data", "demo", "--out", out, *FAST)
        return outputs[family, source]

    return run


@pytest.mark.parametrize("source", ["local", "hub"])
@pytest.mark.parametrize("family", FAMILIES)
def test_convert_and_evaluate_every_family_through_cli(models, converted, family, source):
    source = "hf-hub" if (source == "hub" and family in ("vit", "hf-resnet")) else source  # both Hub spellings
    out, result = converted(family, source)
    assert result.exit_code == 0, result.output
    library = "transformers" if family.startswith("hf-") else "timm"
    kind = f"local-{library}" if source == "local" else f"hub-{library}"
    assert says(result, f"-> {kind}: ")
    metadata = json.loads((out / "certify_zoo.json").read_text())
    assert metadata["steps"] == 2 and metadata["source_library"] == library and metadata["num_classes"] == 10
    config = json.loads((out / "config.json").read_text())
    if library == "transformers":  # transformers' own format: save_pretrained with the image processor
        assert config["architectures"] == json.loads((models[family] / "config.json").read_text())["architectures"]
        assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    else:
        assert config["architecture"] == TIMM_MODELS[family][0]

    evaluated = cli("evaluate", out, "--data", "demo", "--max-images", "8", "--batch-size", "8")
    assert evaluated.exit_code == 0, evaluated.output
    record = json.loads((out / "certification.json").read_text())
    assert record["num_images"] == 8 and record["space"] == f"[0,1] pixels at 3x{SIZE}x{SIZE}"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_familys_transform_reaches_a_spawned_worker_pickled_and_still_gives_the_same_pixels(models, family):
    """Under a process group on some Pythons the DataLoader workers are spawned (data.worker_start_method): the
    dataset reaches them pickled, the model's transform with it."""
    import pickle

    from PIL import Image

    from certify_zoo.models import load_classifier

    transform = load_classifier(str(models[family])).transform()
    photo = Image.fromarray(torch.randint(0, 256, (37, 45, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    assert torch.equal(pickle.loads(pickle.dumps(transform))(photo), transform(photo))


def test_transformers_output_reloads_with_plain_from_pretrained(converted, demo_data):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from certify_zoo.models import load_classifier

    out, result = converted("hf-vit", "local")
    assert result.exit_code == 0, result.output
    ours = load_classifier(str(out))
    plain = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    files = sorted((demo_data / "test" / "3").glob("*.png"))[:4]
    images = [Image.open(f).convert("RGB").resize((SIZE, SIZE)) for f in files]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]  # the processor's own preprocessing
    ours_input = torch.stack([ours.transform()(image) for image in images])
    with torch.no_grad():
        plain_logits = plain(pixel_values=pixel_values).logits
        our_logits = ours(ours_input)
    assert torch.allclose(plain_logits, our_logits, atol=1e-5)
    assert ours.source == "transformers" and ours.label_names == LABELS


@pytest.mark.parametrize("family", ["resnet", "hf-vit", "hf-deit-distilled"])
def test_the_cards_plain_library_code_gives_the_models_logits(converted, demo_data, family):
    """The card's first 'How to use it' block, run as a user would (with a PIL image in scope), loads the converted
    model with plain timm or plain transformers and gives certify-zoo's logits. The card of a transformers model
    had shown timm's code, which cannot load a transformers folder."""
    from PIL import Image

    from certify_zoo.models import load_classifier

    out, result = converted(family, "local")
    assert result.exit_code == 0, result.output
    usage = (out / "README.md").read_text().split("## How to use it", 1)[1].split("With certify-zoo", 1)[0]
    assert ("Plain transformers" in usage) == family.startswith("hf-") != ("Plain timm" in usage)
    image = Image.open(sorted((demo_data / "test" / "3").glob("*.png"))[0]).convert("RGB")
    ours = load_classifier(str(out))
    with torch.no_grad():  # 1e-3: DeiT's bicubic 8 -> 36 px in transformers 5.0's processor moves logits by 1e-4
        assert torch.allclose(card_usage_logits(out, image), ours(ours.transform()(image).unsqueeze(0)), atol=1e-3)


def test_timm_wrapper_folder_converts_and_every_timm_output_loads_in_both_libraries(converted, tmp_path):
    """transformers' TimmWrapperForImageClassification saves a timm model in a transformers folder (its timm config
    and pretrained_cfg in config.json, weights under timm_model.): certify-zoo loads the timm model inside, with the
    wrapper's logits. What certify-zoo saves in timm's format loads with timm and with transformers'
    AutoModelForImageClassification (which wraps it; a num_classes in model_args too had made it fail)."""
    import timm
    from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

    from certify_zoo.models import load_classifier

    torch.manual_seed(0)
    net = create_timm_model("test_resnet", pretrained=False, num_classes=10,
                            pretrained_cfg_overlay=dict(input_size=(3, SIZE, SIZE), crop_pct=1.0, hf_hub_id=None))
    config = TimmWrapperConfig.from_dict({"architecture": "test_resnet", "num_classes": 10,
                                          "pretrained_cfg": net.pretrained_cfg})
    wrapper = TimmWrapperForImageClassification(config).eval()
    wrapper.timm_model.load_state_dict(net.state_dict())
    wrapper.save_pretrained(tmp_path / "wrapped")
    images = torch.rand(4, 3, SIZE, SIZE)
    ours = load_classifier(str(tmp_path / "wrapped"))
    with torch.no_grad():
        assert torch.allclose(ours(images), wrapper(pixel_values=(images - ours.mean) / ours.std).logits, atol=1e-5)
    result = cli("convert", tmp_path / "wrapped", "--data", "demo", "--out", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    for out in (tmp_path / "out", converted("resnet", "local")[0]):
        assert "num_classes" not in json.loads((out / "config.json").read_text()).get("model_args", {})
        plain_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        plain_transformers = AutoModelForImageClassification.from_pretrained(out).eval()
        with torch.no_grad():
            assert torch.allclose(plain_transformers(pixel_values=images).logits, plain_timm(images), atol=1e-5)


def test_timm_registry_name_from_prefilled_cache(tmp_path, hub_cache, demo_data):
    """timm/NAME.TAG through timm's registry: weights come from the Hub cache; ImageNet synset folders map to 1000
    classes."""
    from PIL import Image
    from safetensors.torch import save_file

    net = create_timm_model("test_resnet.r160_in1k", pretrained=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    save_file(net.state_dict(), str(repo / "model.safetensors"))
    put_in_hub_cache(hub_cache, "timm/test_resnet.r160_in1k", repo)
    out = tmp_path / "out"
    result = cli("convert", "timm/test_resnet.r160_in1k", "--data", "demo", "--out", out, "--max-steps", "1",
                 "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert says(result, "-> timm: test_resnet.r160_in1k")
    synsets = tmp_path / "val"
    for synset in ("n01440764", "n01443537"):  # ImageNet classes 0 and 1 in the standard order
        (synsets / synset).mkdir(parents=True)
        Image.new("RGB", (64, 64), (10, 200, 30)).save(synsets / synset / "a.png")
    evaluated = cli("evaluate", out, "--data", synsets, "--batch-size", "2")
    assert evaluated.exit_code == 0, evaluated.output
    record = json.loads((out / "certification.json").read_text())
    assert record["num_images"] == 2 and record["space"] == "[0,1] pixels at 3x160x160"


def test_odd_images_converted_to_rgb(tmp_path):
    from certify_zoo.data import open_rgb

    root = odd_image_folder(tmp_path / "odd")
    grey, cmyk, rgba, rotated = (open_rgb(root / p) for p in ("a/b/grey.png", "c/cmyk.jpg", "rgba.png",
                                                              "d/e/f/rotated.jpg"))
    assert {image.mode for image in (grey, cmyk, rgba, rotated)} == {"RGB"}
    assert grey.getpixel((0, 0)) == (128, 128, 128)
    assert rgba.getpixel((5, 5)) == (255, 255, 255)  # fully transparent red is white, not red or black
    r, g, b = cmyk.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert rotated.size == (24, 48)  # the EXIF orientation turned the 48x24 landscape into portrait


def test_sixteen_bit_and_float_grey_images_keep_their_contrast(tmp_path):
    """A 16-bit grey PNG (medical and scientific images) had turned white (PIL clips it at 255 when it converts to
    RGB) and a float TIFF in [0,1] black: both are scaled to 8 bits by their range first."""
    import numpy as np
    from PIL import Image

    from certify_zoo.data import open_rgb

    ramp = np.linspace(0.0, 1.0, 64).reshape(8, 8)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "sixteen.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    expected = (ramp * 255).round()
    for name in ("sixteen.png", "float.tif"):
        pixels = np.asarray(open_rgb(tmp_path / name), dtype=np.float64)
        assert pixels.shape == (8, 8, 3) and np.abs(pixels[..., 0] - expected).max() <= 1, name
        assert (pixels[..., 0] == pixels[..., 2]).all()


def test_nested_odd_folder_converts_and_reports_corrupt_file(models, tmp_path):
    root = odd_image_folder(tmp_path / "odd")
    out = tmp_path / "out"
    result = cli("convert", models["vit"], "--data", root, "--out", out, *FAST, "--check-images", "0")
    assert result.exit_code == 0, result.output
    metadata = json.loads((out / "certify_zoo.json").read_text())
    assert metadata["skipped_images"] == 1 and metadata["images_seen"] == 7
    assert [Path(f).name for f in metadata["unreadable_files"]] == ["corrupt.jpg"]
    assert says(result, "skipped 1 unreadable") and says(result, "corrupt.jpg")

    # two passes read the corrupt file twice: one file, two reads (it had said "skipped 2 unreadable images")
    twice = cli("convert", models["vit"], "--data", root, "--out", tmp_path / "twice", "--max-steps", "4",
                "--batch-size", "4", "--check-images", "0")
    assert twice.exit_code == 0, twice.output
    metadata = json.loads((tmp_path / "twice" / "certify_zoo.json").read_text())
    assert metadata["epochs_run"] == 2 and metadata["skipped_images"] == 2
    assert [Path(f).name for f in metadata["unreadable_files"]] == ["corrupt.jpg"]
    assert says(twice, "skipped 1 unreadable image, 2 reads in all")

    strict = cli("convert", models["vit"], "--data", root, "--out", tmp_path / "strict", *FAST, "--strict")
    assert_one_line_error(strict, "corrupt.jpg", "--strict")


def test_hidden_folders_and_files_beside_the_images_are_not_data(demo_data, tmp_path):
    """Jupyter's .ipynb_checkpoints (a copy of an image, among the class folders too), macOS's .DS_Store and the
    AppleDouble ._* files of an unzipped __MACOSX folder: not a class, not an image, not an unreadable file."""
    import shutil

    from certify_zoo.data import labelled_images, unlabelled_images

    root = tmp_path / "test"
    for digit in ("3", "4"):
        shutil.copytree(demo_data / "test" / digit, root / digit)
    visible = sorted(root.rglob("*.png"))
    picture = visible[0]
    for junk in (root / ".ipynb_checkpoints" / "a-checkpoint.png", root / "3" / ".ipynb_checkpoints" / "b.png",
                 root / "__MACOSX" / "3" / "._c.png", root / "4" / ".hidden.png"):
        junk.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(picture, junk)
    (root / ".DS_Store").write_bytes(b"\0\1")
    labelled = labelled_images(str(root), lambda image: image, ["0", "1", "2", "3", "4"], 5)
    assert labelled.files == visible and set(labelled.labels) == {3, 4}
    assert unlabelled_images(str(root), lambda image: image).files == visible


def test_an_output_of_certify_zoo_inside_the_data_folder_is_not_data(demo_data, tmp_path):
    """--out inside --data: the conversion's folder (certify_zoo.json) and an evaluation's records folder
    (certification.json) hold a plot.png, which a second conversion read as a training image and which
    --overwrite then removed (an unreadable image); among class folders it was a class that matched none."""
    import shutil

    from certify_zoo.data import labelled_images, unlabelled_images

    root = tmp_path / "test"
    for digit in ("3", "4"):
        shutil.copytree(demo_data / "test" / digit, root / digit)
    visible = sorted(root.rglob("*.png"))
    for folder, record in (("converted", "certify_zoo.json"), ("records", "certification.json")):
        (root / folder).mkdir()
        (root / folder / record).write_text("{}")
        shutil.copy(visible[0], root / folder / "plot.png")
    (root / "4" / "more").mkdir()  # a folder of images with a json beside them is still data
    shutil.copy(visible[0], root / "4" / "more" / "copy.png")
    (root / "4" / "more" / "labels.json").write_text("{}")
    data = sorted([*visible, root / "4" / "more" / "copy.png"])
    assert unlabelled_images(str(root), lambda image: image).files == data
    labelled = labelled_images(str(root), lambda image: image, ["0", "1", "2", "3", "4"], 5)
    assert labelled.files == data and set(labelled.labels) == {3, 4}


def test_linked_class_folders_are_data_and_a_link_back_up_does_not_loop(demo_data, tmp_path):
    """A data set assembled from symbolic links to class folders: Path.rglob had skipped them, so convert read 1 of
    the 41 images here (silently). Each real folder is read once, so a link back up the tree cannot loop."""
    import os
    import shutil

    from certify_zoo.data import unlabelled_images

    shutil.copytree(demo_data / "test" / "3", tmp_path / "real" / "3")
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(tmp_path / "real" / "3", data / "3", target_is_directory=True)
    shutil.copy(next((tmp_path / "real" / "3").glob("*.png")), data / "own.png")
    os.symlink(data, tmp_path / "real" / "3" / "up", target_is_directory=True)
    files = unlabelled_images(str(data), lambda image: image).files
    assert len(files) == 1 + len(list((tmp_path / "real" / "3").glob("*.png")))
    assert len(set(files)) == len(files) and all(str(f).startswith(str(data)) for f in files)


def test_parquet_stream_converts_and_evaluates(models, tmp_path):
    data = parquet_dataset(tmp_path / "parquet")
    out = tmp_path / "out"
    result = cli("convert", models["hf-vit"], "--data", data, "--out", out, *FAST, "--check-images", "0")
    assert result.exit_code == 0, result.output
    assert says(result, f"datasets: {data}, split train")
    metadata = json.loads((out / "certify_zoo.json").read_text())
    assert metadata["steps"] == 2 and metadata["skipped_images"] == 1 and metadata["images_seen"] == 7

    evaluated = cli("evaluate", out, "--data", data, "--label-column", "label", "--batch-size", "4")
    assert evaluated.exit_code == 0, evaluated.output
    record = json.loads((out / "certification.json").read_text())
    assert record["num_images"] == 7 and record["skipped_images"] == 1


def test_model_spec_resolution_order(models, hub_cache):
    from certify_zoo.models import resolve_model_spec

    assert resolve_model_spec(str(models["resnet"])).kind == "local-timm"
    assert resolve_model_spec(str(models["hf-resnet"])).kind == "local-transformers"
    assert resolve_model_spec("timm/convnext_tiny.fb_in1k").describe() == "timm: convnext_tiny.fb_in1k"
    assert resolve_model_spec("resnet50").kind == "timm"
    assert resolve_model_spec("hf-hub:testorg/resnet").describe() == "hub-timm: testorg/resnet"
    assert resolve_model_spec("testorg/hf-vit").describe() == "hub-transformers: testorg/hf-vit"


# ---------------------------------------------------------------- bad input: one line, non-zero exit

def test_non_classifier_refused(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path / "encoder"
    ViTModel(ViTConfig(image_size=SIZE, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(folder)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    assert_one_line_error(cli("convert", folder, "--data", "demo", "--out", tmp_path / "o", *FAST),
                          "not an image classifier", "ViTModel")


def test_multi_label_classifier_refused(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path / "tagger"
    ViTForImageClassification(ViTConfig(image_size=SIZE, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=32, num_labels=4,
                                        problem_type="multi_label_classification")).save_pretrained(folder)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    assert_one_line_error(cli("convert", folder, "--data", "demo", "--out", tmp_path / "o", *FAST),
                          "is a multi-label-classification model", "single-label classifiers")


def test_classifier_that_does_not_take_pixels_refused(tmp_path):
    """ImageGPT's classification class takes colour-cluster token ids: refused at load, naming why, not at the
    conversion's first forward in transformers' words."""
    from transformers import ImageGPTConfig, ImageGPTForImageClassification, ImageGPTImageProcessor

    folder = tmp_path / "imagegpt"
    ImageGPTForImageClassification(ImageGPTConfig(n_embd=16, n_layer=1, n_head=2, n_positions=SIZE * SIZE,
                                                   num_labels=3)).save_pretrained(folder)
    ImageGPTImageProcessor(size={"height": SIZE, "width": SIZE}, clusters=None).save_pretrained(folder)
    assert_one_line_error(cli("convert", folder, "--data", "demo", "--out", tmp_path / "o", *FAST),
                          "ImageGPTForImageClassification", "does not map an image's pixels to class logits",
                          "input_ids")
    assert not (tmp_path / "o").exists()


def test_pickle_only_repo_refused(tmp_path, hub_cache):
    repo = tmp_path / "pickled"
    save_timm(repo, "test_resnet")
    (repo / "model.safetensors").rename(repo / "pytorch_model.bin")  # the file is never opened
    put_in_hub_cache(hub_cache, "testorg/pickled", repo)
    assert_one_line_error(cli("convert", "testorg/pickled", "--data", "demo", "--out", tmp_path / "o", *FAST),
                          "only pickle weights", "pytorch_model.bin", "never unpickles")


def test_unknown_timm_name_suggests_close_matches(tmp_path):
    assert_one_line_error(cli("convert", "timm/convnext_tinny", "--data", "demo", "--out", tmp_path / "o"),
                          "unknown model", "did you mean", "convnext_tiny")


def test_dataset_without_image_column_refused(models, tmp_path):
    data = parquet_dataset(tmp_path / "no-images", with_images=False)
    assert_one_line_error(cli("convert", models["vit"], "--data", data, "--out", tmp_path / "o", *FAST),
                          "no image column", "--image-column")


def test_an_image_or_label_column_that_holds_the_other_kind_is_refused(models, tmp_path):
    """--image-column label read every class label as an unreadable image, and the run ended on "none of the 12
    images read so far could be decoded" after loading the model; --label-column image the other way round."""
    data = parquet_dataset(tmp_path / "table")
    assert_one_line_error(cli("convert", models["vit"], "--data", data, "--out", tmp_path / "o", *FAST,
                              "--image-column", "label"), "column 'label' holds class labels, not images")
    assert not (tmp_path / "o").exists()
    assert_one_line_error(cli("evaluate", models["resnet"], "--data", data, "--sigma", "0.25",
                              "--label-column", "image"), "column 'image' holds images, not labels")
    # a string column may hold paths or names: taken as asked (its rows are then read as images)
    assert_one_line_error(cli("convert", models["vit"], "--data", data, "--out", tmp_path / "o", *FAST,
                              "--image-column", "caption"), "could be decoded")


def test_a_plain_column_of_image_bytes_or_paths_is_read_as_images(models, tmp_path):
    """A table exported without datasets' Image type (a binary column of PNG bytes, a string column of file paths)
    had every row counted unreadable: 'no readable images'. Each now certifies as the Image column does."""
    import datasets
    from PIL import Image

    from certify_zoo.data_sources import decode_image

    pictures = [Image.new("RGB", (SIZE, SIZE), (40 * i, 90, 200 - 30 * i)) for i in range(4)]
    for index, picture in enumerate(pictures):
        picture.save(tmp_path / f"{index}.png")
    table = datasets.Dataset.from_dict({"png": [png_bytes(p) for p in pictures],
                                        "file": [str(tmp_path / f"{i}.png") for i in range(4)],
                                        "image": [{"bytes": png_bytes(p), "path": None} for p in pictures],
                                        "label": [i % 2 for i in range(4)]},
                                       features=datasets.Features({"png": datasets.Value("binary"),
                                                                   "file": datasets.Value("string"),
                                                                   "image": datasets.Image(),
                                                                   "label": datasets.Value("int64")}))
    (tmp_path / "table").mkdir()
    table.to_parquet(str(tmp_path / "table" / "train.parquet"))
    for cell in (png_bytes(pictures[1]), str(tmp_path / "1.png")):
        assert decode_image(cell).tobytes() == pictures[1].tobytes() and decode_image(cell).size == pictures[1].size
    records = {}
    for column in ("png", "file", "image"):
        result = cli("evaluate", models["resnet"], "--data", tmp_path / "table", "--sigma", "0.25", "--image-column",
                     column, "--method", "deterministic", "--json")
        assert result.exit_code == 0, result.output
        records[column] = json.loads(result.stdout)
    assert records["png"]["num_images"] == 4 and records["png"]["certificates"] == \
        records["file"]["certificates"] == records["image"]["certificates"]
    # a label column whose values name no class is named as what it is (it was called "class folders")
    assert_one_line_error(cli("evaluate", models["resnet"], "--data", tmp_path / "table", "--sigma", "0.25",
                              "--image-column", "png", "--label-column", "file"),
                          "labels in column 'file' of", "do not match the model's 10 classes")


def test_labels_not_matching_model_classes_refused(models, tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "pets" / name / "a.png")
    assert_one_line_error(cli("evaluate", models["resnet"], "--data", tmp_path / "pets", "--sigma", "0.25"),
                          "do not match the model's 10 classes")


def test_class_folders_spelled_loosely_map_to_the_label_names_they_mean():
    """Folders as people name them: case, underscores and hyphens, or one of transformers' comma-separated ImageNet
    synonyms. A spelling two labels share names neither, and an unknown folder is still refused."""
    from certify_zoo.data import class_index
    from certify_zoo.errors import CertifyZooError

    labels = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark, white shark", "Golden Retriever"]
    assert class_index(["golden_retriever", "Tench", "great-white-shark", "goldfish"], labels, 4) == {
        "golden_retriever": 3, "Tench": 0, "great-white-shark": 2, "goldfish": 1}
    assert class_index(["tench, Tinca tinca"], labels, 4) == {"tench, Tinca tinca": 0}  # exact names first
    # each folder on its own: a set named mostly one way and partly another (it had been refused as a whole)
    assert class_index(["Tench", "goldfish, Carassius auratus", "2"], labels, 4) == {
        "Tench": 0, "goldfish, Carassius auratus": 1, "2": 2}
    from timm.data import ImageNetInfo

    imagenet = ImageNetInfo().label_descriptions()
    assert class_index(["Egyptian cat", "espresso", "n03773504"], imagenet, 1000) == {
        "Egyptian cat": 285, "espresso": 967, "n03773504": 657}
    with pytest.raises(CertifyZooError, match=r"class folders \(kitten\) do not match"):
        class_index(["Egyptian cat", "kitten"], imagenet, 1000)  # only the folder that names no class
    # the other synonyms too ("tabby cat" had been refused), never in place of a first one: "crane" is the bird
    assert class_index(["tabby cat", "white shark"], imagenet, 1000) == {"tabby cat": 281, "white shark": 2}
    assert class_index(["crane"], ["crane, bird", "derrick, crane"], 2) == {"crane": 0}
    with pytest.raises(CertifyZooError, match="do not match the model's"):
        class_index(["feline"], ["cat, feline", "lion, feline"], 2)  # a synonym two classes share
    for folders, names in ((["cat"], ["cat, feline", "Cat"]), (["shark"], labels)):
        with pytest.raises(CertifyZooError, match="do not match the model's"):
            class_index(folders, names, len(names))


def test_remote_code_needs_flag(tmp_path, hub_cache, models):
    repo = tmp_path / "custom"
    repo.mkdir()
    config = json.loads((models["hf-vit"] / "config.json").read_text())
    config.update(architectures=["FancyForImageClassification"], model_type="fancy",
                  auto_map={"AutoModelForImageClassification": "modeling_fancy.FancyForImageClassification"})
    (repo / "config.json").write_text(json.dumps(config))
    (repo / "model.safetensors").write_bytes((models["hf-vit"] / "model.safetensors").read_bytes())
    put_in_hub_cache(hub_cache, "testorg/fancy", repo)
    assert_one_line_error(cli("convert", "testorg/fancy", "--data", "demo", "--out", tmp_path / "o", *FAST),
                          "--trust-remote-code")


def test_default_imagenet_unavailable_offline(models, tmp_path):
    assert_one_line_error(cli("convert", models["resnet"], "--out", tmp_path / "o", *FAST),
                          "ImageNet-1k", "HF_TOKEN", "--data DIR")


def test_transformers_model_without_the_extra_names_it(models, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # what an install without the extra looks like
    assert_one_line_error(cli("convert", models["hf-resnet"], "--data", "demo", "--out", tmp_path / "o", *FAST),
                          "pip install 'certify-zoo[transformers]'")


def test_image_processor_configs_become_resize_crop_and_pixel_space_normalisation():
    from certify_zoo.models_transformers import processor_config

    vit, steps = processor_config({"size": {"height": 224, "width": 224}, "resample": 2, "do_rescale": True,
                                   "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
                                   "image_std": [0.5] * 3})
    assert vit["input_size"] == (3, 224, 224) and steps == [("resize", (224, 224))] and vit["mean"] == (0.5,) * 3
    convnext, steps = processor_config({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3})
    assert steps == [("resize", 256), ("crop", (224, 224))] and convnext["interpolation"] == "bicubic"
    _, steps = processor_config({"size": {"shortest_edge": 384}, "crop_pct": 0.875})
    assert steps == [("resize", (384, 384))]  # transformers warps at 384 and above
    clip, steps = processor_config({"size": {"shortest_edge": 224}, "do_center_crop": True,
                                    "crop_size": {"height": 224, "width": 224}})
    assert clip["input_size"] == (3, 224, 224) and steps[0] == ("resize", 224)
    raw, _ = processor_config({"size": {"height": 8, "width": 8}, "do_rescale": False, "do_normalize": True,
                               "image_mean": [127.5] * 3, "image_std": [127.5] * 3})  # a model fed 0..255 pixels
    assert raw["mean"] == pytest.approx((0.5,) * 3) and raw["std"] == pytest.approx((0.5,) * 3)
    # MobileViT's processor has no do_normalize (its base class still lists a mean): [0,1] pixels go in as they are
    mobilevit, steps = processor_config({"size": {"shortest_edge": 288}, "do_center_crop": True,
                                         "crop_size": {"height": 256, "width": 256}, "image_mean": [0.5] * 3})
    assert mobilevit["mean"] == (0.0,) * 3 and mobilevit["std"] == pytest.approx((1.0,) * 3)
    assert steps == [("resize", 288), ("crop", (256, 256))]
    # EfficientNet's: to [-1, 1] (rescale_offset), then normalise, then divide by std once more (include_top)
    effnet, _ = processor_config({"size": {"height": 8, "width": 8}, "rescale_factor": 1 / 127.5,
                                  "rescale_offset": True, "do_normalize": True, "image_mean": [0.5] * 3,
                                  "image_std": [0.5] * 3, "include_top": True})
    assert effnet["mean"] == pytest.approx((0.75,) * 3) and effnet["std"] == pytest.approx((0.125,) * 3)
    levit, steps = processor_config({"size": {"shortest_edge": 224}, "do_center_crop": True,
                                     "crop_size": {"height": 224, "width": 224},
                                     "image_processor_type": "LevitImageProcessorPil"})
    assert steps == [("resize", 256), ("crop", (224, 224))]  # LeViT's own rule: the edge times 256/224


# processors whose resize, crop, normalisation or channel order is their own (the Hub's MobileViT, LeViT and
# EfficientNet settings, scaled to SIZE), in both of transformers' backends
OWN_WAY_PROCESSORS = {
    "MobileViTImageProcessor": dict(size={"shortest_edge": SIZE + 4}, crop_size={"height": SIZE, "width": SIZE}),
    "LevitImageProcessor": dict(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
    "EfficientNetImageProcessor": dict(size={"height": SIZE, "width": SIZE}, include_top=True),
    "BitImageProcessor": dict(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
}


@pytest.mark.parametrize("processor_class", sorted(OWN_WAY_PROCESSORS))
def test_a_transformers_model_sees_what_its_image_processor_hands_it(tmp_path, processor_class):
    """On real photos (landscape and portrait), the loaded classifier turns [0,1] pixels into the processor's own
    pixel_values, in each of transformers' backends (PIL, torchvision): MobileViT's channel swap to BGR without
    normalisation, LeViT's resize to 256/224 of the edge, EfficientNet's second division by std, and a centre crop
    whose odd pixel falls where transformers puts it (BiT here; torchvision's crop had shifted landscape photos by
    one pixel)."""
    import transformers
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    from certify_zoo.models_transformers import load_transformers_folder

    photos = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()),
              Image.fromarray(load_sample_images().images[0]), Image.fromarray(data.astronaut()[:, 100:300])]
    backends = [name for name in (processor_class + suffix for suffix in ("", "Pil", "Fast"))
                if hasattr(transformers, name)]  # 5.0: X (PIL) and XFast; later: X, XPil (and XFast, an alias)
    assert len(backends) >= 2
    for name in backends:
        processor = getattr(transformers, name)(**OWN_WAY_PROCESSORS[processor_class])
        classifier = load_transformers_folder(save_transformers(tmp_path / name, "hf-vit", processor))
        pixels = torch.stack([classifier.transform()(photo) for photo in photos])
        theirs = processor(images=photos, return_tensors="pt")["pixel_values"]
        # the torchvision backend resamples a little differently from PIL (2.6/255 at most, measured, on these
        # photos shrunk to 32 pixels); torchvision's crop, one pixel off on BiT's landscape photo, failed it
        assert (classifier.pixel_values(pixels) - theirs).abs().max() <= 4 / 255 / classifier.std.min(), name
        with torch.no_grad():  # and forward is the model on those values
            assert torch.allclose(classifier(pixels), classifier.net(pixel_values=theirs).logits, atol=1e-4,
                                  rtol=0.05), name


def test_the_load_check_sees_a_crop_one_pixel_off(monkeypatch):
    """The check at load compares on two test photos: with torchvision's CenterCrop in place of transformers' (its
    odd pixel on the other side), every processor that crops is refused at the usual sizes; with ours it passes."""
    import transformers
    from torchvision.transforms import CenterCrop as TorchvisionCenterCrop

    from certify_zoo import models_transformers
    from certify_zoo.models_transformers import PROCESSOR_TOLERANCE, probe_images, processor_gaps

    sizes = [(224, 224), (256, 224), (288, 256), (248, 224), (232, 224)]
    pil_backend = getattr(transformers, "BitImageProcessorPil", transformers.BitImageProcessor)  # 5.0: the latter
    processors = [pil_backend(size={"shortest_edge": edge}, crop_size={"height": crop, "width": crop})
                  for edge, crop in sizes]
    assert all(max(processor_gaps(p, probe_images())) < PROCESSOR_TOLERANCE / 10 for p in processors)
    monkeypatch.setattr(models_transformers, "CenterCrop", TorchvisionCenterCrop)
    assert all(max(processor_gaps(p, probe_images())) > PROCESSOR_TOLERANCE for p in processors)


@pytest.mark.parametrize(("processor_class", "settings", "says"), [
    ("PerceiverImageProcessor", dict(size={"height": SIZE, "width": SIZE}, crop_size={"height": SIZE + 8,
                                                                                      "width": SIZE + 8}),
     "it makes"),  # a crop relative to each image's shorter side, then a resize
    ("TextNetImageProcessor", dict(size={"shortest_edge": SIZE}), "pixels differ"),  # edges rounded up to 32s
    ("DonutImageProcessor", dict(size={"height": SIZE, "width": SIZE}), "pixels differ"),  # thumbnail, then pad
])
def test_an_image_processor_certify_zoo_cannot_reproduce_is_refused_in_one_line(tmp_path, processor_class, settings,
                                                                                says):
    import transformers

    folder = save_transformers(tmp_path / "model", "hf-vit", getattr(transformers, processor_class)(**settings))
    assert_one_line_error(cli("convert", folder, "--data", "demo", "--out", tmp_path / "o", *FAST),
                          "cannot reproduce its", processor_class, says)
    assert not (tmp_path / "o").exists()


def test_imagenet_hub_class_descriptions_map_to_standard_order():
    from certify_zoo.data_sources import imagenet_descriptions_index

    names = ["goldfish, Carassius auratus", "tench, Tinca tinca"]
    assert imagenet_descriptions_index(names, 1000) == {names[0]: 1, names[1]: 0}
    assert imagenet_descriptions_index(names, 10) is None and imagenet_descriptions_index(["cat"], 1000) is None


def test_hub_repo_missing_from_offline_cache(tmp_path, hub_cache):
    assert_one_line_error(cli("convert", "testorg/never-downloaded", "--data", "demo", "--out", tmp_path / "o"),
                          "HF_HUB_OFFLINE is set", "not in the Hugging Face cache")


def test_a_hub_repo_gets_the_recipe_of_its_architecture_not_of_its_name(models, hub_cache):
    """A repo's name is its owner's ("testorg/classifier-0"): the recipe comes from its config.json, as for a local
    folder (from the name alone every such repo got the generic recipe)."""
    from certify_zoo.recipes import FALLBACK, choose_recipe

    for index, family in enumerate(FAMILIES):
        put_in_hub_cache(hub_cache, f"testorg/classifier-{index}", models[family])
        local, hub = choose_recipe(str(models[family])), choose_recipe(f"testorg/classifier-{index}")
        assert (hub.name, hub.architecture, hub.model_type) == (local.name, local.architecture, local.model_type)
        assert hub.automatic and hub.name != FALLBACK, (family, hub)
    result = cli("convert", "testorg/classifier-0", "--data", "demo", "--out", "unused", "--recipe", "no-such-recipe")
    assert result.exit_code != 0 and "no-such-recipe" in error_line(result.output)  # refused before any download
