"""What the executor knows about a run and its tasks, as plain data.

These records are built in the control process from JSON only (never from
user objects), handed to every listener, and written out as the run's JSON
record in local mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TaskRecord:
    """One task call of a run (a task called in a loop gets one record per call)."""

    index: int
    name: str
    description: str = ""
    estimated_time: int = 1000
    crucial_pass: bool = True
    state: str = "PENDING"
    note: str = ""
    traceback: str = ""  # trimmed, user frames first; chained causes kept
    table: list[dict[str, Any]] = field(default_factory=list)
    passed: bool | None = None
    progress: int = 0
    duration_ms: int | None = None
    peak_rss: int | None = None
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None

    def result_dict(self) -> dict[str, Any]:
        """The `result` object of the backend's state update."""
        passed = self.state == "COMPLETED" if self.passed is None else self.passed
        return {"passed": passed, "note": self.note, "table": self.table}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunRecord:
    """One flow run, from start to its final state."""

    run_id: str
    flow_name: str
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    state: str = "RUNNING"
    note: str = ""
    tasks: list[TaskRecord] = field(default_factory=list)
    started_at: float | None = None
    ended_at: float | None = None
    log_path: str | None = None
    not_run: list[str] = field(default_factory=list)  # declared tasks no call ran

    @property
    def task_count(self) -> int:
        return len(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task_count"] = self.task_count
        return data
