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
