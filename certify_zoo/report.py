"""Rich tables of certification records: every number is labelled by the certificate that produced it."""
from __future__ import annotations

import os
from typing import Sequence

from rich.table import Table

from .certificate_names import reach_note
from .certificates import Calibration
from .wording import counted

CERTIFICATE_LABELS = {
    "deterministic": "det.",
    "deterministic_raw": "det. raw",
    "deterministic_lipschitz": "det. Lipschitz",
    "monte_carlo": "Monte-Carlo",
}


def audited_clean(record: dict) -> bool:
    """Whether this run's PGD audit of the reported deterministic radii found no counterexample."""
    audit = record.get("audit")
    return bool(audit) and audit.get("counterexamples", 1) == 0 and audit.get("attacked", 0) > 0


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _per_model(key: str, label: str, records: Sequence[dict], names: Sequence[str]) -> str:
    """'sigma 0.5' where every record has the same value, else each model's ('sigma: a 0.25, b 0.5'): a comparison
    certifies each model at its own sigma."""
    values = [record[key] for record in records]
    if all(value == values[0] for value in values):
        return f"{label} {values[0]}" if key == "sigma" else counted(values[0], label)
    return f"{label if key == 'sigma' else label + 's'}: " + ", ".join(f"{name} {value}"
                                                                     for name, value in zip(names, values))


def certification_table(records: Sequence[dict], names: Sequence[str], title: str = "Certified accuracy (%)") -> Table:
    """One row per (model, certificate): clean accuracy, certified accuracy at each radius, ACR, and what stands
    behind the row. Compact enough for an 80-column terminal; the caption says what the short labels mean."""
    radii = records[0]["radii"]
    unconverted = any(not record.get("converted_by_certify_zoo", True) for record in records)
    caption = (f"L2 radius in [0,1] pixels; {_per_model('sigma', 'sigma', records, names)}; "
               f"{_per_model('num_images', 'image', records, names)}; "
               "abstentions count as wrong. det. = deterministic (Gaussian bound, one forward pass), a proof only "
               "for the exact Gaussian average, x kappa (at T) = calibrated at conversion; claim = not backed by a "
               "clean PGD audit in this run; Monte-Carlo = Cohen et al. CERTIFY" +
               ("; * = model not converted by certify-zoo: its deterministic radii are not certificates"
                if unconverted else "") + "".join(f"; {note}" for note in reach_notes(records, names)))
    table = Table(title=title, caption=caption)
    for heading in ("model", "certificate", "clean", *[f"r={r:g}" for r in radii], "ACR", "checked by"):
        left = heading in ("model", "certificate", "checked by")
        table.add_column(heading, justify="left" if left else "right", no_wrap=heading != "checked by")
    for record, name in zip(records, names):
        for key, label in CERTIFICATE_LABELS.items():
            block = record["certificates"].get(key)
            if block is None:
                continue
            accuracies = {round(row["radius"], 6): row["accuracy"] for row in block["certified_accuracy"]}
            extra = f" n={block['n']}" if "n" in block else ""
            if "images" in block and block["images"] != record["num_images"]:
                extra += f" ({block['images']} img)"
            calibration = Calibration.from_record(block.get("calibration"))
            if key.startswith("deterministic") and not record.get("converted_by_certify_zoo", True):
                extra += "*"
            elif calibration.withdrawn:  # every radius 0: a claim of nothing
                extra += f" {calibration.short()}"
            elif key.startswith("deterministic") and (key != "deterministic" or not audited_clean(record)):
                extra += " claim"  # not backed by a clean audit of this run
            # a calibration the conversion stored (kappa <= 0.8), not evaluate's record of none (kappa 1)
            if key == "deterministic" and calibration != Calibration() and not calibration.withdrawn:
                extra += f" {calibration.short()}"
            table.add_row(name, label + extra, percent(record["clean_accuracy"]),
                          *[percent(accuracies.get(round(r, 6))) for r in radii], f"{block['acr']:.3f}",
                          checked_by(record, key))
    return table


