"""Turns run events into backend updates (a RunListener over `RunSender`s).

Every method only builds a small dict and enqueues it on the run's sender, so
the executor's pipe-draining thread never waits on the network. One sender
per run, created in `run_started`, finished (not joined) in `run_finished`.

Every state update carries taskName, estimatedTime and crucialPass: an index
past the end creates the task server-side from them, and a missing taskName
must never rename the stored entry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..executor.events import NullListener
from ..executor.records import RunRecord, TaskRecord
from ..sdk.result import TaskState
from .api import PerfectAPIClient, as_int
from .sender import RunSender

log = logging.getLogger("perfect_runner.transport")

TASK_OUT = "[Task Output] "
TASK_ERR = "[Task Output][stderr] "
FLOW_OUT = "[Flow Output] "
FLOW_ERR = "[Flow Output][stderr] "
RUNNER = "[perfect_runner] "
FLUSH_STALL = 10.0  # a final flush gives up after this long without one delivery


@dataclass(frozen=True)
class Unfinished:
    """A run whose end the backend did not hear: what the worker reports at exit."""

    run_id: str
    flow_name: str
    left: int  # updates not delivered (at least 1: its complete)


class BackendListener(NullListener):
    """Reports every run it hears about to the Perfect backend."""

    def __init__(
        self,
        client: PerfectAPIClient,
        *,
        on_cancel: Callable[[str], None] | None = None,
        on_fault: Callable[[str, str], None] | None = None,
        **sender_options: Any,
    ) -> None:
        """`sender_options` go to each `RunSender` (log_rate, max_log_entries...)."""
        self.client = client
        self.on_cancel = on_cancel
        self.on_fault = on_fault
        self.sender_options = sender_options
        self._senders: dict[str, RunSender] = {}
        self._lock = threading.Lock()

    def sender(self, run_id: str) -> RunSender | None:
        with self._lock:
            return self._senders.get(run_id)

    # -- events --------------------------------------------------------------

    def run_started(self, run: RunRecord) -> None:
        sender = RunSender(
            self.client,
            run.run_id,
            log_path=run.log_path,
            on_cancel=self.on_cancel,
            on_fault=self.on_fault,
            flow_name=run.flow_name,
            **self.sender_options,
        )
        with self._lock:
            self._forget_done()
            self._senders[run.run_id] = sender

    def runner_log(self, run: RunRecord, line: str, level: str = "info") -> None:
        sender = self.sender(run.run_id)
        if sender is not None:
            sender.log(RUNNER + line)

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        sender = self.sender(run.run_id)
        if sender is not None:
            sender.progress(task.index, {**_task_fields(task), "progress": 0}, first=True)

    def task_progress(self, run: RunRecord, task: TaskRecord) -> None:
        sender = self.sender(run.run_id)
        if sender is not None:
            progress = _pct(task.progress)
            sender.progress(task.index, {**_task_fields(task), "progress": progress})

    def task_output(
        self, run: RunRecord, task: TaskRecord | None, stream: str, lines: list[str]
    ) -> None:
        sender = self.sender(run.run_id)
        if sender is None:
            return
        if task is None:
            prefix = FLOW_ERR if stream == "stderr" else FLOW_OUT
        else:
            # Lines of several tasks may share an entry: each one says whose it is.
            prefix = (TASK_ERR if stream == "stderr" else TASK_OUT) + f"{task.name}: "
        sender.log_lines((prefix + line for line in lines), keep=stream == "stderr")

    def task_retrying(self, run: RunRecord, task: TaskRecord) -> None:
        sender = self.sender(run.run_id)
        if sender is not None:
            payload = {
                **_task_fields(task),
                "state": TaskState.RETRYING,
                "progress": _pct(task.progress),
                "result": task.result_dict(),
            }
            sender.update(task.index, payload)

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        sender = self.sender(run.run_id)
        if sender is None:
            return
        state = TaskState.COMPLETED if task.state == TaskState.COMPLETED else TaskState.FAILED
        payload: dict[str, Any] = {
            **_task_fields(task),
            "state": state,
            "progress": 100 if state == TaskState.COMPLETED else _pct(task.progress),
            "result": task.result_dict(),
        }
        if task.duration_ms is not None:
            payload["durationMs"] = int(task.duration_ms)
        sender.update(task.index, payload)

    def run_finished(self, run: RunRecord) -> None:
        sender = self.sender(run.run_id)
        if sender is not None:
            sender.complete(run.task_count)
            sender.finish()

    # -- shutdown ------------------------------------------------------------

    def close(self, timeout: float) -> int:
        """Flush every sender within `timeout` seconds overall; returns items not delivered."""
        return sum(u.left for u in self.flush(timeout, stall=timeout))

    def flush(self, bound: float, stall: float = FLUSH_STALL) -> list[Unfinished]:
        """Deliver what every run has pending, as long as deliveries progress.

        Stops at `bound` seconds, or earlier when nothing at all was delivered for
        `stall` seconds (the backend is really gone). Returns the runs it could not
        finish (empty: everything arrived).
        """
        with self._lock:
            senders = list(self._senders.values())
            self._senders.clear()
        for sender in senders:
            sender.finish()
        start = last_progress = time.monotonic()
        delivered = sum(s.delivered for s in senders)
        while any(not s.done for s in senders):
            now = time.monotonic()
            if now - start >= bound or now - last_progress >= stall:
                break
            next(s for s in senders if not s.done).join(0.1)
            total = sum(s.delivered for s in senders)
            if total != delivered:
                delivered, last_progress = total, time.monotonic()
        # A run whose end never reached the backend is lost even with nothing pending.
        lost = [Unfinished(s.run_id, s.flow_name,
                           max(s.abandon(), 0 if s.run_over_on_backend else 1))
                for s in senders]
        return [u for u in lost if u.left]

    def _forget_done(self) -> None:
        """Drop senders whose thread has exited (lock held)."""
        for run_id in [rid for rid, s in self._senders.items() if s.done]:
            del self._senders[run_id]


def _pct(value: Any) -> int:
    """Progress for the wire: an int in 0..99 whatever the record holds (NaN included)."""
    try:
        return max(0, min(99, int(value)))
    except (TypeError, ValueError, OverflowError):
        return 0


def _task_fields(task: TaskRecord) -> dict[str, Any]:
    return {
        "taskName": task.name,
        "estimatedTime": as_int(task.estimated_time) or 0,
        "crucialPass": bool(task.crucial_pass),
    }
