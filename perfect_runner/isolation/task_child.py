"""Child side of the task channel: run one task call and send one final frame.

See `protocol` for the conversation. The arguments come from the flow process
on the payload channel sent with RunTask; everything the task produces is
pickled here, goes back on that channel (see `payload`) and is unpickled only
in the flow process; the control process gets the JSON summary in the frame
header.
"""

from __future__ import annotations

import _signal
import os
import pickle
import resource
import select
import socket
import sys
import threading
from typing import Any

from tblib import pickling_support

from ..jsonsafe import json_safe
from ..sdk import runtime
from ..sdk.errors import TaskTimeout
from ..sdk.registry import TaskDefinition, get_registry
from ..sdk.result import TaskResult
from ..sdk.units import format_limit, format_size, is_decimal
from .framing import decode_header, encode_frame, encode_header, recv_message_fds, send_message
from .oskit import recv_with_fds
from .payload import PayloadError, Pickled, pickled, recv_payload, send_payload
from .process_setup import apply_setup
from .protocol import (
    MAX_HEADER,
    NAME_MAX,
    NOTE_MAX,
    PREFIX,
    SOFT_STOP_SIGNAL,
    TRACEBACK_MAX,
    Message,
    Progress,
    RunTask,
    TaskRaised,
    TaskReturned,
    TaskUnsendable,
    clip,
)
from .tracebacks import format_exception

NOTE_LIMIT = 4000  # a TaskResult's note, as the backend shows it


class TaskRuntime:
    """Installed while the task runs: carries report_progress pings to the parent."""

    def __init__(self, chan: socket.socket, lock: threading.Lock) -> None:
        self._chan = chan
        self._lock = lock
        self._last = -1
        self.closed = False  # the final frame went: a late ping would break the protocol

    def call_task(self, task: TaskDefinition, args: tuple, kwargs: dict) -> Any:
        # A task calling another task runs it inline: it is already isolated.
        return task.func(*args, **kwargs)

    def report_progress(self, percent: float) -> None:
        value = max(0, min(100, int(percent)))
        if value == self._last:
            return
        self._last = value
        with self._lock:
            if not self.closed:
                send_message(self._chan, Progress(percent=value))


def _soft_stop(signum: int, frame: object) -> None:
    raise TaskTimeout("the task's time limit was reached")


def run_task(chan: socket.socket) -> int:
    _signal.signal(SOFT_STOP_SIGNAL, _soft_stop)  # C-level: no enum wrapping to touch
    if not select.select([chan], [], [], 0)[0]:  # the channel is fd 3: select suffices
        rehearse(chan)  # a spare: nobody waits for it yet
    request, _, fds = recv_message_fds(chan, sender="control")
    if not isinstance(request, RunTask) or not fds:
        raise TypeError(f"expected run_task with its payload channel, got {request.TYPE}")
    apply_setup(request.setup)
    lock = threading.Lock()
    task_runtime = TaskRuntime(chan, lock)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fds[0]) as payload_channel:
        reply, payload = _execute(request, payload_channel, task_runtime)
        sys.stdout.flush()
        sys.stderr.flush()
        reply.peak_rss = _peak_rss()
        frame, payload = final_frame(request, reply, payload)
        try:
            send_payload(payload_channel, payload)  # before the final frame: see `protocol`
        except PayloadError:
            pass  # the flow process is gone or closed its end: its receipt says so
    with lock:
        chan.sendall(frame)
        task_runtime.closed = True
    return 0


