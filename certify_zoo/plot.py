"""certified_accuracy.png: certified accuracy against L2 radius, one line per certificate, from the records only."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from .card import CERTIFICATE_LABELS

# One colour per certificate, the same for the converted model (solid) and its base (dashed).
COLOURS = {"monte_carlo": "#1f77b4", "deterministic": "#d62728", "deterministic_lipschitz": "#ff7f0e"}


def certified_accuracy_plot(curves: Sequence[tuple[str, dict, bool]], path: Path, title: str = "") -> Path:
    """Draw (name, certification record, dashed) curves into a PNG; points only at the radii actually measured.

    Written to a temporary file and renamed over ``path``, so a reader never sees a half-written image.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 4.2), dpi=120)
    axes = figure.add_subplot()
    max_radius = 0.0
    for name, record, dashed in curves:
        for key, label in CERTIFICATE_LABELS.items():
            block = record.get("certificates", {}).get(key)
            if block is None:
                continue
            radii = [row["radius"] for row in block["certified_accuracy"]]
            accuracy = [100 * row["accuracy"] for row in block["certified_accuracy"]]
            max_radius = max(max_radius, *radii)
            axes.plot(radii, accuracy, linestyle="--" if dashed else "-", marker="o", markersize=4,
                      color=COLOURS[key], alpha=0.6 if dashed else 1.0, label=f"{name}: {label}")
    first = curves[0][1]
    axes.set_xlabel(f"L2 radius ({first.get('space', '[0,1] pixels')})")
    axes.set_ylabel("certified accuracy (%)")
    axes.set_xlim(0, max(max_radius, 1e-3) * 1.03)
    axes.set_ylim(-2, 102)  # room for curves that sit at 0% or 100%
    axes.grid(True, alpha=0.3)
    axes.set_title(title or f"sigma {first.get('sigma')}, {first.get('num_images')} images; abstentions count as wrong",
                   fontsize=9)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # off the curves
    figure.tight_layout()
    path = Path(path)
    descriptor, temp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(descriptor)
    try:
        figure.savefig(temp, format="png")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
