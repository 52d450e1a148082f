"""Quantities with units in policy values: `25%`, `4.5M`, `2G`, `512K`, `12ms`, and their dimensions."""

from __future__ import annotations

from typing import Literal

Dimension = Literal["number", "ratio", "count", "duration", "bytes"]

# unit suffix -> (dimension, scale to the base quantity: a fraction, a count, seconds)
UNITS: dict[str, tuple[Dimension, float]] = {
    "": ("number", 1.0),
    "%": ("ratio", 0.01),
    "K": ("count", 1e3),
    "M": ("count", 1e6),
    "G": ("count", 1e9),
    "us": ("duration", 1e-6),
    "ms": ("duration", 1e-3),
    "s": ("duration", 1.0),
    # byte sizes (decimal, as storage vendors count): `bytes <= 2 MB`
    "B": ("bytes", 1.0),
    "KB": ("bytes", 1e3),
    "MB": ("bytes", 1e6),
    "GB": ("bytes", 1e9),
}

DIMENSION_WORDS: dict[str, str] = {
    "number": "a plain number",
    "ratio": "a percentage",
    "count": "a count",
    "duration": "a duration",
    "bytes": "a byte size",
}


def dimension(unit: str) -> Dimension:
    return UNITS[unit][0]


def magnitude(number: int | float, unit: str) -> int | float:
    """The value in base units: 25% -> 0.25, 4.5M -> 4500000, 12ms -> 0.012 (seconds).

    Counts that come out whole are ints, so `4.5M` can fill an int option exactly.
    """
    dim, scale = UNITS[unit]
    if dim in ("count", "bytes"):
        v = round(number * scale, 6)
        return int(v) if float(v).is_integer() else v
    if dim == "number":
        return number
    return number * scale


def format_number(n: int | float) -> str:
    """Shortest text that parses back to the same number (ints stay ints, floats keep a '.' or 'e')."""
    if isinstance(n, bool):
        return str(int(n))
    if isinstance(n, int):
        return str(n)
    return repr(float(n))
