"""Which transformers image processors certify-zoo reproduces: every processor class of every transformers
image-classification model type, in both of transformers' backends (torchvision and PIL), with its default settings.

certify-zoo feeds a transformers model its own resize, crop and normalisation (noise and radii live in those [0,1]
pixels), read from the processor's config; at load it compares them with the processor on two test photos and
refuses the model, in one line, when the mean gap exceeds its tolerance. This runs the same comparison on those two
test photos and on four real ones (scikit-image's astronaut, coffee and chelsea; scikit-learn's china), and records
the largest mean gap in [0,1] pixels per processor, or how certify-zoo refuses it.

    PYTHONPATH=. python benchmarks/processors.py --record docs/records/processors.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch

from certify_zoo.errors import CertifyZooError
from certify_zoo.models_transformers import PROCESSOR_TOLERANCE, probe_images, processor_gaps


def real_photos() -> list:
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [data.astronaut(), data.coffee(), data.chelsea(), load_sample_images().images[0]]
    return [Image.fromarray(np.asarray(array)) for array in arrays]


def outcome(processor, probes: list, photos: list) -> str:
    try:
        gaps = processor_gaps(processor, [*probes, *photos])
    except (CertifyZooError, ValueError) as exc:
        return f"refused: {str(exc).splitlines()[0][:160]}"
    probe_gap = max(gaps[:len(probes)])
    if probe_gap > PROCESSOR_TOLERANCE:
        return f"refused: mean gap {probe_gap:.3f} on a test photo (photos: {max(gaps[len(probes):]):.3f})"
    return f"reproduced: mean gap {max(gaps):.4f} at most"


def main() -> None:
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # transformers' deprecation notes about processor arguments
    probes, photos = probe_images(), real_photos()
    types_by_class: dict[str, list[str]] = {}
    for model_type in sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES):
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or ()
        # {backend: class} since transformers 5.x; (slow class, fast class) in 5.0
        for name in filter(None, names.values() if isinstance(names, dict) else names):
            types_by_class.setdefault(name, []).append(model_type)
    rows = []
    for name in sorted(types_by_class):
        try:
            processor = getattr(transformers, name)()
        except Exception as exc:  # needs arguments no default gives (TimmWrapper's: a timm config)
            result = f"not built from defaults: {type(exc).__name__}"
        else:
            result = outcome(processor, probes, photos)
        rows.append([name, ", ".join(types_by_class[name]), result])
        print(*rows[-1], sep=" | ", flush=True)
    counts = {kind.replace(" ", "_"): sum(row[2].startswith(kind) for row in rows)
              for kind in ("reproduced", "refused", "not built")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"title": "transformers image processors: reproduced or refused", "provenance": {
        "date": datetime.date.today().isoformat(),
        "command": "PYTHONPATH=. python benchmarks/processors.py --record docs/records/processors.json",
        "code": f"commit {commit}", "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "setup": f"transformers {transformers.__version__}, torch {torch.__version__}; default settings; two test "
                 f"photos and four real ones; tolerance {PROCESSOR_TOLERANCE} mean gap on the test photos"},
        "tolerance": PROCESSOR_TOLERANCE, "counts": counts,
        "processors": {"columns": ["image processor", "model types", "result"], "rows": rows}}
    args.record.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
