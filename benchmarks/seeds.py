"""Statistics over seeds, shared by the studies and the docs renderer: a quality claim is a mean over seeds with its
95% t interval, never one run."""
from __future__ import annotations

import statistics


def t_half_width(values: list[float]) -> float:
    """Half-width of the 95% t interval of the mean of ``values`` (nan for fewer than two)."""
    if len(values) < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5)


def t_interval(values: list[float]) -> list[float]:
    """95% t interval of the mean over seeds; one value is its own interval."""
    if len(values) < 2:
        return [values[0], values[0]] if values else [float("nan")] * 2
    mean, half = statistics.fmean(values), t_half_width(values)
    return [mean - half, mean + half]
