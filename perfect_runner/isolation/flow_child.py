"""Child side of the flow channel: run the flow body, ship each task call out.

The flow body runs here, never in the control process. Each task call becomes
a CallTask frame; the reply says what the call evaluates to (see
`protocol.TaskReply`). Only this process unpickles task results.
"""

from __future__ import annotations

import pickle
import socket
import sys
import threading
from typing import Any

from ..sdk import runtime
from ..sdk.errors import TaskFailed
from ..sdk.registry import TaskDefinition, get_registry
from ..sdk.units import format_limit, format_size, is_decimal
from .child_bootstrap import apply_setup
from .protocol import (
    NAME_MAX,
    NOTE_MAX,
    TRACEBACK_MAX,
    CallTask,
    FlowFinished,
    FlowRaised,
    StartFlow,
    TaskReply,
    clip,
    recv_message,
    send_message,
)
from .task_child import safe_str
from .tracebacks import format_exception


class FlowRuntime:
    """Installed while the flow body runs: each task call goes to the control process."""

    def __init__(self, chan: socket.socket, max_result: int) -> None:
        self._chan = chan
        self._max_result = max_result
        # Task calls from several threads of a flow body run one at a time, and the
        # final frame waits for a call in flight (the protocol forbids anything else).
        self.lock = threading.Lock()

    def call_task(self, task: TaskDefinition, args: tuple, kwargs: dict) -> Any:
        with self.lock:
            sys.stdout.flush()
            sys.stderr.flush()
            self._send_call(task, args, kwargs)
            reply, blob = recv_message(self._chan, sender="control")
        if not isinstance(reply, TaskReply):
            raise TypeError(f"expected task_reply, got {reply.TYPE}")
        return _evaluate(reply, blob)

    def report_progress(self, percent: float) -> None:
        pass  # progress belongs to tasks, not to the flow body

    def _send_call(self, task: TaskDefinition, args: tuple, kwargs: dict) -> None:
        try:
            blob = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - name the argument type, not pickle internals
            bad = _unpicklable_part(args, kwargs)
            self._send_refusal(task, f"arguments of task {task.name!r} could not be pickled: "
                               f"{bad} ({type(exc).__name__}: {exc})")
            return
        if len(blob) > self._max_result:
            size = format_size(len(blob), is_decimal(self._max_result))
            self._send_refusal(task, f"arguments of task {task.name!r} are {size}, "
                               f"over the result size cap of {format_limit(self._max_result)}")
            return
        send_message(self._chan, CallTask(key=task.key, name=task.name), blob, self._max_result)

    def _send_refusal(self, task: TaskDefinition, note: str) -> None:
        send_message(self._chan, CallTask(key=task.key, name=task.name,
                                          args_error=clip(note, NOTE_MAX)))


def _evaluate(reply: TaskReply, blob: bytes) -> Any:
    if reply.action == "return":
        return pickle.loads(blob)
    if reply.action == "return_none":
        return None
    if reply.action == "raise" and blob:
        try:
            exc = pickle.loads(blob)
        except Exception:  # noqa: BLE001 - fall back to the note
            exc = None
        if isinstance(exc, BaseException):
            raise exc
    raise TaskFailed(reply.task_name, reply.note)


def _unpicklable_part(args: tuple, kwargs: dict) -> str:
    for position, value in [*enumerate(args), *kwargs.items()]:
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001
            return f"argument {position!r} of type {type(value).__name__}"
    return "the arguments"


def run_flow(chan: socket.socket) -> int:
    start, _ = recv_message(chan, sender="control")
    if not isinstance(start, StartFlow):
        raise TypeError(f"expected start_flow, got {start.TYPE}")
    apply_setup(start.setup)
    definition = get_registry().flows[start.flow_name]
    flow_runtime = FlowRuntime(chan, start.max_result)
    runtime.install(flow_runtime)
    try:
        definition.func()
    except BaseException as exc:  # noqa: BLE001 - the flow body's failure is reported, not raised
        outcome: FlowFinished | FlowRaised = FlowRaised(
            exc_type=clip(type(exc).__name__, NAME_MAX), message=clip(safe_str(exc), 4000),
            traceback=format_exception(
                exc, bool(start.setup.get("full_tracebacks")))[-TRACEBACK_MAX:])
    else:
        outcome = FlowFinished()
    finally:
        runtime.install(None)
    sys.stdout.flush()
    sys.stderr.flush()
    with flow_runtime.lock:
        send_message(chan, outcome)
    return 0

