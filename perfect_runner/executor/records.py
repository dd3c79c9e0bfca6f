"""What the executor knows about a run and its tasks, as plain data.

These records are built in the control process from JSON only (never from
user objects), handed to every listener, and written out as the run's JSON
record in local mode.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..isolation.outcome import INTERRUPTED_BY
from ..sdk.result import TaskState

NOT_RUN = "NOT RUN"
OUTPUT_TAIL_LINES = 20
OUTPUT_TAIL_CHARS = 500


@dataclass
class AttemptSpan:
    """When one attempt of a task call ran and how it ended (COMPLETED or FAILED;
    RUNNING while it runs)."""

    attempt: int
    started_at: float
    ended_at: float | None = None
    state: str = TaskState.RUNNING  # or shown_state's INTERRUPTED once it ended
    note: str = ""


@dataclass
class TaskRecord:
    """One task call of a run (a task called in a loop gets one record per call)."""

    index: int
    name: str
    description: str = ""
    estimated_time: int = 1000
    crucial_pass: bool = True
    state: TaskState = TaskState.PENDING
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
    attempt_spans: list[AttemptSpan] = field(default_factory=list)
    # The last lines the task printed, as (stream, line) pairs: what a report shows.
    # stream is "stdout", "stderr", or "runner" for a line marking the next attempt.
    output_tail: list[tuple[str, str]] = field(default_factory=list)

    def keep_output(self, stream: str, lines: list[str]) -> None:
        """Remember the last OUTPUT_TAIL_LINES lines (each cut to OUTPUT_TAIL_CHARS)."""
        fresh = [(stream, line[:OUTPUT_TAIL_CHARS]) for line in lines[-OUTPUT_TAIL_LINES:]]
        self.output_tail = (self.output_tail + fresh)[-OUTPUT_TAIL_LINES:]

    def result_dict(self) -> dict[str, Any]:
        """The `result` object of the backend's state update."""
        passed = self.state == TaskState.COMPLETED if self.passed is None else self.passed
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
    # The flow's tasks as read from its source (each named once, in call order).
    declared_tasks: list[str] = field(default_factory=list)
    state: TaskState = TaskState.RUNNING
    note: str = ""
    tasks: list[TaskRecord] = field(default_factory=list)
    started_at: float | None = None
    ended_at: float | None = None
    log_path: str | None = None
    not_run: list[str] = field(default_factory=list)  # declared tasks no call ran

    @property
    def task_count(self) -> int:
        return len(self.tasks)

    def tasks_not_called(self) -> list[str]:
        """The declared tasks no call has run (yet, while the run goes on)."""
        return not_run_names(self.declared_tasks, (task.name for task in self.tasks))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task_count"] = self.task_count
        return data


def not_run_names(declared: Iterable[str], called: Iterable[str]) -> list[str]:
    """The declared tasks the run never called (after a crucial failure, a skipped
    branch, an interrupted run), in declared order."""
    seen = set(called)
    return [name for name in declared if name not in seen]


def not_run_calls(declared: Iterable[str], called: Iterable[str]) -> list[str]:
    """The declared tasks (in call order) that no call ran, counted per declaration:
    two declared tasks sharing a name need two calls of that name."""
    left = Counter(called)
    missing = []
    for name in declared:
        if left[name] > 0:
            left[name] -= 1
        else:
            missing.append(name)
    return missing


def shown_state(state: str, note: str) -> str:
    """A task's state as a person should read it: a task stopped by Ctrl-C or SIGTERM is
    FAILED for the record and the backend, but it is not the task's fault."""
    if state == TaskState.FAILED and note.startswith(INTERRUPTED_BY):
        return "INTERRUPTED"
    return state


def tally(states: Iterable[str], not_run: int = 0) -> dict[str, int]:
    """How many task calls passed, failed, did not run, and anything else ("running",
    "interrupted"...), in that order; the first three are always present."""
    counts = {"passed": 0, "failed": 0, "not run": not_run}
    for state in states:
        key = _TALLY_KEYS.get(str(state).upper(), str(state).lower())
        counts[key] = counts.get(key, 0) + 1
    return counts


_TALLY_KEYS = {TaskState.COMPLETED: "passed", TaskState.FAILED: "failed", NOT_RUN: "not run",
               "NOT_RUN": "not run"}
