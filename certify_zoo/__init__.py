"""certify-zoo: turn a pretrained image classifier into a certifiably robust one (Adversarial Boot Camp).

    import certify_zoo
    model = certify_zoo.load("user/name-or-output-folder")
    result = certify_zoo.certify(model, images)  # class, top probabilities, certified L2 radius per image
    proof = certify_zoo.certify_monte_carlo(model, images)  # Cohen et al.'s CERTIFY of the smoothed model

    certify_zoo.convert("timm/resnet50.a1_in1k", "resnet50-certified", data="/data/train")  # `certify-zoo convert`
    record = certify_zoo.evaluate("resnet50-certified", data="/data/val", max_images=500)   # `certify-zoo evaluate`
    records = certify_zoo.compare(["a-certified", "b-certified"], data="/data/val")         # `certify-zoo compare`
    certify_zoo.push("resnet50-certified", "you/resnet50-certified")                         # `certify-zoo push`
"""

__version__ = "0.1.0"
__all__ = ["load", "certify", "certify_monte_carlo", "convert", "evaluate", "compare", "push", "__version__"]


def __getattr__(name):
    # Lazy, so that `import certify_zoo` (and the CLI) does not import torch until needed.
    if name in ("load", "certify", "certify_monte_carlo", "convert", "evaluate", "compare", "push"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'certify_zoo' has no attribute {name!r}")
