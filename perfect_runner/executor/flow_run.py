"""One flow run in the control process: the flow process, its task calls, the outcome.

The flow body runs in a flow process. Each task call it makes arrives here as
a CallTask; we number it (0-based, in call order), run it in a fresh task
process (with retries), report it to the listeners, and answer the flow
process with what the call evaluates to. Each attempt gets a payload channel
straight between the flow and the task process (see `protocol`): the
arguments and the result never pass through here. Semantics follow Perfect's reference
client: a failed crucial task stops the flow (the call raises in the flow
body) and fails the run; a failed non-crucial task is a warning and the call
returns the task's TaskResult, or None.

Failures of the flow itself (its body raised outside a task, its process
died, it ran past `@flow(timeout=...)`) are reported as one extra crucial task
named "flow", so the backend marks the run FAILED: it has no other way to.

Containment: whatever raises while the control process handles this run (a
bug of ours, hostile input, a listener) unwinds to `execute`, which fails
this run alone: its processes are killed, a task left RUNNING is FAILED, and
the run is FAILED with a note saying what broke. The caller gets the record,
never the exception.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..fault_injection import fault_point
from ..isolation.child_bootstrap import ChildConfig
from ..isolation.child_process import ChildProcess
from ..isolation.launcher import Launcher, LaunchError
from ..isolation.metadata import FlowMeta, TaskMeta
from ..isolation.outcome import INTERRUPTED_BY, Kind, Outcome
from ..isolation.protocol import (
    NOTE_MAX,
    CallTask,
    FlowFinished,
    FlowRaised,
    RunTask,
    StartFlow,
    TaskReply,
    clip,
)
from ..isolation.selector_loop import SelectorLoop
from ..isolation.supervisor import TaskSupervisor
from ..isolation.tracebacks import StackDumpFilter
from ..sdk.result import TaskState
from .events import GuardedListener, RunListener
from .flow_end import describe_exception, flow_death_note, flow_lost
from .options import RunOptions
from .payload_path import ChannelAhead, PayloadPair, await_receipt, with_receipt
from .records import AttemptSpan, RunRecord, TaskRecord, not_run_calls, shown_state
from .spare import SparePool
from .task_setup import process_setup, task_limits, task_workdir

FLOW_TASK_NAME = "flow"

log = logging.getLogger("perfect_runner.executor")


class FlowRun:
    def __init__(self, run: RunRecord, flow_meta: FlowMeta, tasks_meta: Mapping[str, TaskMeta],
                 launcher: Launcher, listener: RunListener, options: RunOptions) -> None:
        self.run = run
        self.flow_meta = flow_meta
        self.tasks_meta = tasks_meta
        self.launcher = launcher
        self.listener = GuardedListener(listener)
        self.options = options
        self._flow: ChildProcess | None = None
        self._ahead = ChannelAhead()  # the next call's first payload channel
        self.loop = SelectorLoop()
        self.spares = SparePool(launcher, self.loop, options.max_result)
        self._retiring: list[ChildProcess] = []
        self._unannounced: list[tuple[TaskRecord, Outcome]] = []
        self._flow_dumps = StackDumpFilter(options.full_tracebacks)
        self._cancel: tuple[Kind, str] | None = None
        self._lock = threading.Lock()
        self._crucial_failed = False
        self._announced = False
        self._deadline = None
        self._flow_timeout = float(flow_meta.timeout) if flow_meta.timeout else None

    # --- other threads ----------------------------------------------------

    def cancel(self, reason: str, kind: Kind = Kind.CANCELLED) -> None:
        """Stop the run from another thread: kill its processes, report why."""
        with self._lock:
            if self._cancel is None:
                self._cancel = (kind, reason)
        self.loop.wake()

    def abort(self, note: str) -> None:
        """Fail the run from another thread: something that handles it broke."""
        self.cancel(f"the runner failed while handling this run: {note}", Kind.RUNNER_FAULT)

    def cancel_reason(self) -> tuple[Kind, str] | None:
        if self._cancel is None and self._deadline and time.monotonic() > self._deadline:
            self._cancel = (Kind.FLOW_TIMEOUT, f"{self._flow_timeout:.1f}")
        if self._cancel and self._cancel[0] is Kind.INTERRUPTED and not self._announced:
            # Said here, on the run's thread, not in the signal handler that cancelled.
            self._announced = True
            self.log(f"{self._cancel[1]}: stopping; running tasks get "
                     f"{self.options.kill_grace:g} s to clean up (Ctrl-C again stops at once)",
                     "notice")
        return self._cancel

    # --- the run ----------------------------------------------------------

    def execute(self) -> RunRecord:
        """Run the flow to its end; a failure of ours fails this run, never raises."""
        try:
            try:
                self._start()
                self._run_flow_process()
            except Exception as exc:  # noqa: BLE001 - contained: this run fails, not us
                self._contain(exc)
            try:
                self._fault("flow_run.finish")
                self._settle()
            except Exception as exc:  # noqa: BLE001
                self._contain(exc)
                self._settle()
            self._announce_end()
        finally:
            self.loop.close()
        return self.run

    def _start(self) -> None:
        self.run.started_at = time.time()
        if self._flow_timeout:
            self._deadline = time.monotonic() + self._flow_timeout
        self.listener.run_started(self.run)
        self.log(f"Starting flow: {self.run.flow_name}")
        for notice in self.options.notices:
            self.log(notice, "warning")
        self._fault("flow_run.start")

    def _run_flow_process(self) -> None:
        start = StartFlow(flow_name=self.run.flow_name, run_id=self.run.run_id,
                          max_result=self.options.max_result, setup=process_setup(self.options))
        try:
            flow = ChildProcess(self.launcher, ChildConfig(role="flow", parent_pid=0),
                                self.loop, self._flow_output,
                                max_blob=self.options.max_result, first_frame=start,
                                first_fds=self._ahead.flow_fds())
        except LaunchError as exc:
            self._ahead.drop()
            self._fail_flow(f"could not start the flow process: {exc}")
            return
        self._ahead.sent()
        self._flow = flow
        self.spares.prepare()  # while the flow process imports and starts its body
        try:
            self._serve(flow)
        finally:
            self._ahead.drop()
            log.debug("run %s: %d spare task processes started, %d kept at the end",
                      self.run.run_id, self.spares.started, self.spares.wanted)
            self.spares.discard()
            flow.stop()
            self._flow = None
            self._await_retired()  # nothing the run started outlives it

    def _serve(self, flow: ChildProcess) -> None:
        """Answer the flow process's task calls until its body is done."""
        while True:
            while not flow.frames and not flow.over and not self.cancel_reason():
                self.loop.poll(self._time_left())
            if self.cancel_reason():
                self._on_cancelled()
                return
            if not flow.frames and not flow.protocol_error:
                flow.drain()
            if not flow.frames or flow.protocol_error:
                self._flow_died(flow)
                return
            message, _ = flow.frames.popleft()
            if isinstance(message, CallTask):
                reply = self._call_task(message, flow)
                try:
                    self._ahead.give_with(flow, reply)
                finally:
                    self._after_reply()
            else:
                self._flow_ended(message)
                return

    def _after_reply(self) -> None:
        """What the call's answer does not wait for, done once the flow process has it:
        the listeners hear of the call's end, the next spares start."""
        self._announce_pending()
        self.spares.prepare()

    def _announce_pending(self) -> None:
        while self._unannounced:
            self._announce(*self._unannounced.pop(0))

    def _time_left(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    # --- task calls -------------------------------------------------------

    def _call_task(self, call: CallTask, flow: ChildProcess) -> TaskReply:
        # The flow process is writing the arguments on the channel it got ahead.
        first = self._ahead.take(call.args_error)
        if self._crucial_failed:
            if first is not None:
                first.close()  # no task reads them: the flow process sees it and says so
                await_receipt(self.loop, flow, self.cancel_reason, self._time_left)
            return TaskReply(action="fail", task_name=call.name,
                             note="the flow already failed; no more tasks run")
        self._settle_retired()  # what the previous task started is gone before this one
        task = self._new_task(call)
        self.listener.task_started(self.run, task)
        self._fault("flow_run.call_task")
        if call.args_error:
            outcome = Outcome(Kind.UNSENDABLE, detail=call.args_error)
        else:
            outcome = self._attempts(task, call, flow, first)
        self._record_outcome(task, outcome, announce=False)
        self._unannounced.append((task, outcome))
        return self._reply(task, outcome)

    def _new_task(self, call: CallTask) -> TaskRecord:
        # A task the flow process did not describe at start gets the defaults.
        meta = self.tasks_meta.get(call.key) or TaskMeta(key=call.key, name=call.name)
        task = TaskRecord(
            index=len(self.run.tasks), name=call.name,
            description=meta.description,
            estimated_time=meta.estimated_time or 1000,
            crucial_pass=meta.crucial_pass,
            state=TaskState.RUNNING, started_at=time.time(),
        )
        self.run.tasks.append(task)
        return task

    def _attempts(self, task: TaskRecord, call: CallTask, flow: ChildProcess,
                  first: PayloadPair | None) -> Outcome:
        meta = self.tasks_meta.get(call.key)
        retries = _option(meta and meta.retries, self.options.retries)
        delay = _option(meta and meta.retry_delay, self.options.retry_delay)
        started = time.monotonic()
        for attempt in range(1, retries + 2):
            task.attempts = attempt
            pair, first = first or PayloadPair(), None
            outcome = self._attempt(task, call, meta, attempt, started, flow, pair)
            if outcome.passed or attempt > retries or self.cancel_reason() or flow.over:
                return outcome
            task.state = TaskState.RETRYING
            task.note = f"attempt {attempt} failed: {outcome.note()}"
            self.listener.task_retrying(self.run, task)
            self.log(f"Task '{task.name}' will be retried: {task.note}", "warning")
            self._pause(delay)
            if self.cancel_reason():
                return outcome  # stopped while waiting: the retry never starts
            task.state = TaskState.RUNNING
        return outcome

    def _attempt(self, task: TaskRecord, call: CallTask, meta: TaskMeta | None, attempt: int,
                 started: float, flow: ChildProcess, channel: PayloadPair) -> Outcome:
        limits = task_limits(meta, self.options)
        def stop_reason() -> tuple[Kind, str] | None:
            # A flow process that broke the protocol is dead: nobody waits for this task.
            if flow.protocol_error:
                return Kind.CANCELLED, "the flow process broke the runner protocol"
            return self.cancel_reason() or flow_lost(flow)

        def tick(reported: float | None) -> None:
            # A task that lasts gets the next call's spare started beside it; a short
            # one's starts after the reply, not competing with the call for a core.
            self.spares.prepare()
            elapsed_ms = (time.monotonic() - started) * 1000
            estimate = reported if reported is not None else elapsed_ms / task.estimated_time * 100
            task.progress = int(min(99, max(0, estimate)))
            self.listener.task_progress(self.run, task)

        request = RunTask(key=call.key, name=call.name, index=task.index, attempt=attempt,
                          max_result=self.options.max_result)
        def output(stream: str, lines: list[str]) -> None:
            task.keep_output(stream, lines)
            self.listener.task_output(self.run, task, stream, lines)

        span = AttemptSpan(attempt, time.time())
        task.attempt_spans.append(span)
        if attempt > 1:  # where the next attempt's lines start in the report's tail
            task.keep_output("runner", [f"--- attempt {attempt} ---"])
        with task_workdir(self.options, self.run.run_id, task.index, attempt) as cwd:
            request.setup = process_setup(self.options, limits, cwd)
            supervisor = TaskSupervisor(
                self.launcher, self.loop, limits, output,
                tick, self.options.progress_interval, stop_reason,
                full_tracebacks=self.options.full_tracebacks, fault=self._fault,
            )
            try:
                outcome = supervisor.run(request, channel.task_end.fileno(), self.spares.take(),
                                         lambda: channel.task_has_it(flow, attempt))
            finally:
                channel.close()
                self._retire(supervisor.leftover)
            receipt = channel.handed_over and await_receipt(self.loop, flow, stop_reason,
                                                            self._time_left)
            if receipt:
                outcome = with_receipt(outcome, receipt, call.name)
        span.ended_at, span.note = time.time(), outcome.note()
        ended = TaskState.COMPLETED if outcome.passed else TaskState.FAILED
        span.state = shown_state(ended, span.note)
        task.traceback = outcome.traceback
        # A stack dump is on the task's stderr already; a raised exception's traceback
        # is only in its final frame.
        if outcome.kind is Kind.RAISED and task.traceback and not self._cancelled_here():
            self.listener.task_traceback(self.run, task)
        return outcome

    def _retire(self, child: ChildProcess | None) -> None:
        """A finished task process, killed but perhaps still exiting (page tables of a
        big process take a while): its exit is awaited off the critical path."""
        if child is not None:
            self._retiring.append(child)

    def _settle_retired(self) -> None:
        """Before the next task: the processes earlier tasks started are gone (the
        fork server reports an exit once a task's whole tree is). A task process that
        started none is not waited for: its own exit costs the next task nothing."""
        for child in self._retiring:
            if child.left_behind:
                child.await_exit()
        for child in [c for c in self._retiring if c.exited()]:
            child.close()
            self._retiring.remove(child)

    def _await_retired(self) -> None:
        while self._retiring:
            self._retiring.pop().stop()

    def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.cancel_reason():
            self.loop.poll(end - time.monotonic())

    def _record_outcome(self, task: TaskRecord, outcome: Outcome, announce: bool = True) -> None:
        """The task's final fields; `announce`: tell the listeners now (else `_announce`)."""
        task.ended_at = time.time()
        task.duration_ms = int((task.ended_at - (task.started_at or task.ended_at)) * 1000)
        task.peak_rss = outcome.peak_rss or None
        task.note = outcome.note()
        task.traceback = "" if outcome.passed else outcome.traceback
        task.table = outcome.table
        task.passed = outcome.passed
        task.state = TaskState.COMPLETED if outcome.passed else TaskState.FAILED
        task.progress = 100 if outcome.passed else task.progress
        if self._cancelled_here():
            return  # the backend no longer wants this run: report nothing more
        if not outcome.passed:
            self._crucial_failed = self._crucial_failed or task.crucial_pass
        if announce:
            self._announce(task, outcome)

    def _announce(self, task: TaskRecord, outcome: Outcome) -> None:
        if self._cancelled_here():
            return
        if not outcome.passed:
            # Ctrl-C is not the task's fault: the summary says so without alarm.
            crucial = task.crucial_pass and outcome.kind is not Kind.INTERRUPTED
            level = "error" if crucial else "warning"
            kind = "crucial" if task.crucial_pass else "non-crucial"
            self.log(f"Task '{task.name}' ({kind}) failed: {task.note}", level)
        self.listener.task_finished(self.run, task)

    def _reply(self, task: TaskRecord, outcome: Outcome) -> TaskReply:
        name = task.name
        if outcome.kind is Kind.COMPLETED:
            return TaskReply(action="return", task_name=name)
        if outcome.kind is Kind.NOT_PASSED and not task.crucial_pass:
            return TaskReply(action="return", task_name=name)
        if not task.crucial_pass:
            return TaskReply(action="return_none", task_name=name)
        note = clip(task.note, NOTE_MAX)  # a crash note quotes stderr lines of any length
        if outcome.kind is Kind.RAISED and outcome.has_value:
            return TaskReply(action="raise", task_name=name, note=note)
        return TaskReply(action="fail", task_name=name, note=note)

    # --- end of the flow --------------------------------------------------

    def _flow_ended(self, message: object) -> None:
        if isinstance(message, FlowFinished):
            return
        if isinstance(message, FlowRaised):
            if self._crucial_failed:
                return  # the crucial task's own failure, passing through the body
            self.log(f"Flow body raised:\n{message.traceback.rstrip()}", "error")
            self._fail_flow(f"flow body raised {message.exc_type}: {message.message}")
        else:
            self._fail_flow(f"flow process sent an unexpected {message.TYPE} frame")

    def _flow_died(self, flow: ChildProcess) -> None:
        self._fail_flow(flow_death_note(flow))

    def _on_cancelled(self) -> None:
        kind, reason = self._cancel or (Kind.CANCELLED, "")
        if kind is Kind.FLOW_TIMEOUT:
            self._fail_flow(f"flow timed out after {reason} s")
        elif kind is Kind.WORKER_STOPPED:
            self._fail_flow("worker stopped")
        elif kind is Kind.RUNNER_FAULT:
            self._fail_flow(reason)
        else:
            prefix = INTERRUPTED_BY if kind is Kind.INTERRUPTED else "cancelled: "
            self.run.note = prefix + reason
            self._crucial_failed = True

    def _fail_flow(self, note: str) -> None:
        """Report a failure of the flow itself as one more crucial task."""
        self.run.note = note
        if self._crucial_failed:
            self.log(f"Flow failed: {note}", "error")  # its task already told the rest
            return
        task = TaskRecord(index=len(self.run.tasks), name=FLOW_TASK_NAME, state=TaskState.RUNNING,
                          started_at=time.time(), crucial_pass=True)
        self.run.tasks.append(task)
        self.listener.task_started(self.run, task)
        self._record_outcome(task, Outcome(Kind.UNSENDABLE, detail=note))

    # --- containment ------------------------------------------------------

    def _contain(self, exc: Exception) -> None:
        """Something broke while handling this run: it alone fails, its processes die."""
        note = f"the runner failed while handling this run: {describe_exception(exc)}"
        log.error("run %s: %s", self.run.run_id, note, exc_info=exc)
        self.listener.tripped = True  # from now on the end of the run must get through
        with self._lock:
            if self._cancel is None or self._cancel[0] is not Kind.CANCELLED:
                self._cancel = (Kind.RUNNER_FAULT, note)
        self._kill_everything()
        self._announce_pending()
        for task in self.run.tasks:
            if task.state in (TaskState.RUNNING, TaskState.RETRYING):
                self._record_outcome(task, Outcome(Kind.RUNNER_FAULT, detail=note))
        self._fail_flow(note)

    def _kill_everything(self) -> None:
        """Whatever the unwinding left: spare, flow process, retired task processes."""
        for step in (self.spares.discard, self._stop_flow, self._await_retired):
            try:
                step()
            except Exception:  # noqa: BLE001 - the next step must still run
                log.exception("run %s: could not stop all of its processes", self.run.run_id)

    def _stop_flow(self) -> None:
        flow, self._flow = self._flow, None
        if flow is not None:
            flow.stop()

    def _fault(self, place: str) -> None:
        fault_point(place, self.run.flow_name, self.run.run_id)

    # --- the end ----------------------------------------------------------

    def _settle(self) -> None:
        """The run's final state, and the runner's last line about it."""
        self.run.ended_at = time.time()
        failed = any(t.state == TaskState.FAILED and t.crucial_pass for t in self.run.tasks)
        self.run.state = TaskState.FAILED if failed or self._cancel else TaskState.COMPLETED
        self.run.not_run = not_run_calls(self.run.declared_tasks,
                                         (task.name for task in self.run.tasks))
        duration = self.run.ended_at - (self.run.started_at or self.run.ended_at)
        if not self._cancelled_here():
            verdict = "finished" if self.run.state == TaskState.COMPLETED else "FAILED"
            if self.run.note.startswith(INTERRUPTED_BY):
                verdict = "interrupted"
            level = "info" if self.run.state == TaskState.COMPLETED else "error"
            self.log(f"Flow {verdict}: {self.run.flow_name} ({len(self.run.tasks)} tasks, "
                     f"{duration:.1f} s)", level)

    def _announce_end(self) -> None:
        # Past this point the run's state is final: a listener failing now can only be
        # logged (the others got the end of the run; see FanOut).
        try:
            self.listener.run_finished(self.run)
        except Exception:  # noqa: BLE001
            log.exception("run %s: a listener failed at the end of the run", self.run.run_id)

    # --- helpers ----------------------------------------------------------

    def _cancelled_here(self) -> bool:
        """The backend stopped this run: nothing more is reported to it."""
        return self._cancel is not None and self._cancel[0] is Kind.CANCELLED

    def log(self, line: str, level: str = "info") -> None:
        self.listener.runner_log(self.run, line, level)

    def _flow_output(self, stream: str, lines: list[str]) -> None:
        if stream == "stderr":
            lines = self._flow_dumps.feed(lines)  # a crash dump of the flow process
        if lines:
            self.listener.task_output(self.run, None, stream, lines)


def _option(value: Any, default: Any) -> Any:
    """A task's own option when it set one (0 included), else the worker-wide default."""
    return default if value is None else value
