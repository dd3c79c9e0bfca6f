"""What the worker tells the backend's library about its flows, and what it reads back.

Registration: the backend shows a run's rows (and their progress estimates)
from the task list of the flow's library entry. A flow that calls a task in a
loop makes more calls than it has tasks, so the list read from the source is
only a first guess; after a run that got to its end, the flow is registered
with the calls that actually ran (names, estimates, crucial flags, in call
order). A run that stopped early (a crucial failure, a stop) says nothing
about the calls it never made, so it teaches nothing.

Library check: the backend hands each execution request to whichever worker
polls first, so every worker on one backend must serve the same flows. At
start and after a run the worker lists the library and warns, once per flow,
about flows it does not serve: their runs fail if it takes them. After a run it
reads the library at most once per `check_interval` seconds (the whole library
comes in one answer, and runs may take a second each).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..executor.records import RunRecord
from ..isolation.metadata import FlowMeta, TaskMeta
from ..sdk.result import TaskState
from .api import PerfectAPIClient

log = logging.getLogger("perfect_runner.worker")

SAME_FLOWS = "every worker on one backend must serve the same flows"


def not_served_note(flow_name: str) -> str:
    """The note of a run this worker refuses because it does not serve its flow."""
    return f"this worker does not serve {flow_name!r}; {SAME_FLOWS}"


class FlowLibrary:
    """The worker's flows as the backend should see them."""

    def __init__(self, flows: Mapping[str, FlowMeta],
                 static_tasks: Mapping[str, list[TaskMeta]],
                 check_interval: float = 30.0) -> None:
        self.flows = flows
        self.check_interval = check_interval
        self._checked_at: float | None = None
        self._tasks = {name: [_from_source(t) for t in tasks]
                       for name, tasks in static_tasks.items()}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def payload(self, name: str) -> dict[str, Any]:
        """The POST /api/flows body for one flow (the calls of its last full run)."""
        flow = self.flows[name]
        with self._lock:
            tasks = [dict(t) for t in self._tasks.get(name, [])]
        return {
            "name": name, "description": flow.description,
            "tags": dict(flow.tags), "tasks": tasks, "autoTrigger": False,
            "autoTriggerConfig": flow.auto_trigger_config,
        }

    def learn(self, run: RunRecord) -> None:
        """Remember the calls of a run that got to its end."""
        if run.state != TaskState.COMPLETED or not run.tasks:
            return
        calls = [{"name": t.name, "description": t.description,
                  "estimatedTime": int(t.estimated_time), "crucialPass": bool(t.crucial_pass)}
                 for t in run.tasks]
        with self._lock:
            self._tasks[run.flow_name] = calls

    def check(self, client: PerfectAPIClient, *, force: bool = False) -> list[str]:
        """Warn once per library flow this worker does not serve; returns the new ones.

        Without `force`, does nothing when the last check is under `check_interval` old.
        """
        now = time.monotonic()
        with self._lock:
            last = self._checked_at
            if not force and last is not None and now - last < self.check_interval:
                return []
            self._checked_at = now
        result = client.list_flows()
        if not result.ok or not isinstance(result.body, list):
            log.debug("could not list the backend's library: %s", result.describe())
            return []
        names = {e.get("name") for e in result.body if isinstance(e, dict)}
        with self._lock:
            new = sorted(n for n in names if isinstance(n, str) and n not in self.flows
                         and n not in self._warned)
            self._warned.update(new)
        for name in new:
            log.warning("the backend's library has flow %r, which this worker does not serve: "
                        "its runs fail if this worker takes them (%s)", name, SAME_FLOWS)
        return new


def _from_source(task: TaskMeta) -> dict[str, Any]:
    return {"name": task.name, "description": task.description,
            "estimatedTime": task.estimated_time, "crucialPass": task.crucial_pass}
