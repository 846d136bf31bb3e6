"""Captions and plot notes: what a row's zeros mean when they come from the number of draws."""
from __future__ import annotations

from certify_zoo.report import reach_notes


def record(sigma: float, n: int | None) -> dict:
    rows = [{"radius": r, "accuracy": 0.5} for r in (0.0, 0.5, 1.0)]
    block = {"certified_accuracy": rows, "acr": 0.4, **({"n": n, "alpha": 0.001} if n else {})}
    return {"sigma": sigma, "radii": [0.0, 0.5, 1.0], "num_images": 10, "clean_accuracy": 0.9,
            "certificates": {"monte_carlo": block}}


def test_the_caption_says_where_the_monte_carlo_draws_run_out_once_or_per_model():
    # sigma 0.25, n 1000: no radius above 0.616; sigma 1: 2.46, beyond every radius asked for
    note = "Monte-Carlo n=1000 certifies no radius above 0.616 (all n draws one class)"
    assert reach_notes([record(0.25, 1000)], ["a"]) == [note]
    assert reach_notes([record(0.25, 1000), record(0.25, 1000)], ["a", "b"]) == [note]
    assert reach_notes([record(0.25, 1000), record(1.0, 1000)], ["a", "b"]) == [f"a: {note}"]
    assert reach_notes([record(1.0, 1000)], ["a"]) == []
    assert reach_notes([record(0.25, None)], ["a"]) == []  # a record without n says nothing


def test_the_plot_notes_where_the_monte_carlo_draws_run_out():
    from certify_zoo.plot import record_curves

    _, notes = record_curves("a", record(0.25, 1000))
    assert notes == ["a: Monte-Carlo n=1000 certifies no radius above 0.616 (all n draws one class)."]
    assert record_curves("a", record(1.0, 1000))[1] == []


def test_the_caption_gives_each_model_its_sigma_when_a_comparison_mixes_them():
    """compare certifies each model at its own sigma; the caption gave the first model's for all of them."""
    from rich.console import Console

    from certify_zoo.report import certification_table

    def caption(*records) -> str:
        console = Console(width=400, record=True)
        console.print(certification_table(list(records), ["a", "b"][:len(records)]))
        return " ".join(console.export_text().split())

    assert "sigma: a 0.25, b 1.0; 10 images;" in caption(record(0.25, 1000), record(1.0, 1000))
    assert "sigma 0.25; 10 images;" in caption(record(0.25, 1000), record(0.25, 1000))