def rehearse(chan: socket.socket) -> None:
    """Walk the call's own path once with stand-in data, before the call comes.

    The first receive, decode, pickle and encode in a fresh child touch pages it
    shares with the fork server (copy-on-write faults) and fill first-use
    caches: a few hundred microseconds that a spare spends here, while nobody
    waits, instead of on the call's critical path. Nothing is sent and no setup
    is applied (dropping capabilities must wait for the real one); the receive
    only peeks at the channel, so a RunTask that came meanwhile stays there.
    """
    try:
        _, fds = recv_with_fds(chan, 1, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        for fd in fds:  # a peek at a RunTask installs copies of its fds
            os.close(fd)
    except BlockingIOError:
        pass
    request = decode_header(encode_header(RunTask(key="rehearsal", name="rehearsal", index=0)),
                            sender="control")
    args, kwargs = pickle.loads(b"".join(pickled(((), {})).parts))
    runtime.install(TaskRuntime(chan, threading.Lock()))
    runtime.install(None)
    reply, payload = _returned(request, _no_op(*args, **kwargs))
    reply.peak_rss = _peak_rss()
    final_frame(request, reply, payload)


def _no_op() -> None:
    return None


def final_frame(request: RunTask, reply: Message, payload: Pickled) -> tuple[bytes, Pickled]:
    """The frame for `reply` and its payload, or what stands in for them when too big."""
    if payload.size > request.max_result and isinstance(reply, TaskRaised):
        payload = Pickled()  # the flow process gets the exception's text instead
    try:
        header = encode_header(reply)
    except ValueError as exc:  # an int too long for JSON, say
        return _unsendable(reply, f"result of task {request.name!r}: its note and table "
                           f"cannot be sent as JSON ({exc})")
    size = len(header)
    if size > MAX_HEADER:
        return _unsendable(reply, f"result of task {request.name!r}: its note and table take "
                           f"{format_size(size)} as JSON, over the cap of "
                           f"{format_size(MAX_HEADER)} for a "
                           "result summary; return fewer or smaller rows")
    return PREFIX.pack(size, 0) + header, payload


def _unsendable(reply: Message, note: str) -> tuple[bytes, Pickled]:
    stand_in = TaskUnsendable(note=clip(note, NOTE_MAX), peak_rss=getattr(reply, "peak_rss", 0))
    return encode_frame(stand_in), Pickled()


def _peak_rss() -> int:
    usage = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return usage * 1024


def _execute(request: RunTask, channel: socket.socket,
             task_runtime: TaskRuntime) -> tuple[Message, Pickled]:
    # The arguments are read first, whatever follows: the flow process is writing them.
    try:
        received = recv_payload(channel, request.max_result)
    except PayloadError as exc:
        return _refused(f"arguments of task {request.name!r} did not arrive whole: {exc}")
    definition = get_registry().tasks.get(request.key)
    if definition is None:
        return _refused(f"task {request.name!r} is not defined at import time "
                        "of its module; define tasks at module top level")
    try:
        if received.error is not None:
            raise received.error
        args, kwargs = received.value
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported
        return _refused(f"arguments of task {request.name!r} could not be "
                        f"unpickled: {type(exc).__name__}: {exc}")
    runtime.install(task_runtime)
    try:
        value = definition.func(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt: task failures
        return _raised(exc, bool(request.setup.get("full_tracebacks")))
    finally:
        runtime.install(None)
    return _returned(request, value)


def _refused(note: str) -> tuple[Message, Pickled]:
    return TaskUnsendable(note=clip(note, NOTE_MAX)), Pickled()


def _returned(request: RunTask, value: Any) -> tuple[Message, Pickled]:
    try:
        payload = pickled(value)
    except Exception as exc:  # noqa: BLE001 - name the type, not pickle's internals
        return _refused(f"result of task {request.name!r} could not be pickled: "
                        f"{type(value).__name__} ({type(exc).__name__}: {exc})")
    if payload.size > request.max_result:
        size = format_size(payload.size, is_decimal(request.max_result))
        return _refused(f"result of task {request.name!r} is {size}, over the "
                        f"result size cap of {format_limit(request.max_result)}")
    return summarize(value), payload


def summarize(value: Any) -> TaskReturned:
    """The JSON summary the control process reports from (never the object itself)."""
    if isinstance(value, TaskResult):
        table = json_safe(value.table)
        rows = table if isinstance(table, list) else [table]
        return TaskReturned(
            result_type="TaskResult", is_task_result=True, passed=bool(value.passed),
            note=str(json_safe(value.note))[:NOTE_LIMIT],
            # The protocol carries rows as JSON objects; a bare value is shown as one.
            table=[row if isinstance(row, dict) else {"value": row} for row in rows],
        )
    return TaskReturned(result_type=clip(type(value).__name__, NAME_MAX))


def _raised(exc: BaseException, full: bool) -> tuple[Message, Pickled]:
    message = TaskRaised(exc_type=clip(type(exc).__name__, NAME_MAX),
                         message=safe_str(exc)[:NOTE_LIMIT],
                         traceback=format_exception(exc, full)[-TRACEBACK_MAX:])
    try:
        pickling_support.install(exc)
        blob = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)  # an exception that pickles but cannot unpickle is no use
    except Exception:  # noqa: BLE001 - the flow process gets the text instead
        return message, Pickled()
    return message, Pickled([blob], len(blob))


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(exc).__name__}>"



