"""certified_accuracy.png: certified accuracy against L2 radius, drawn as the randomized-smoothing papers draw it.

A curve is the step function r -> share of ALL images classified correctly with a certified radius >= r. From the
per-image radii (``per_image.json``) the steps are exact and are used only when they reproduce the record's own
numbers; from the record's ``certified_accuracy`` points alone, each measured value is held back to the previous
radius (a lower bound between the points, certified accuracy only falls with r) and the curve stops at the last
measured radius. Only certificates are drawn: the one-forward-pass radii of a model certify-zoo did not convert
certify nothing, so they are left out and a note under the plot says so.
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .certificate_names import CERTIFICATE_LABELS, reach_note
from .certificates import Calibration
from .export import atomic_file
from .wording import counted

PER_IMAGE_NAME = "per_image.json"
PLOT_SOFTWARE = "certify-zoo"  # the PNG's Software field: a plot of ours, which --plot may replace
# The certificates drawn, one colour each, the same for the converted model (solid) and the model it is compared
# with (dashed). The Lipschitz bound is never above the deterministic radius: the tables carry it, the plot does not.
COLOURS = {"monte_carlo": "#1f77b4", "deterministic": "#d62728"}
# per_image.json columns behind each certificate: (prediction, radius candidates, first present wins)
PER_IMAGE_COLUMNS = {"monte_carlo": ("mc_prediction", ("mc_radius",)),
                     "deterministic": ("prediction", ("radius_calibrated", "radius"))}


@dataclass(frozen=True)
class Curve:
    """One line: 'pre' steps (the value at radii[i] holds on (radii[i-1], radii[i]]), accuracy in percent."""

    label: str
    certificate: str
    radii: tuple[float, ...]
    accuracy: tuple[float, ...]
    exact: bool  # from per-image radii: the curve continues to 0 past its last step
    secondary: bool  # the model compared against (e.g. the unconverted base): dashed
    colour: str | None = None  # default: the certificate's colour


def steps_from_radii(radii: Sequence[float], correct: Sequence[bool], total: int) -> tuple[list[float], list[float]]:
    """Exact certified-accuracy steps (%) from per-image radii: one corner per distinct certified radius."""
    certified = sorted(r for r, ok in zip(radii, correct) if ok and r >= 0)  # NaN and abstentions drop out
    corners = [0.0] + sorted({r for r in certified if r > 0})
    return corners, [100.0 * (len(certified) - bisect.bisect_left(certified, r)) / total for r in corners]


def steps_from_points(rows: Sequence[dict]) -> tuple[list[float], list[float]]:
    """Steps through the measured (radius, accuracy) points only: each value held back to the previous radius."""
    return [float(row["radius"]) for row in rows], [100.0 * row["accuracy"] for row in rows]


def accuracy_at(radii: Sequence[float], accuracy: Sequence[float], radius: float) -> float:
    """The step function's value at one radius (0 beyond the last corner)."""
    index = bisect.bisect_left(radii, radius)
    return accuracy[index] if index < len(accuracy) else 0.0


def read_per_image(folder: Path) -> dict[str, list] | None:
    """per_image.json's columns (stored as columns or as one object per image; other keys dropped); None if absent."""
    path = Path(folder) / PER_IMAGE_NAME
    if not path.is_file():
        return None
    data: Any = json.loads(path.read_text())
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        data = data["images"]
    if isinstance(data, list):
        keys = {key for row in data for key in row}
        return {key: [row.get(key) for row in data] for key in keys}
    return {key: value for key, value in data.items() if isinstance(value, list)} if isinstance(data, dict) else None


def exact_steps(certificate: str, record: dict, per_image: dict[str, list] | None):
    """The exact steps of one certificate, when the per-image radii reproduce the record's numbers; else None."""
    if not per_image or "label" not in per_image or len(per_image["label"]) != record.get("num_images"):
        return None
    prediction_key, radius_keys = PER_IMAGE_COLUMNS[certificate]
    radius_key = next((key for key in radius_keys if key in per_image), None)
    if prediction_key not in per_image or radius_key is None:
        return None
    correct = [p == y for p, y in zip(per_image[prediction_key], per_image["label"])]
    radii = [math.nan if r is None else float(r) for r in per_image[radius_key]]
    if certificate == "monte_carlo" and "checked" in per_image:  # Monte-Carlo ran on the check subsample only
        kept = [bool(c) for c in per_image["checked"]]
        correct = [ok for ok, keep in zip(correct, kept) if keep]
        radii = [r for r, keep in zip(radii, kept) if keep]
    if not correct:
        return None
    corners, accuracy = steps_from_radii(radii, correct, len(correct))
    rows = record["certificates"][certificate]["certified_accuracy"]
    matches = all(abs(accuracy_at(corners, accuracy, row["radius"]) - 100.0 * row["accuracy"]) < 1e-6 for row in rows)
    return (corners, accuracy) if matches else None  # a stale or differently computed file is not drawn


