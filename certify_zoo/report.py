"""Rich tables of certification records: every number is labelled by the certificate that produced it."""
from __future__ import annotations

from typing import Sequence

from rich.table import Table

CERTIFICATE_LABELS = {
    "deterministic": "deterministic",
    "deterministic_lipschitz": "det. Lipschitz",
    "monte_carlo": "Monte-Carlo",
}


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def certification_table(records: Sequence[dict], names: Sequence[str], title: str = "Certified accuracy (%)") -> Table:
    """One row per (model, certificate): clean accuracy, certified accuracy at each radius, ACR."""
    radii = records[0]["radii"]
    table = Table(title=title, caption=f"L2 radius in [0,1] pixel space; sigma {records[0]['sigma']}; "
                                       f"{records[0]['num_images']} images; abstentions count as wrong")
    for heading in ("model", "certificate", "clean", *[f"r={r:g}" for r in radii], "ACR"):
        table.add_column(heading, justify="left" if heading in ("model", "certificate") else "right")
    for record, name in zip(records, names):
        for key, label in CERTIFICATE_LABELS.items():
            block = record["certificates"].get(key)
            if block is None:
                continue
            accuracies = {round(row["radius"], 6): row["accuracy"] for row in block["certified_accuracy"]}
            extra = f" n={block['n']}" if "n" in block else ""
            table.add_row(name, label + extra, percent(record["clean_accuracy"]),
                          *[percent(accuracies.get(round(r, 6))) for r in radii], f"{block['acr']:.3f}")
    return table
