"""Turn arbitrary values into what JSON (and the backend) can hold.

Used on the child side to summarise a task's result for the control process,
and on the transport side before anything goes on the wire: NaN and Infinity
are not JSON, and objects JSON does not know become their `str()`.
"""

from __future__ import annotations

import math
from typing import Any

_MAX_DEPTH = 20


def json_safe(value: Any, _depth: int = 0) -> Any:
    """A copy of `value` made only of dict/list/str/int/float/bool/None."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if _depth >= _MAX_DEPTH:
        return _text(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v, _depth + 1) for v in value]
    return _text(value)


def _text(value: Any) -> str:
    # str() of a user object is user code; it may raise.
    try:
        return str(value)
    except Exception as exc:  # noqa: BLE001 - any failure gives a placeholder
        return f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
