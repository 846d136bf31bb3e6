"""Progress of a long loop (convert's steps, evaluate's batches) that reaches whoever is watching.

On a terminal: rich's live bar. Anywhere else (a log file under SLURM, nohup, CI) a live bar renders nothing for
hours, so a plain line is printed every N steps instead, as timm's ``--log-interval`` does::

    convert step 40/800 (5%) | 212.4 img/s | loss 0.0312 | fidelity 0.0208 | penalty 0.1043 | ... | ETA 0:12:31
"""
from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Mapping, Sequence

LINES_PER_RUN = 20  # about one line per 5% of the run by default: at least one per 10%
# and by default a line at least this often, whatever the count: a CPU step of a real ImageNet model takes ~12 s, so
# 5% of an 840-step conversion was 8 minutes of silence in its log before the first line, speed and ETA
QUIET_SECONDS = 60.0


def log_console():
    """Where logs and progress go: stderr, lines unwrapped (a log file keeps each line whole), and no emoji codes: a
    path or a split such as "data:x:" was printed as "data❌"."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, emoji=False)


def _now() -> float:
    return time.perf_counter()


def default_interval(total: int | None) -> int:
    """Steps between two log lines: about 5% of the run (every step for runs of 20 steps or fewer)."""
    return max(1, (total or 0) // LINES_PER_RUN) if total else 10


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(_dt.timedelta(seconds=round(seconds)))


def progress_line(description: str, unit: str, completed: int, total: int | None, images_per_second: float,
                  values: Mapping[str, str], eta_seconds: float | None) -> str:
    """One self-contained log line: where the run stands, how fast it goes, its current numbers, its ETA."""
    where = f"{completed}/{total} ({completed / total:.0%})" if total else f"{completed}"
    parts = [f"{description} {unit} {where}", f"{images_per_second:.1f} img/s",
             *(f"{label(name)} {value}" for name, value in values.items()), f"ETA {format_eta(eta_seconds)}"]
    return " | ".join(parts)


def label(name: str) -> str:
    """How a field is shown: its name with spaces for underscores ("batch_agreement" -> "batch agreement")."""
    return name.replace("_", " ")


def _formatted(value, spec: str) -> str:
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


class RunProgress:
    """``with RunProgress(...) as progress: ... progress.update(step, images, loss=...)``.

    ``fields`` names the numbers each update carries and their format (``("loss", ".4f")``); ``completed`` and
    ``images`` are where a resumed run starts, so that speed and ETA count only this process's own work.
    A log file gets a line every ``interval`` steps; without one, every ~5% of the run and at least every
    QUIET_SECONDS.
    Without a console (another process than the main one, or a library call) nothing is shown.
    """

    def __init__(self, description: str, total: int | None, console=None, *, unit: str = "step",
                 fields: Sequence[tuple[str, str]] = (), interval: int | None = None, completed: int = 0,
                 images: int = 0):
        self.description, self.total, self.console, self.unit = description, total, console, unit
        self.fields = dict(fields)
        self.interval = interval if interval else default_interval(total)
        self.quiet_seconds = None if interval else QUIET_SECONDS  # an interval asked for is kept to the letter
        self.start_completed, self.start_images, self.last_logged = completed, images, completed
        self.started = self.last_logged_at = _now()
        self.live = console is not None and console.is_terminal
        self._bar = self._task = None
        if self.live:
            self._bar = _rich_bar(description, self.fields, console)
            self._task = self._bar.add_task(description, total=total or None, completed=completed, ips=0.0,
                                            **{name: float("nan") for name in self.fields})

    def __enter__(self) -> "RunProgress":
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, completed: int, images: int, **values) -> None:
        """Where the run is now: steps (or batches) completed, images processed so far, the current numbers."""
        if self.console is None:
            return
        now = _now()
        elapsed = max(now - self.started, 1e-9)
        images_per_second = (images - self.start_images) / elapsed
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, ips=images_per_second, **values)
            return
        finished = self.total is not None and completed >= self.total
        quiet_too_long = self.quiet_seconds is not None and now - self.last_logged_at >= self.quiet_seconds
        if completed <= self.last_logged or not (completed % self.interval == 0 or finished or quiet_too_long):
            return
        self.last_logged, self.last_logged_at = completed, now
        done = completed - self.start_completed
        eta = (self.total - completed) * elapsed / done if self.total and done > 0 else None
        shown = {name: _formatted(values[name], spec) for name, spec in self.fields.items() if name in values}
        self.console.print(progress_line(self.description, self.unit, completed, self.total, images_per_second,
                                         shown, eta), markup=False, highlight=False, soft_wrap=True)


def _rich_bar(description: str, fields: Mapping[str, str], console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    numbers = "  ".join(f"{label(name)} {{task.fields[{name}]:{spec}}}" for name, spec in fields.items())
    return Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(f"{numbers}  {{task.fields[ips]:.0f}} img/s"), TimeRemainingColumn(),
                    console=console, transient=False)
