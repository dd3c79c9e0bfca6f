"""Parent side of one task attempt: start it, watch it, stop it, name its outcome.

The loop waits on the child's pipes, channel and pidfd, waking for a few
deadlines kept in `Deadlines`: the next progress tick, the next memory sample,
the task's timeout, and the end of the kill grace. `Deadlines.due` is a pure
step (no clock, no I/O) so its rules are tested with plain numbers.

At the timeout: the child's Python stacks are dumped into its stderr
(faulthandler on SIGUSR1), then a soft stop (SIGUSR2 raises TaskTimeout in the
task so `finally` blocks run), then after the grace SIGKILL to the whole tree.
An interrupt (Ctrl-C in local mode) is the same without the dump: SIGINT, so
KeyboardInterrupt runs the task's `finally` blocks, then SIGKILL after the grace.
Stack dumps pass through a `StackDumpFilter` on their way to the listeners (the
runner's frames trimmed) and become the outcome's `stack_dump`.
Signals the supervisor sent are recorded, so a kill it caused is never reported
as a crash.

An attempt is over at the child's final frame, at its exit without one, or
the moment it breaks the protocol (its tree is killed then). At the final
frame the supervisor kills what is left of the tree at once and hands the
process back as `leftover`: its exit (slow for a big process) is awaited
later, off the task call's critical path.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..sdk.units import format_limit
from .child_bootstrap import ChildConfig
from .child_process import ChildProcess, OutputHandler
from .launcher import Launcher, LaunchError
from .oskit import signal_process
from .outcome import Kind, Outcome
from .proctree import tree_usage
from .protocol import (
    SOFT_STOP_SIGNAL,
    STACK_DUMP_SIGNAL,
    Progress,
    RunTask,
    TaskRaised,
    TaskReturned,
    TaskUnsendable,
)
from .selector_loop import SelectorLoop
from .tracebacks import StackDumpFilter


@dataclass
class TaskLimits:
    timeout: float | None = None
    memory_limit: int | None = None
    max_procs: int | None = None
    kill_grace: float = 2.0
    memory_sample_interval: float = 0.05
    max_result: int = 64 * 1024 * 1024


@dataclass
class Deadlines:
    """Monotonic times at which the supervisor must act; None means never."""

    tick: float | None = None
    sample: float | None = None
    timeout: float | None = None
    kill: float | None = None
    fired: set[str] = field(default_factory=set)

    def next_wake(self, now: float) -> float | None:
        times = [t for t in (self.tick, self.sample, self.timeout, self.kill) if t is not None]
        return max(0.0, min(times) - now) if times else None

    def due(self, now: float) -> list[str]:
        """Names of the deadlines that have passed; one-shot ones are cleared."""
        names = [n for n in ("tick", "sample", "timeout", "kill")
                 if getattr(self, n) is not None and getattr(self, n) <= now]
        for name in ("timeout", "kill"):
            if name in names:
                setattr(self, name, None)
                self.fired.add(name)
        return names


def start_task_process(launcher: Launcher, loop: SelectorLoop, on_output: OutputHandler,
                       max_result: int, first_frame: RunTask | None = None,
                       payload_fd: int | None = None, deferred: bool = False) -> ChildProcess:
    """A task process; without `first_frame` it waits, bootstrapped, for its RunTask
    (which carries `payload_fd`, its end of the payload channel)."""
    return ChildProcess(launcher, ChildConfig(role="task", parent_pid=0), loop, on_output,
                        max_blob=max_result, first_frame=first_frame,
                        first_fds=() if payload_fd is None else (payload_fd,),
                        deferred=deferred)


class TaskSupervisor:
    """Runs one attempt of one task call to its `Outcome`."""

    def __init__(self, launcher: Launcher, loop: SelectorLoop,
                 limits: TaskLimits, on_output: OutputHandler,
                 on_tick: Callable[[float | None], None], tick_interval: float,
                 cancel_reason: Callable[[], tuple[Kind, str] | None],
                 full_tracebacks: bool = False,
                 fault: Callable[[str], None] | None = None) -> None:
        """`cancel_reason` says why to stop the task now (or None); `fault` is the
        test-only fault hook (see `fault_injection`)."""
        self.launcher = launcher
        self.loop = loop
        self.limits = limits
        self.on_output = on_output
        self.on_tick = on_tick
        self.tick_interval = tick_interval
        self.cancel_reason = cancel_reason
        self.fault = fault or (lambda place: None)
        self.reported_progress: float | None = None
        self.peak_rss = 0
        self.forced: tuple[Kind, str] | None = None
        self.deadlines = Deadlines()
        self.leftover: ChildProcess | None = None  # killed, not yet known to be gone
        self.dumps = StackDumpFilter(full_tracebacks)

    def _output(self, stream: str, lines: list[str]) -> None:
        # Stack dumps (timeout, crash) reach every listener with the runner's frames trimmed.
        if stream == "stderr":
            lines = self.dumps.feed(lines)
        if lines:
            self.on_output(stream, lines)

    def run(self, request: RunTask, payload_fd: int, spare: ChildProcess | None = None,
            on_sent: Callable[[], None] | None = None) -> Outcome:
        """Run the attempt in `spare` (a task process started ahead) or a new process.

        `payload_fd` (the task's end of the payload channel) goes with the RunTask.
        `on_sent` runs once the task has its RunTask: the moment to hand the flow
        process its end, and to start the next spare, off this task's critical path.
        """
        if spare is not None:
            spare.on_output = self._output
            spare.send(request, (payload_fd,))
            child = spare
        else:
            try:
                child = start_task_process(self.launcher, self.loop, self._output,
                                           self.limits.max_result, request, payload_fd)
            except LaunchError as exc:
                return Outcome(Kind.START_FAILED, detail=str(exc))
        if on_sent is not None:
            on_sent()
        try:
            try:
                self._watch(child)
            finally:
                child.kill_tree()  # whatever the task left behind dies with it
            child.drain()
            return self._outcome(child)
        finally:
            # Killed, but its exit (page tables of a big process) and its killed
            # descendants' take a while: the caller awaits them (`leftover.stop()`)
            # later, off the critical path.
            child.retire()
            child.frames.clear()  # the outcome has what it needs; a retired process keeps none
            self.leftover = child

    def _watch(self, child: ChildProcess) -> None:
        start = time.monotonic()
        self.deadlines.tick = start + self.tick_interval
        if self.limits.memory_limit or self.limits.max_procs:
            self.deadlines.sample = start + self.limits.memory_sample_interval
        if self.limits.timeout is not None:
            self.deadlines.timeout = start + self.limits.timeout
        # Until it exits, breaks the protocol, or sends its final frame (then it is
        # done, whatever follows).
        while not child.over and not child.frames:
            self.loop.poll(self.deadlines.next_wake(time.monotonic()))
            self._take_frames(child)
            if not child.over and not child.frames:
                self._act(child, time.monotonic())

    def _act(self, child: ChildProcess, now: float) -> None:
        self.fault("supervisor.watch")
        for name in self.deadlines.due(now):
            getattr(self, f"_on_{name}")(child, now)
        reason = self.cancel_reason()
        if reason and not self.forced:
            self.forced = reason
            if reason[0] is Kind.INTERRUPTED:
                self._interrupt(child, now)
            else:
                child.kill_tree()

    def _interrupt(self, child: ChildProcess, now: float) -> None:
        # As Ctrl-C does to a plain script: KeyboardInterrupt in the task, so its
        # `finally` blocks run; after the kill grace, SIGKILL to the whole tree.
        signal_process(child.pid, signal.SIGINT)
        self.deadlines.kill = now + self.limits.kill_grace

    def _on_tick(self, child: ChildProcess, now: float) -> None:
        self.deadlines.tick = now + self.tick_interval
        self.on_tick(self.reported_progress)

    def _on_sample(self, child: ChildProcess, now: float) -> None:
        self.deadlines.sample = now + self.limits.memory_sample_interval
        rss, count = tree_usage(child.pid)
        self.peak_rss = max(self.peak_rss, rss)
        limit, max_procs = self.limits.memory_limit, self.limits.max_procs
        if self.forced:
            return
        if limit and rss > limit:
            self.forced = (Kind.MEMORY, format_limit(limit))
        elif max_procs and count > max_procs:
            self.forced = (Kind.PROCS, f"{count} processes, --max-procs {max_procs}")
        if self.forced:
            child.kill_tree()

    def _on_timeout(self, child: ChildProcess, now: float) -> None:
        if self.forced:
            return
        self.forced = (Kind.TIMED_OUT, f"{self.limits.timeout:.1f}")
        signal_process(child.pid, STACK_DUMP_SIGNAL)
        signal_process(child.pid, SOFT_STOP_SIGNAL)
        self.deadlines.kill = now + self.limits.kill_grace

    def _on_kill(self, child: ChildProcess, now: float) -> None:
        child.kill_tree()

    def _take_frames(self, child: ChildProcess) -> None:
        # Progress frames are consumed here; the final frame stays for _outcome.
        kept = []
        while child.frames:
            message, blob = child.frames.popleft()
            if isinstance(message, Progress):
                self.reported_progress = float(message.percent)
            else:
                kept.append((message, blob))
        child.frames.extend(kept)

    def _outcome(self, child: ChildProcess) -> Outcome:
        self._take_frames(child)
        exit_info = child.exit
        peak = max(self.peak_rss, exit_info.maxrss if exit_info else 0)
        outcome = Outcome(Kind.EXITED, exit=exit_info, peak_rss=peak,
                          last_stderr=list(child.stderr_tail), stack_dump=self.dumps.text())
        if self.forced:
            outcome.kind, outcome.detail = self.forced
            outcome.killed_after_grace = "kill" in self.deadlines.fired
            return outcome
        if child.protocol_error:
            outcome.kind, outcome.detail = Kind.PROTOCOL, child.protocol_error
            return outcome
        if child.frames:
            message, _ = child.frames[-1]
            outcome.peak_rss = max(outcome.peak_rss, getattr(message, "peak_rss", 0))
            return _from_final_frame(outcome, message)
        if exit_info and exit_info.signal:
            outcome.kind = Kind.CRASHED
        return outcome


def _from_final_frame(outcome: Outcome, message: object) -> Outcome:
    if isinstance(message, TaskReturned):
        outcome.summary = message.header()
        failed = message.is_task_result and not message.passed
        outcome.kind = Kind.NOT_PASSED if failed else Kind.COMPLETED
    elif isinstance(message, TaskRaised):
        outcome.kind, outcome.error = Kind.RAISED, message.header()
    elif isinstance(message, TaskUnsendable):
        outcome.kind, outcome.detail = Kind.UNSENDABLE, message.note
    else:
        outcome.kind, outcome.detail = Kind.PROTOCOL, f"unexpected {message.TYPE} frame"
    return outcome

