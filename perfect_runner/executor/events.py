"""The events a flow run emits, and the listeners that consume them.

The executor calls these methods on the run's own thread in the control
process, the same thread that drains the children's pipes. So a listener must
never block: no network call, no waiting on a lock held across I/O. Listeners
that talk to a backend put the event on a queue and return (see
`transport.sender`); listeners that write a local file or a terminal may write
directly.
"""

from __future__ import annotations

from typing import Protocol

from .records import RunRecord, TaskRecord


class RunListener(Protocol):
    def run_started(self, run: RunRecord) -> None:
        """The flow process is starting."""

    def runner_log(self, run: RunRecord, line: str, level: str = "info") -> None:
        """A message from the runner itself (flow started, task failed and why...)."""

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        """Task `task.index` is RUNNING (its first attempt)."""

    def task_progress(self, run: RunRecord, task: TaskRecord) -> None:
        """Periodic tick while a task runs: `task.progress` is 0..99."""

    def task_output(
        self, run: RunRecord, task: TaskRecord | None, stream: str, lines: list[str]
    ) -> None:
        """Complete output lines from a task (or the flow body when `task` is None).

        `stream` is "stdout" or "stderr". Lines carry no trailing newline.
        """

    def task_traceback(self, run: RunRecord, task: TaskRecord) -> None:
        """An attempt raised: `task.traceback` is its (trimmed) traceback.

        It is task output too: a listener that does not look at it gets it as the
        task's stderr lines (see `NullListener`), so log files and the backend's
        logs have it without a second path.
        """

    def task_retrying(self, run: RunRecord, task: TaskRecord) -> None:
        """An attempt failed (`task.note` says why) and another one will run."""

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        """`task.state` is COMPLETED or FAILED, with note, table and duration."""

    def run_finished(self, run: RunRecord) -> None:
        """`run.state` is COMPLETED or FAILED; no more events follow for this run."""


class NullListener:
    """A listener that ignores everything; subclass it to handle a few events."""

    def run_started(self, run: RunRecord) -> None:
        pass

    def runner_log(self, run: RunRecord, line: str, level: str = "info") -> None:
        pass

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        pass

    def task_progress(self, run: RunRecord, task: TaskRecord) -> None:
        pass

    def task_output(
        self, run: RunRecord, task: TaskRecord | None, stream: str, lines: list[str]
    ) -> None:
        pass

    def task_traceback(self, run: RunRecord, task: TaskRecord) -> None:
        self.task_output(run, task, "stderr", task.traceback.splitlines())

    def task_retrying(self, run: RunRecord, task: TaskRecord) -> None:
        pass

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        pass

    def run_finished(self, run: RunRecord) -> None:
        pass


class FanOut(NullListener):
    """Delivers every event to several listeners, in order."""

    def __init__(self, *listeners: RunListener) -> None:
        self.listeners = list(listeners)

    def run_started(self, run: RunRecord) -> None:
        for listener in self.listeners:
            listener.run_started(run)

    def runner_log(self, run: RunRecord, line: str, level: str = "info") -> None:
        for listener in self.listeners:
            listener.runner_log(run, line, level)

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        for listener in self.listeners:
            listener.task_started(run, task)

    def task_progress(self, run: RunRecord, task: TaskRecord) -> None:
        for listener in self.listeners:
            listener.task_progress(run, task)

    def task_output(
        self, run: RunRecord, task: TaskRecord | None, stream: str, lines: list[str]
    ) -> None:
        for listener in self.listeners:
            listener.task_output(run, task, stream, lines)

    def task_traceback(self, run: RunRecord, task: TaskRecord) -> None:
        for listener in self.listeners:
            listener.task_traceback(run, task)

    def task_retrying(self, run: RunRecord, task: TaskRecord) -> None:
        for listener in self.listeners:
            listener.task_retrying(run, task)

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        for listener in self.listeners:
            listener.task_finished(run, task)

    def run_finished(self, run: RunRecord) -> None:
        for listener in self.listeners:
            listener.run_finished(run)
