"""Parsing of human sizes ("512MB", "1GiB") for memory limits."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str | None) -> int | None:
    """Bytes from an int or a string such as "512MB"; ValueError names what is wrong."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory size {value!r} is not a size: use bytes or e.g. '512MB'")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(f"memory size {value!r} must be positive")
        return int(value)
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"memory size {value!r} is not a size: use bytes or e.g. '512MB', '2GiB'")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {value!r} must be positive")
    return size


def format_size(size: int | None, decimal: bool = False) -> str:
    """"512 MiB" for display; "512 MB" (powers of 1000) when `decimal`; a negative
    size (a shrinking RSS) keeps its sign: "-1.5 MiB"."""
    if size is None:
        return "-"
    if size < 0:
        return "-" + format_size(-size, decimal)
    step, units = (1000, _DECIMAL) if decimal else (1024, _BINARY)
    value = float(size)
    for unit in units:
        if value < step or unit == units[-1]:
            break
        value /= step
    return f"{value:.0f} {unit}" if value >= 10 or unit == "B" else f"{value:.1f} {unit}"


_BINARY = ("B", "KiB", "MiB", "GiB")
_DECIMAL = ("B", "kB", "MB", "GB")


def is_decimal(size: int) -> bool:
    """Whether a limit was most likely written in decimal units ("200MB" is 200,000,000
    bytes, a multiple of 1000 but not of 1024); ambiguous sizes read as binary."""
    return size >= 1000 and size % 1000 == 0 and size % 1024 != 0


def format_limit(size: int) -> str:
    """A limit in the kind of unit it was written in: "200 MB", "512 MiB"."""
    return format_size(size, is_decimal(size))