def legend_label(name: str, certificate: str, record: dict) -> str:
    """The curve's model and certificate, with what stands behind it."""
    block = record["certificates"][certificate]
    if certificate == "monte_carlo":
        behind = f"provable w.p. >= {1 - block['alpha']:g}" if "alpha" in block else "provable"
        if block.get("images", record.get("num_images")) != record.get("num_images"):
            behind += f", on {block['images']} of {counted(record['num_images'], 'image')}"
    else:
        audit = record.get("audit")
        calibration = Calibration.from_record(block.get("calibration"))
        checked = ((f", PGD broke {audit['counterexamples']}/{audit['attacked']}" if audit["attacked"]
                    else ", no radius > 0 to attack") if audit else ", not audited")
        behind = ("one forward pass" + (f", calibration {calibration.short()}" if calibration != Calibration() else "")
                  + checked)
    return f"{name}: {CERTIFICATE_LABELS[certificate]} ({behind})"


def record_curves(name: str, record: dict, per_image: dict[str, list] | None = None,
                  secondary: bool = False) -> tuple[list[Curve], list[str]]:
    """The curves of one certification record, and a note for every set of radii that is not a certificate."""
    curves, notes = [], []
    converted = record.get("converted_by_certify_zoo", True)
    for certificate in COLOURS:
        if certificate not in record.get("certificates", {}):
            continue
        if certificate == "deterministic" and not converted:
            audit = record.get("audit")
            broken = f"; PGD broke {audit['counterexamples']} of {audit['attacked']}" if audit else ""
            notes.append(f"{name}: not converted by certify-zoo, so its one-forward-pass radii are not "
                         f"certificates and are not drawn{broken}.")
            continue
        if certificate == "monte_carlo":  # its zeros past what n draws can certify count draws, not robustness
            said = reach_note(record["certificates"][certificate], record["sigma"], record["radii"])
            notes += [f"{name}: {said}."] if said else []
        steps = exact_steps(certificate, record, per_image)
        corners, accuracy = steps or steps_from_points(record["certificates"][certificate]["certified_accuracy"])
        label = legend_label(name, certificate, record) + ("" if steps else "; known at the dots only")
        curves.append(Curve(label, certificate, tuple(corners), tuple(accuracy), steps is not None, secondary))
    return curves, notes


def certified_accuracy_plot(curves: Sequence[Curve], path: Path, title: str = "", xlabel: str = "L2 radius",
                            notes: Sequence[str] = ()) -> Path:
    """Draw the curves into a PNG, written to a temporary file and renamed: a reader never sees half an image."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 4.6 + 0.2 * len(notes)), dpi=120)
    axes = figure.add_subplot()
    end = max([r for curve in curves for r in curve.radii] + [1e-3]) * 1.05
    for curve in curves:
        colour = curve.colour or COLOURS[curve.certificate]
        radii, accuracy = list(curve.radii), list(curve.accuracy)
        if curve.exact:  # past the largest certified radius nothing is certified
            radii, accuracy = radii + [end], accuracy + [0.0]
        axes.step(radii, accuracy, where="pre", color=colour,
                  linestyle="--" if curve.secondary else "-", alpha=0.65 if curve.secondary else 1.0,
                  linewidth=1.4, label=curve.label)
        if not curve.exact:  # the only places the value is known
            axes.plot(curve.radii, curve.accuracy, linestyle="none", marker="o", markersize=3.5,
                      color=colour, alpha=0.65 if curve.secondary else 1.0)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("certified accuracy (%)")
    axes.set_xlim(0, end)
    axes.set_ylim(-2, 102)  # room for curves that sit at 0% or 100%
    axes.grid(True, alpha=0.3)
    axes.set_title(title, fontsize=9)
    if curves:  # none where no radius is a certificate (models not converted, deterministic): the notes say why
        axes.legend(fontsize=7, loc="upper right", framealpha=0.9)  # curves fall with r: the corner stays free
    line = 0.04 / (1 + 0.05 * len(notes))  # one line of note text, in figure height
    for index, note in enumerate(notes):
        figure.text(0.01, 0.015 + line * (len(notes) - 1 - index), note, fontsize=7, color="#555555")
    figure.tight_layout(rect=(0, 0.01 + line * len(notes), 1, 1))
    return save_png(figure, Path(path))


def save_png(figure, path: Path) -> Path:
    with atomic_file(path, suffix=".png") as temp:
        figure.savefig(temp, format="png", metadata={"Software": PLOT_SOFTWARE})
    return path


def is_certify_zoo_plot(path: Path) -> bool:
    """Whether ``path`` is a PNG certify-zoo drew (its Software field says so): one a rerun may replace."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == PLOT_SOFTWARE
    except (OSError, UnidentifiedImageError):
        return False


def records_plot(models: Sequence[tuple[str, dict, Path | None, bool]], path: Path) -> Path:
    """certified_accuracy.png of (name, certification record, its folder or None, compared-against) models."""
    curves, notes = [], []
    for name, record, folder, secondary in models:
        more, said = record_curves(name, record, read_per_image(folder) if folder else None, secondary)
        curves += more
        notes += said
    first = models[0][1]
    title = f"sigma {first.get('sigma')}, {counted(first.get('num_images'), 'image')}; abstentions count as wrong"
    return certified_accuracy_plot(curves, path, title, f"L2 radius ({first.get('space', '[0,1] pixels')})", notes)
