"""Where a decorated task call goes: in-process, or to the control process.

Outside a flow run (a user's unit test, a plain script) nothing is installed and
a task call is a plain function call. Inside a flow process, the flow bootstrap
installs a runtime whose `call_task` ships the call to the control process.
Inside a task process, the runtime carries progress pings.
"""

from __future__ import annotations

from typing import Any, Protocol

from .registry import TaskDefinition


class Runtime(Protocol):
    def call_task(self, task: TaskDefinition, args: tuple, kwargs: dict) -> Any:
        """Run one task call and return what the task returned."""

    def report_progress(self, percent: float) -> None:
        """Send a progress ping for the running task."""


_current: Runtime | None = None


def install(runtime: Runtime | None) -> None:
    global _current
    _current = runtime


def current() -> Runtime | None:
    return _current


def report_progress(percent: float) -> None:
    """Tell the runner how far the current task is (0-100); a no-op outside a run."""
    if _current is not None:
        _current.report_progress(percent)
