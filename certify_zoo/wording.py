"""Counts in words for the lines people read: "1 step", "2 passes", never "step(s)"."""
from __future__ import annotations


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
