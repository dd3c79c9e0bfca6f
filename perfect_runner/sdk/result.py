"""The data classes user code returns and the states a task moves through."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class TaskState(StrEnum):
    """Execution states for tasks and runs, spelled as the backend spells them."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    RETRYING = "RETRYING"


@dataclass
class TaskResult:
    """What a task returns: whether it passed, a note, and rows for the UI's table."""

    passed: bool
    note: str = ""
    table: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
