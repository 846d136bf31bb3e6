"""Counts in words for the lines people read: "1 step", "2 passes", never "step(s)"."""
from __future__ import annotations

from typing import Sequence


def counted(count, noun: str) -> str:
    """``count`` and ``noun`` in its number: "1 pass", "2 passes". A count that is not a number (a record's "-" or
    "?", "1000+") reads as plural, and 1.0 as one."""
    try:
        one = float(count) == 1
    except (TypeError, ValueError):
        one = False
    return f"{count} {noun if one else noun + ('es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's')}"


def numbered(names) -> list[str]:
    """``names`` with each repeat told apart: ["a", "a", "b"] -> ["a", "a #2", "b"] (a table's rows, a JSON's keys)."""
    seen: dict[str, int] = {}
    told_apart = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        told_apart.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return told_apart


def skipped_unreadable(names: Sequence[str], reads: int, more: bool = False) -> str:
    """The line after a run that skipped unreadable images: how many files (``more``: beyond the names kept), which,
    and how many reads when passes over the data read them again."""
    if not names:  # a conversion resumed from a checkpoint that kept only the count
        return f"skipped {counted(reads, 'unreadable image')} (--strict stops at the first)"
    files = f"{len(names)}{'+' if more else ''}"
    reread = f", {reads} reads in all (each pass over the data reads them again)" if reads > len(names) else ""
    listed = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return f"skipped {counted(files, 'unreadable image')}{reread}: {listed} (--strict stops at the first)"
