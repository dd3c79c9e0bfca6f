"""The events a flow run emits, and the listeners that consume them.

The executor calls these methods on the run's own thread in the control
process, the same thread that drains the children's pipes. So a listener must
never block: no network call, no waiting on a lock held across I/O. Listeners
that talk to a backend put the event on a queue and return (see
`transport.sender`); listeners that write a local file or a terminal may write
directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from .. import fault_injection
from ..fault_injection import fault_point
from .records import RunRecord, TaskRecord

log = logging.getLogger("perfect_runner.executor")


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


class ListenerError(Exception):
    """A listener raised while handling an event; the other listeners still got it."""


class FanOut(NullListener):
    """Delivers every event to several listeners, in order.

    A listener that raises does not keep the event from the others: each gets
    it, then the first failure is raised as a `ListenerError` naming the
    listener and the event (the run contains it: see `GuardedListener`).
    """

    def __init__(self, *listeners: RunListener) -> None:
        self.listeners = list(listeners)

    def _deliver(self, event: str, run: RunRecord, *args: Any) -> None:
        failed: tuple[str, Exception] | None = None
        for listener in self.listeners:
            try:
                if fault_injection.ARMED:
                    fault_point(f"listener.{type(listener).__name__}.{event}", run.flow_name,
                                run.run_id)
                getattr(listener, event)(run, *args)
            except Exception as exc:  # noqa: BLE001 - the others get the event first
                failed = failed or (f"{type(listener).__name__}.{event}", exc)
        if failed:
            where, exc = failed
            raise ListenerError(f"{where} raised {type(exc).__name__}: {exc}") from exc

    def run_started(self, run: RunRecord) -> None:
        self._deliver("run_started", run)

    def runner_log(self, run: RunRecord, line: str, level: str = "info") -> None:
        self._deliver("runner_log", run, line, level)

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        self._deliver("task_started", run, task)

    def task_progress(self, run: RunRecord, task: TaskRecord) -> None:
        self._deliver("task_progress", run, task)

    def task_output(
        self, run: RunRecord, task: TaskRecord | None, stream: str, lines: list[str]
    ) -> None:
        self._deliver("task_output", run, task, stream, lines)

    def task_traceback(self, run: RunRecord, task: TaskRecord) -> None:
        self._deliver("task_traceback", run, task)

    def task_retrying(self, run: RunRecord, task: TaskRecord) -> None:
        self._deliver("task_retrying", run, task)

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        self._deliver("task_finished", run, task)

    def run_finished(self, run: RunRecord) -> None:
        self._deliver("run_finished", run)


class GuardedListener:
    """A run's listener as the run calls it.

    Until the run is failing, an exception from a listener propagates: it
    unwinds the run's handling to `FlowRun.execute`, which contains it (the
    run fails, its processes are killed). Once `tripped` (the run is failing),
    exceptions are logged and swallowed, so the end of the run still reaches
    every listener that can take it.
    """

    def __init__(self, inner: RunListener) -> None:
        self.inner = inner
        self.tripped = False
        self.swallowed = 0

    def __getattr__(self, event: str) -> Callable[..., None]:
        method = getattr(self.inner, event)

        def call(*args: Any) -> None:
            try:
                method(*args)
            except Exception as exc:
                if not self.tripped:
                    raise
                self.swallowed += 1
                level = logging.WARNING if self.swallowed == 1 else logging.DEBUG
                log.log(level, "a listener failed again while its run was failing (%s: %s)",
                        type(exc).__name__, exc)

        setattr(self, event, call)  # built once per event name, not once per call
        return call
