"""How durations, sizes, times and table cells are written, in the reports and on
the terminal alike, so both show a run the same way."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from ..jsonsafe import json_safe
from ..sdk.units import format_size
from .html_kit import is_number as _is_number


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The union of the rows' keys, in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(str(key) for key in row))
    return list(columns)


def cell_text(value: Any) -> str:
    """A table cell as text: scalars as they are, nested values as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(json_safe(value), separators=(",", ":"), ensure_ascii=False)
    return str(value)


def format_duration(duration_ms: Any) -> str:
    """'850 ms', '12.3 s', '4 min 05 s', '2 h 03 min'; '-' when unknown."""
    if not _is_number(duration_ms) or not math.isfinite(duration_ms):
        return "-"
    if duration_ms < 1000:
        return f"{duration_ms:.0f} ms"
    seconds = duration_ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_bytes(size: Any) -> str:
    """A size read from a record (any JSON value) as the notes show sizes: '512 B',
    '1.5 KiB', '231 MiB'; '-' when unknown."""
    if not _is_number(size) or not math.isfinite(size) or size < 0:
        return "-"
    return format_size(int(size))


def format_time(epoch: Any) -> str:
    """Local ISO-8601 time with seconds, or '-' when unknown."""
    if not _is_number(epoch) or not math.isfinite(epoch):
        return "-"
    try:
        return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return str(epoch)
