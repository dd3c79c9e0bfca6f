"""A run that failed before a `FlowRun` could handle it, reported like any other run.

The worker got an execution request for a flow it does not serve, or building
the run failed: the run still gets its events (one crucial task named "flow",
FAILED with the note), so the backend marks it FAILED and local mode writes
its report.
"""

from __future__ import annotations

import time
import uuid

from ..sdk.result import TaskState
from .events import GuardedListener, RunListener
from .records import RunRecord, TaskRecord


def report_failed_run(listener: RunListener, flow_name: str, note: str,
                      run_id: str | None = None) -> RunRecord:
    """Send a whole FAILED run through `listener`; its record."""
    guarded = GuardedListener(listener)
    guarded.tripped = True  # every listener that can take an event gets it
    now = time.time()
    run = RunRecord(run_id=run_id or f"local-{uuid.uuid4().hex[:8]}", flow_name=flow_name,
                    started_at=now)
    guarded.run_started(run)
    guarded.runner_log(run, note, "error")
    task = TaskRecord(index=0, name="flow", state=TaskState.RUNNING, started_at=now)
    run.tasks.append(task)
    guarded.task_started(run, task)
    task.state, task.note, task.passed, task.duration_ms = TaskState.FAILED, note, False, 0
    task.ended_at = time.time()
    guarded.task_finished(run, task)
    run.state, run.note, run.ended_at = TaskState.FAILED, note, time.time()
    guarded.run_finished(run)
    return run
