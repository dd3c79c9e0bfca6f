"""Child side of the task channel: run one task call and send one final frame.

See `protocol` for the conversation. Everything the task produces is pickled
here and unpickled only in the flow process; the control process gets the
JSON summary in the frame header.
"""

from __future__ import annotations

import pickle
import resource
import signal
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
from .child_bootstrap import SOFT_STOP_SIGNAL, apply_setup
from .protocol import (
    Message,
    Progress,
    RunTask,
    TaskRaised,
    TaskReturned,
    TaskUnsendable,
    recv_message,
    send_message,
)
from .tracebacks import format_exception

NOTE_LIMIT = 4000


class TaskRuntime:
    """Installed while the task runs: carries report_progress pings to the parent."""

    def __init__(self, chan: socket.socket, lock: threading.Lock) -> None:
        self._chan = chan
        self._lock = lock
        self._last = -1

    def call_task(self, task: TaskDefinition, args: tuple, kwargs: dict) -> Any:
        # A task calling another task runs it inline: it is already isolated.
        return task.func(*args, **kwargs)

    def report_progress(self, percent: float) -> None:
        value = max(0, min(100, int(percent)))
        if value == self._last:
            return
        self._last = value
        with self._lock:
            send_message(self._chan, Progress(percent=value))


def _soft_stop(signum: int, frame: object) -> None:
    raise TaskTimeout("the task's time limit was reached")


def run_task(chan: socket.socket) -> int:
    signal.signal(SOFT_STOP_SIGNAL, _soft_stop)
    request, blob = recv_message(chan)
    if not isinstance(request, RunTask):
        raise TypeError(f"expected run_task, got {request.TYPE}")
    apply_setup(request.setup)
    lock = threading.Lock()
    reply, reply_blob = _execute(request, blob, TaskRuntime(chan, lock))
    sys.stdout.flush()
    sys.stderr.flush()
    reply.peak_rss = _peak_rss()
    with lock:
        send_message(chan, reply, reply_blob, max_blob=request.max_result)
    return 0


def _peak_rss() -> int:
    usage = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return usage * 1024


def _execute(request: RunTask, blob: bytes, task_runtime: TaskRuntime) -> tuple[Message, bytes]:
    definition = get_registry().tasks.get(request.key)
    if definition is None:
        return TaskUnsendable(note=f"task {request.name!r} is not defined at import time of "
                              "its module; define tasks at module top level"), b""
    try:
        args, kwargs = pickle.loads(blob)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported
        return TaskUnsendable(note=f"arguments of task {request.name!r} could not be "
                              f"unpickled: {type(exc).__name__}: {exc}"), b""
    runtime.install(task_runtime)
    try:
        value = definition.func(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt: task failures
        return _raised(exc, bool(request.setup.get("full_tracebacks")))
    finally:
        runtime.install(None)
    return _returned(request, value)


def _returned(request: RunTask, value: Any) -> tuple[Message, bytes]:
    try:
        blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - name the type, not pickle's internals
        return TaskUnsendable(note=f"result of task {request.name!r} could not be pickled: "
                              f"{type(value).__name__} ({type(exc).__name__}: {exc})"), b""
    if len(blob) > request.max_result:
        size = format_size(len(blob), is_decimal(request.max_result))
        return TaskUnsendable(note=f"result of task {request.name!r} is {size}, over the "
                              f"result size cap of {format_limit(request.max_result)}"), b""
    return summarize(value), blob


def summarize(value: Any) -> TaskReturned:
    """The JSON summary the control process reports from (never the object itself)."""
    if isinstance(value, TaskResult):
        table = json_safe(value.table)
        return TaskReturned(
            result_type="TaskResult", is_task_result=True, passed=bool(value.passed),
            note=str(json_safe(value.note))[:NOTE_LIMIT],
            table=table if isinstance(table, list) else [table],
        )
    return TaskReturned(result_type=type(value).__name__)


def _raised(exc: BaseException, full: bool) -> tuple[Message, bytes]:
    message = TaskRaised(exc_type=type(exc).__name__, message=_safe_str(exc)[:NOTE_LIMIT],
                         traceback=format_exception(exc, full))
    try:
        pickling_support.install(exc)
        blob = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)  # an exception that pickles but cannot unpickle is no use
    except Exception:  # noqa: BLE001 - the flow process gets the text instead
        blob = b""
    return message, blob


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(exc).__name__}>"



