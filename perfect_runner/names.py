"""What a flow or task name (and any id the backend sends) may be.

One definition for both ends: the SDK refuses such a name when a flow or task
is decorated, and the worker refuses an execution request carrying one, so the
worker never registers a flow it would later refuse to run.
"""

from __future__ import annotations

from .textsafe import CONTROLS

MAX_NAME_LEN = 256


def name_problem(value: str) -> str | None:
    """Why `value` cannot be a name or id, or None when it can."""
    if len(value) > MAX_NAME_LEN:
        return f"is {len(value)} characters long (at most {MAX_NAME_LEN})"
    if CONTROLS.search(value):
        return "contains control characters or escape sequences"
    return None
