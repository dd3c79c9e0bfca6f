"""Test-only fault injection: make the control process raise where it handles a run.

    PERFECT_RUNNER_TEST_FAULTS="place@Flow name,other.place@Other flow"

is read once, when this module is first imported (at start). Each listed place
then raises `InjectedFault` the first time a run of that flow passes it (once
per run). It exists so the tests can prove that a failure anywhere in the
handling of one run stays in that run (tests/test_containment.py); never set
it in production: all it does is break runs.

Places:
- engine.new_run       the executor builds the run
- flow_run.start       the run has started, before its flow process
- flow_run.call_task   a task call, after the task is reported RUNNING
- supervisor.watch     the supervision loop, while a task process runs
- flow_run.finish      the flow is over, before the end of the run is reported
- listener.<Class>.<event>  a listener (FanOut member) handling an event,
                       e.g. listener.LogFileListener.task_output
- sender.deliver       the worker's sender thread delivering an update
- local.report         local mode writing the run's reports
"""

from __future__ import annotations

import os
import threading

ENV = "PERFECT_RUNNER_TEST_FAULTS"


class InjectedFault(RuntimeError):
    """Raised at an armed place (tests only)."""


def _parse(raw: str) -> frozenset[tuple[str, str]]:
    armed = set()
    for item in raw.split(","):
        place, _, flow = item.strip().partition("@")
        if place:
            armed.add((place, flow))
    return frozenset(armed)


_ARMED = _parse(os.environ.get(ENV, ""))
ARMED = bool(_ARMED)  # hot paths skip even building a place name when nothing is armed
_fired: set[tuple[str, str]] = set()  # (place, run id)
_lock = threading.Lock()


def fault_point(place: str, flow_name: str, run_id: str) -> None:
    """Raise InjectedFault if `place` is armed for this flow and has not fired in this run."""
    if not _ARMED or (place, flow_name) not in _ARMED:
        return
    with _lock:
        if (place, run_id) in _fired:
            return
        _fired.add((place, run_id))
    raise InjectedFault(f"injected fault at {place} (test only)")
