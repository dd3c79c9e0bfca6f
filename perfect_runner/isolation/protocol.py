"""The wire protocol between the control process and its children.

Channels
--------
Every flow process and every task process gets one *channel*: a Unix stream
socket to the control process, on a file descriptor of its own, separate from
fds 1 and 2. Output written to fds 1/2 is plain text on pipes and is never
parsed for messages, so nothing a task prints can be mistaken for a message.

Frames
------
Each message is one frame::

    +----------------+----------------+-------------------+--------------+
    | header length  | blob length    | header            | blob         |
    | uint32, BE     | uint32, BE     | UTF-8 JSON object | opaque bytes |
    +----------------+----------------+-------------------+--------------+

The header is a JSON object with a ``"type"`` key naming one of the message
classes below; the other keys are that class's fields. The blob carries pickled
bytes (task arguments, a return value, an exception). The control process
reads headers only: it never unpickles a blob, it hands blobs on unchanged.
Headers are capped at `MAX_HEADER` bytes; blobs at the result cap the control
process sets (default 64 MiB). `encode_frame` refuses oversized frames and the
reader rejects them before buffering them.

Who speaks when
---------------
Task channel::

    control -> task   RunTask (blob: pickled (args, kwargs))        exactly once,
                      may be sent long after the process started (a
                      warm spare): its `setup` (environment, cwd,
                      limits, user) is applied only then
    task -> control   Progress                                       0..n times
    task -> control   TaskReturned (blob: pickled return value)   } exactly one,
                      | TaskRaised (blob: pickled exception)      } then exit 0
                      | TaskUnsendable (no blob)                  }

A task process that exits without its final frame lost its result, whatever
its exit code. Once the final frame is in, the task is over: the supervisor
does not wait for the process to exit (it kills what is left of its tree, and
the fork server reaps it), so exiting is off the task call's critical path.

Flow channel::

    control -> flow   StartFlow                                      exactly once
    flow -> control   CallTask (blob: pickled (args, kwargs))        0..n times,
    control -> flow   TaskReply (blob: see `TaskReply.action`)       alternating
    flow -> control   FlowFinished | FlowRaised                      then exit 0

The flow process sends a CallTask only after it got the reply to the previous
one (flow bodies call tasks one at a time).
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

PREFIX = struct.Struct(">II")
MAX_HEADER = 4 * 1024 * 1024
DEFAULT_MAX_BLOB = 64 * 1024 * 1024


class ProtocolError(Exception):
    """A frame that breaks the rules above (oversized, not JSON, unknown type)."""


class ChannelClosed(ProtocolError):
    """The other side closed the channel in the middle of a frame or before one."""


@dataclass
class Message:
    """Base of every message; `type` names the subclass on the wire."""

    TYPE: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Message]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Message.registry[cls.TYPE] = cls

    def header(self) -> dict[str, Any]:
        # Shallow: fields are JSON values already, and this runs twice per task.
        return {"type": self.TYPE, **self.__dict__}


# --- task channel -------------------------------------------------------------


@dataclass
class RunTask(Message):
    """Run the task `key`; the blob holds pickled (args, kwargs)."""

    TYPE: ClassVar[str] = "run_task"
    key: str
    name: str
    index: int
    attempt: int = 1
    max_result: int = DEFAULT_MAX_BLOB
    setup: dict[str, Any] = field(default_factory=dict)  # see child_bootstrap.ProcessSetup


@dataclass
class Progress(Message):
    """The task's own progress figure, 0..100 (from report_progress)."""

    TYPE: ClassVar[str] = "progress"
    percent: float


@dataclass
class TaskReturned(Message):
    """The task returned; the blob is the pickled value, the rest a JSON summary."""

    TYPE: ClassVar[str] = "task_returned"
    result_type: str
    is_task_result: bool = False
    passed: bool = True
    note: str = ""
    table: list[Any] = field(default_factory=list)
    peak_rss: int = 0  # bytes, the task process and its reaped children


@dataclass
class TaskRaised(Message):
    """The task raised; the blob is the pickled exception (tblib), may be empty."""

    TYPE: ClassVar[str] = "task_raised"
    exc_type: str
    message: str
    traceback: str
    peak_rss: int = 0


@dataclass
class TaskUnsendable(Message):
    """The task finished but its arguments or result could not cross the boundary."""

    TYPE: ClassVar[str] = "task_unsendable"
    note: str
    peak_rss: int = 0


