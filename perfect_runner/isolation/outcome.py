"""How a task process ended, with its evidence; every note a user reads comes from here."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..sdk.units import format_size
from .launcher import ExitInfo
from .protocol import EXIT_BOOTSTRAP, EXIT_CHANNEL_LOST
from .tracebacks import MAX_TRACEBACK_CHARS

INTERRUPTED_BY = "interrupted by "  # how an interrupted task's or run's note starts


class Kind(StrEnum):
    COMPLETED = "completed"
    NOT_PASSED = "not passed"  # returned TaskResult(passed=False)
    RAISED = "raised"
    UNSENDABLE = "unsendable"  # arguments or result could not cross the boundary
    TIMED_OUT = "timed out"
    FLOW_TIMEOUT = "flow timed out"  # the whole run's @flow(timeout=...) ran out
    MEMORY = "memory limit"
    PROCS = "process limit"
    CRASHED = "crashed"  # killed by a signal the runner did not send
    EXITED = "exited"  # exited without a final frame
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # local mode: Ctrl-C or SIGTERM
    WORKER_STOPPED = "worker stopped"
    START_FAILED = "start failed"
    PROTOCOL = "protocol error"
    FLOW_LOST = "flow lost"  # its flow process died: nobody wants the result any more
    RUNNER_FAULT = "runner fault"  # the control process failed while handling the run


@dataclass
class Outcome:
    kind: Kind
    exit: ExitInfo | None = None
    summary: dict[str, Any] | None = None  # TaskReturned header (JSON only)
    error: dict[str, Any] | None = None  # TaskRaised header (JSON only)
    # The flow process holds the task's value or exception (its receipt said so);
    # the control process never sees it.
    has_value: bool = False
    peak_rss: int = 0
    last_stderr: list[str] = field(default_factory=list)
    detail: str = ""  # kind-specific evidence, e.g. the limit that was hit
    killed_after_grace: bool = False
    stack_dump: str = ""  # faulthandler's dump (timeout, crash), runner frames trimmed

    @property
    def passed(self) -> bool:
        return self.kind is Kind.COMPLETED

    @property
    def table(self) -> list[Any]:
        return list(self.summary.get("table", [])) if self.summary else []

    @property
    def traceback(self) -> str:
        """What a person reads to see where the task was: its exception's traceback,
        else the stack dump of a timeout or crash."""
        if self.kind is Kind.RAISED and self.error:
            # The child's text, untrusted: its end (the exception) within the usual cap.
            return str(self.error.get("traceback") or "")[-MAX_TRACEBACK_CHARS:]
        return self.stack_dump

    def note(self) -> str:
        text = _NOTES[self.kind](self)
        if self.kind in (Kind.CRASHED, Kind.EXITED) and self.last_stderr:
            text += "; last stderr: " + " | ".join(self.last_stderr[-3:])
        return text


def describe_signal(signum: int) -> str:
    """"SIGSEGV (segmentation fault)"."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    description = signal.strsignal(signum) or ""
    return f"{name} ({description.lower()})" if description else name


def _completed(o: Outcome) -> str:
    return str(o.summary.get("note", "")) if o.summary else ""


def _raised(o: Outcome) -> str:
    err = o.error or {}
    exc_type, message = err.get("exc_type", "Exception"), err.get("message", "")
    if exc_type == "SystemExit":
        return f"called sys.exit({message or 'None'}) before returning a result"
    if exc_type == "KeyboardInterrupt":
        return "interrupted: KeyboardInterrupt raised inside the task"
    if exc_type == "TaskTimeout":
        return f"raised TaskTimeout: {message}" if message else "raised TaskTimeout"
    return f"{exc_type}: {message}" if message else exc_type


def _exited(o: Outcome) -> str:
    if o.exit and o.exit.server_died:
        return f"the fork server died ({o.exit.server_died}); the task process died with it"
    code = o.exit.code if o.exit else None
    if code == EXIT_BOOTSTRAP:
        return "the runner could not start the task in its process (see stderr)"
    if code == EXIT_CHANNEL_LOST:
        return "lost its connection to the runner"
    if code is None:
        return "ended without returning a result (exit status unknown)"
    return f"exited with code {code} before returning a result"


def _crashed(o: Outcome) -> str:
    sig = o.exit.signal if o.exit else None
    return f"crashed: {describe_signal(sig)}" if sig else _exited(o)


def _timed_out(o: Outcome) -> str:
    text = f"timed out after {o.detail} s"
    return text + "; killed after grace" if o.killed_after_grace else text


def _memory(o: Outcome) -> str:
    # The RSS in the limit's kind of unit, so the two compare at a glance.
    rss = format_size(o.peak_rss, decimal=not o.detail.endswith("iB"))
    return f"killed: memory limit {o.detail} exceeded (RSS {rss})"


_NOTES = {
    Kind.COMPLETED: _completed,
    Kind.NOT_PASSED: lambda o: _completed(o) or "returned passed=False",
    Kind.RAISED: _raised,
    Kind.UNSENDABLE: lambda o: o.detail,
    Kind.TIMED_OUT: _timed_out,
    Kind.FLOW_TIMEOUT: lambda o: f"stopped: the flow timed out after {o.detail} s",
    Kind.MEMORY: _memory,
    Kind.PROCS: lambda o: f"killed: process limit exceeded ({o.detail})",
    Kind.CRASHED: _crashed,
    Kind.EXITED: _exited,
    Kind.CANCELLED: lambda o: f"cancelled: {o.detail}" if o.detail else "cancelled",
    Kind.WORKER_STOPPED: lambda o: "worker stopped",
    Kind.INTERRUPTED: lambda o: f"{INTERRUPTED_BY}{o.detail}",
    Kind.START_FAILED: lambda o: f"could not start: {o.detail}",
    Kind.PROTOCOL: lambda o: f"broke the runner protocol: {o.detail}",
    Kind.FLOW_LOST: lambda o: f"stopped: {o.detail}",
    Kind.RUNNER_FAULT: lambda o: f"stopped: {o.detail}",
}