def reach_notes(records: Sequence[dict], names: Sequence[str]) -> list[str]:
    """Where a Monte-Carlo row is asked for radii beyond what its n draws can certify: one note for all records,
    or one per model when they differ (compare of several sigmas or n)."""
    notes = {}
    for record, name in zip(records, names):
        block = record["certificates"].get("monte_carlo")
        note = None if block is None else reach_note(block, record["sigma"], record["radii"])
        if note is not None:
            notes[name] = note
    if len(notes) == len(records) and len(set(notes.values())) == 1:
        return list(set(notes.values()))
    return [f"{name}: {note}" for name, note in notes.items()]


def checked_by(record: dict, key: str) -> str:
    """What stands behind a row: the audit for deterministic radii, the statistics for Monte-Carlo."""
    if key == "monte_carlo":
        alpha = record["certificates"]["monte_carlo"].get("alpha")
        return f"p >= {1 - alpha:g}" if alpha is not None else "provable"
    audit = record.get("audit")
    if not audit:
        return "not audited"
    if key == "deterministic":
        return f"PGD {audit['counterexamples']}/{audit['attacked']} broken" if audit["attacked"] else "no radius > 0"
    if key == "deterministic_raw":
        return "uncalibrated"
    return "<= det."


def audit_lines(record: dict) -> list[str]:
    """The sentences printed under the table: the audit and how far v is from its own Gaussian average."""
    lines = []
    if record.get("audit"):
        lines.append(f"Audit of the deterministic radii: {record['audit']['statement']}.")
    elif record.get("converted_by_certify_zoo", True):
        lines.append("Deterministic radii not audited in this run: they are claims (run without --audit none).")
    agreement = record.get("agreement")
    if agreement:
        gap = agreement["gap_to_gaussian_average"]
        pairs = ", ".join(f"r={row['radius']:g}: {percent(row['deterministic'])} vs {percent(row['monte_carlo'])}"
                          for row in agreement["certified_accuracy"])
        lines.append(f"Deterministic vs Monte-Carlo certified accuracy (%): {pairs}.")
        lines.append(f"|softmax v(x) - E softmax v(x+eta)| (max over classes, {gap['estimated_from']}): "
                     f"median {gap['median_max_abs']:.3f}, mean {gap['mean_max_abs']:.3f}.")
    return lines


def prediction_table(result) -> Table:
    """One row per image: predicted class, probability, radius, and the other top-k classes."""
    if result.monte_carlo:
        caption = (f"class and radius (L2 in [0,1] pixels) of the smoothed classifier at sigma {result.sigma}: "
                   f"{result.monte_carlo}; prob. = lower confidence bound on its share of the noisy votes; top-k: "
                   "mean softmax over the noisy copies")
    elif result.converted:
        caption = (f"radius: L2 in [0,1] pixels, deterministic Gaussian bound at sigma {result.sigma}, "
                   f"{result.calibration}; " + (f"audit: {result.audit}" if result.audit else "not audited"))
    else:
        caption = "radius: NOT a certificate (model not converted by certify-zoo)"
    common = common_folder([row["file"] for row in result.rows])
    table = Table(title="Predictions", caption=caption)
    table.add_column(f"image (in {common})" if common else "image", overflow="fold")
    for heading in ("class", "prob.", "radius", "top-k"):
        table.add_column(heading, justify="right" if heading in ("prob.", "radius") else "left",
                         overflow="fold", no_wrap=heading in ("prob.", "radius"))
    for row in result.rows:
        if "error" in row:
            table.add_row(os.path.relpath(row["file"], common or None), f"[red]{row['error']}[/]", "-", "-", "")
            continue
        abstained = row["class_index"] is None  # the smoothed classifier abstained: no class, no certificate
        radius = "-" if row["radius"] is None or abstained else f"{row['radius']:.3f}"
        # deterministic: the others after the predicted class; Monte-Carlo: the mean softmax over the noise, whole
        shown = row["top_k"] if result.monte_carlo else row["top_k"][1:]
        others = ", ".join(f"{item['class']} {100 * item['probability']:.1f}%" for item in shown)
        table.add_row(os.path.relpath(row["file"], common or None), row["class"],
                      "-" if abstained else f"{100 * row['probability']:.1f}%", radius, others)
    return table


def common_folder(files: Sequence[str]) -> str:
    """The deepest folder holding all files, so that rows show short names."""
    if not files:
        return ""
    return os.path.commonpath([os.path.dirname(os.path.abspath(file)) for file in files])
