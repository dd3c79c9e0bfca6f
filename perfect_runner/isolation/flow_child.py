"""Child side of the flow channel: run the flow body, ship each task call out.

The flow body runs here, never in the control process. Each task call becomes
a CallTask frame; for each attempt the control process hands over a payload
channel, on which the arguments go to the task process and its value comes
back (see `payload`); the reply says what the call evaluates to (see
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
from .framing import recv_message_fds, send_message
from .payload import PayloadError, Pickled, Received, pickled, recv_payload, send_payload
from .process_setup import apply_setup
from .protocol import (
    NAME_MAX,
    NOTE_MAX,
    TRACEBACK_MAX,
    CallTask,
    FlowFinished,
    FlowRaised,
    PayloadChannel,
    PayloadReceived,
    StartFlow,
    TaskReply,
    clip,
)
from .task_child import safe_str
from .tracebacks import format_exception


class FlowRuntime:
    """Installed while the flow body runs: each task call goes to the control process."""

    def __init__(self, chan: socket.socket, max_result: int, fds: list[int]) -> None:
        self._chan = chan
        self._max_result = max_result
        self._ahead: socket.socket | None = None  # the next call's first payload channel
        self._take_ahead(fds)
        # Task calls from several threads of a flow body run one at a time, and the
        # final frame waits for a call in flight (the protocol forbids anything else).
        self.lock = threading.Lock()

    def call_task(self, task: TaskDefinition, args: tuple, kwargs: dict) -> Any:
        with self.lock:
            sys.stdout.flush()
            sys.stderr.flush()
            payload = self._send_call(task, args, kwargs)
            received = None  # what the last attempt's payload channel brought
            if payload is not None and self._ahead is not None:
                channel, self._ahead = self._ahead, None
                received = self._exchange(1, channel, payload)  # the first attempt's
            while True:
                reply, _, fds = recv_message_fds(self._chan, sender="control")
                if not isinstance(reply, PayloadChannel) or payload is None:
                    break
                received = self._exchange(reply.attempt, _socket(fds), payload)
            if not isinstance(reply, TaskReply):
                raise TypeError(f"expected task_reply, got {reply.TYPE}")
            self._take_ahead(fds)
        return _evaluate(reply, received)

    def _take_ahead(self, fds: list[int]) -> None:
        """The channel for the next call's first attempt (it replaces an unused one)."""
        if self._ahead is not None:
            self._ahead.close()
        self._ahead = _socket(fds) if fds else None

    def report_progress(self, percent: float) -> None:
        pass  # progress belongs to tasks, not to the flow body

    def _send_call(self, task: TaskDefinition, args: tuple, kwargs: dict) -> Pickled | None:
        """Send the CallTask; the pickled arguments, or None when they cannot be sent."""
        try:
            payload = pickled((args, kwargs))
        except Exception as exc:  # noqa: BLE001 - name the argument type, not pickle internals
            bad = _unpicklable_part(args, kwargs)
            self._send_refusal(task, f"arguments of task {task.name!r} could not be pickled: "
                               f"{bad} ({type(exc).__name__}: {exc})")
            return None
        if payload.size > self._max_result:
            size = format_size(payload.size, is_decimal(self._max_result))
            self._send_refusal(task, f"arguments of task {task.name!r} are {size}, "
                               f"over the result size cap of {format_limit(self._max_result)}")
            return None
        send_message(self._chan, CallTask(key=task.key, name=task.name))
        return payload

    def _send_refusal(self, task: TaskDefinition, note: str) -> None:
        send_message(self._chan, CallTask(key=task.key, name=task.name,
                                          args_error=clip(note, NOTE_MAX)))

    def _exchange(self, attempt: int, sock: socket.socket, payload: Pickled) -> Received:
        """One attempt: the arguments out, the task's payload in, the receipt to the control."""
        received, note = Received(), ""
        with sock:
            try:
                send_payload(sock, payload)
                received = recv_payload(sock, self._max_result)
            except PayloadError as exc:
                note = str(exc)
        error = received.error
        send_message(self._chan, PayloadReceived(
            attempt=attempt, size=received.size, note=clip(note, NOTE_MAX),
            error=clip(f"{type(error).__name__}: {safe_str(error)}", NOTE_MAX) if error else ""))
        return received


def _socket(fds: list[int]) -> socket.socket:
    if not fds:
        raise TypeError("a payload channel frame came without its channel")
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fds[0])


def _evaluate(reply: TaskReply, received: Received | None) -> Any:
    if reply.action == "return":
        if received is None or not received.size:
            raise TaskFailed(reply.task_name, reply.note or "its result did not arrive")
        if received.error is not None:
            raise received.error  # as unpickling the value in the flow body would
        return received.value
    if reply.action == "return_none":
        return None
    if reply.action == "raise" and received is not None:
        if isinstance(received.value, BaseException):
            raise received.value
    raise TaskFailed(reply.task_name, reply.note)


def _unpicklable_part(args: tuple, kwargs: dict) -> str:
    for position, value in [*enumerate(args), *kwargs.items()]:
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001
            return f"argument {position!r} of type {type(value).__name__}"
    return "the arguments"


def run_flow(chan: socket.socket) -> int:
    start, _, fds = recv_message_fds(chan, sender="control")
    if not isinstance(start, StartFlow):
        raise TypeError(f"expected start_flow, got {start.TYPE}")
    apply_setup(start.setup)
    definition = get_registry().flows[start.flow_name]
    flow_runtime = FlowRuntime(chan, start.max_result, fds)
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

