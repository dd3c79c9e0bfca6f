"""Turn arbitrary values into what strict JSON (and the backend) can hold.

Used on the child side to summarise a task's result for the control process,
and by the transport before anything goes on the wire: NaN and Infinity are
not JSON, and objects JSON does not know become their `str()`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_MAX_DEPTH = 64


def json_safe(value: Any, _depth: int = 0) -> Any:
    """A copy of `value` that `json.dumps(..., allow_nan=False)` always accepts.

    NaN and infinities become the strings "NaN", "Infinity", "-Infinity" (a
    table cell keeps its meaning); mappings get string keys; sequences and sets
    become lists; bytes are decoded; anything else becomes `str(value)`.
    Nesting deeper than 64 levels (or a cycle) is cut off as a string.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _non_finite(value)
    if _depth >= _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, Mapping):
        return {_key(k): json_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v, _depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    try:
        return str(value)
    except Exception:  # a broken __str__ must not stop a state update
        return f"<unprintable {type(value).__name__}>"


def _non_finite(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _key(key: Any) -> str:
    return key if isinstance(key, str) else str(json_safe(key))