# --- flow channel -------------------------------------------------------------


@dataclass
class StartFlow(Message):
    """Run the flow body of `flow_name`."""

    TYPE: ClassVar[str] = "start_flow"
    flow_name: str
    run_id: str
    setup: dict[str, Any] = field(default_factory=dict)  # see child_bootstrap.ProcessSetup


@dataclass
class CallTask(Message):
    """The flow body called task `key`; the blob holds pickled (args, kwargs).

    `args_error` is set instead of a blob when the arguments could not be pickled.
    """

    TYPE: ClassVar[str] = "call_task"
    key: str
    name: str
    args_error: str = ""


@dataclass
class TaskReply(Message):
    """What the task call evaluates to in the flow body.

    action: "return" (blob: pickled value), "return_none", "raise" (blob: pickled
    exception), or "fail" (raise TaskFailed with `note`).
    """

    TYPE: ClassVar[str] = "task_reply"
    action: str
    task_name: str
    note: str = ""


@dataclass
class FlowFinished(Message):
    """The flow body returned."""

    TYPE: ClassVar[str] = "flow_finished"


@dataclass
class FlowRaised(Message):
    """The flow body raised (possibly a crucial task's failure passing through)."""

    TYPE: ClassVar[str] = "flow_raised"
    exc_type: str
    message: str
    traceback: str


# --- framing ------------------------------------------------------------------


def encode_frame(message: Message, blob: bytes = b"", max_blob: int = DEFAULT_MAX_BLOB) -> bytes:
    header = json.dumps(message.header(), separators=(",", ":")).encode()
    if len(header) > MAX_HEADER:
        raise ProtocolError(f"{message.TYPE} header of {len(header)} bytes exceeds {MAX_HEADER}")
    if len(blob) > max_blob:
        raise ProtocolError(f"{message.TYPE} payload of {len(blob)} bytes exceeds {max_blob}")
    return PREFIX.pack(len(header), len(blob)) + header + blob


def decode_header(raw: bytes) -> Message:
    try:
        data = json.loads(raw)
        cls = Message.registry[data.pop("type")]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"malformed frame header: {exc!r}") from None


class FrameReader:
    """Incremental parser: feed it bytes as they arrive, take whole frames out.

    Used by the control process on non-blocking sockets; needs no process to test.
    """

    def __init__(self, max_blob: int = DEFAULT_MAX_BLOB) -> None:
        self.max_blob = max_blob
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[Message, bytes]]:
        self._buffer += data
        while len(self._buffer) >= PREFIX.size:
            header_len, blob_len = PREFIX.unpack_from(self._buffer)
            self._check_sizes(header_len, blob_len)
            end = PREFIX.size + header_len + blob_len
            if len(self._buffer) < end:
                return
            header = bytes(self._buffer[PREFIX.size : PREFIX.size + header_len])
            blob = bytes(self._buffer[PREFIX.size + header_len : end])
            del self._buffer[:end]
            yield decode_header(header), blob

    def pending(self) -> int:
        """Bytes of an unfinished frame (non-zero at EOF means a truncated frame)."""
        return len(self._buffer)

    def _check_sizes(self, header_len: int, blob_len: int) -> None:
        if header_len > MAX_HEADER:
            raise ProtocolError(f"frame header of {header_len} bytes exceeds {MAX_HEADER}")
        if blob_len > self.max_blob:
            raise ProtocolError(f"frame payload of {blob_len} bytes exceeds {self.max_blob}")


def send_message(sock: socket.socket, message: Message, blob: bytes = b"",
                 max_blob: int = DEFAULT_MAX_BLOB) -> None:
    sock.sendall(encode_frame(message, blob, max_blob))


def recv_message(sock: socket.socket, max_blob: int = DEFAULT_MAX_BLOB) -> tuple[Message, bytes]:
    """Blocking read of one frame (child side)."""
    header_len, blob_len = PREFIX.unpack(_recv_exact(sock, PREFIX.size, "frame prefix"))
    FrameReader(max_blob)._check_sizes(header_len, blob_len)
    header = _recv_exact(sock, header_len, "frame header")
    blob = _recv_exact(sock, blob_len, "frame payload")
    return decode_header(header), blob


def _recv_exact(sock: socket.socket, size: int, what: str) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise ChannelClosed(f"channel closed after {len(chunks)} of {size} bytes of {what}")
        chunks += chunk
    return bytes(chunks)
