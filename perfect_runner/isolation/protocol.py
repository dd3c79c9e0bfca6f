"""The wire protocol between the control process and its children.

Channels
--------
Every flow process and every task process gets one *channel*: a Unix stream
socket to the control process, on a file descriptor of its own, separate from
fds 1 and 2. Output written to fds 1/2 is plain text on pipes and is never
parsed for messages, so nothing a task prints can be mistaken for a message.

Each attempt of a task call also gets a *payload channel*: a Unix stream
socketpair the control process creates and hands out, one end to the flow
process and one to the task process (with RunTask), as SCM_RIGHTS ancillary
data on the first byte of a frame; it closes its copies unread as soon as
both are out. Pickled bytes (the call's arguments, the task's return value
or exception) go only there, straight between the two children: see `payload`
for what is on it. The control process sees only headers and JSON summaries.

Frames
------
Each message on a channel is one frame::

    +----------------+----------------+-------------------+--------------+
    | header length  | blob length    | header            | blob         |
    | uint32, BE     | uint32, BE     | UTF-8 JSON object | opaque bytes |
    +----------------+----------------+-------------------+--------------+

The header is a JSON object with a ``"type"`` key naming one of the message
classes below; the other keys are that class's fields. The blob is always
empty between the control process and its children (payloads go on the
payload channel); a child's frame with a blob is refused from its prefix.
The control process reads headers only and never unpickles anything.
`framing.encode_frame` refuses oversized frames (see Sizes) and the reader rejects
them before buffering them.

Who speaks when
---------------
Task channel::

    control -> task   RunTask (fd: its end of the payload channel)  exactly once,
                      may be sent long after the process started (a
                      warm spare): its `setup` (environment, cwd,
                      limits, user) is applied only then
    task -> control   Progress                                       0..n times
    task -> control   TaskReturned | TaskRaised | TaskUnsendable     exactly one,
                                                                     then exit 0

Before its final frame, the task process reads the arguments from its payload
channel and writes exactly one payload back: the pickled return value
(TaskReturned), the pickled exception (TaskRaised; empty when the exception
cannot cross), or an empty one (TaskUnsendable). A task process that exits
without its final frame lost its result, whatever its exit code. Once the
final frame is in, the task is over: the supervisor does not wait for the
process to exit (it kills what is left of its tree, and the fork server reaps
it), so exiting is off the task call's critical path. Its payload is in the
flow process's socket buffer by then: killing the task loses none of it.

Flow channel::

    control -> flow   StartFlow (fd: a payload channel)              exactly once
    flow -> control   CallTask                                       0..n times, each:
    flow -> control     PayloadReceived (attempt 1)                  unless args_error
    control -> flow     PayloadChannel (fd)                          0..n times (retries),
    flow -> control     PayloadReceived                              each then its receipt
    control -> flow     TaskReply (fd: a payload channel)            once, ends the call
    flow -> control   FlowFinished | FlowRaised                      then exit 0

StartFlow and every TaskReply carry the payload channel of the next call's
first attempt (a new one replaces one left unused), so the flow process
writes a call's arguments as soon as it sent the CallTask, and the task finds
them waiting when its RunTask comes. A retry's channel comes in a
PayloadChannel frame, after the retry's RunTask went out. On each channel the
flow process writes the arguments, reads the task's payload (unpickling it as
it arrives) and answers PayloadReceived: its size, a note when it did not
arrive whole (the peer closed early, its size is over the cap), and the error
when it does not unpickle. The control process waits for that receipt before
it answers or starts the next attempt, closing the task's end first when no
task will read it: a task whose final frame promised a value the flow process
did not get broke the protocol; one the flow process cannot unpickle is
unsendable. The flow process sends a CallTask only after it got the reply to
the previous one (flow bodies call tasks one at a time), and its final frame
only when no call is waiting for its reply.

Validation
----------
A child is untrusted: its frames are data to check, never to act on as they
come. `framing.decode_header` checks every header against its class's `SCHEMA`
(declared next to the class: the type, range and size of every field; no
missing or unknown keys; strict JSON, so no NaN or Infinity) and against the
role of the sender (`TASK_SENDS`, `FLOW_SENDS`); `Conversation` checks the
turn-taking above (nothing before the first frame went out, nothing after a
final frame, no second CallTask before its reply, a PayloadReceived only for
the payload channel it was given). Any of that, or an oversized or garbled
frame, is a `ProtocolError`: the control process kills the child's tree at
once, closes the channel unread and fails the attempt with "broke the runner
protocol: <what>" (a flow process's: the run). A frame cut short by the
child's exit is not an error of its own: the exit says more. Whatever a child
writes on a payload channel reaches only the other child, which checks it; a
flow process that never writes its arguments, or never sends its receipt,
holds only its own run, until its timeout or a cancel, like any stuck body.
The other way round, a child trusts its supervisor: frames from the control
process are decoded without the field checks (each would cost every task
process copy-on-write faults), only their type and role are checked.

Sizes
-----
Payloads are capped at the result cap the user set (`--max-result-size`,
default 64 MiB, at most `MAX_BLOB`), by both children: the sender checks the
size of what it pickled and reports a value that is too big with its size and
the cap (CallTask.args_error, TaskUnsendable); the receiver refuses a bigger
payload from its size prefix alone. The control process refuses a frame with
a blob, or one over the cap, from its prefix. Headers are capped at
`MAX_HEADER`: a child whose result summary (note and table) does not fit
sends TaskUnsendable saying so.
"""

from __future__ import annotations

import signal
import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .schema import Check, Choice, Flag, Integer, JsonObject, Number, Table, Text

# How a child ends and is signalled, known to both sides. Exit codes at or above
# EXIT_BOOTSTRAP are the runner's own, so a task's os._exit(3) is told from them.
EXIT_BOOTSTRAP = 120  # the runner's child code failed before or after the task
EXIT_CHANNEL_LOST = 121  # the control process went away mid-conversation
STACK_DUMP_SIGNAL = signal.SIGUSR1
SOFT_STOP_SIGNAL = signal.SIGUSR2

PREFIX = struct.Struct(">II")
MAX_HEADER = 4 * 1024 * 1024
MAX_BLOB = (1 << 32) - 1  # what a 32-bit length can say
DEFAULT_MAX_BLOB = 64 * 1024 * 1024

NAME_MAX = 64 * 1024  # flow and task names and keys, type names (characters)
NOTE_MAX = 32 * 1024  # notes and exception messages
TRACEBACK_MAX = 20_000
BYTES = Integer(0, (1 << 63) - 1)


class ProtocolError(Exception):
    """A frame that breaks the rules above (oversized, not JSON, unknown type)."""


class ChannelClosed(ProtocolError):
    """The other side closed the channel in the middle of a frame or before one."""


@dataclass
class Message:
    """Base of every message; `type` names the subclass on the wire."""

    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[dict[str, Check]] = {}  # field -> check, every field listed
    FINAL: ClassVar[bool] = False  # the sender's last frame
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
    """Run the task `key`; its arguments come on the payload channel sent with it."""

    TYPE: ClassVar[str] = "run_task"
    SCHEMA: ClassVar[dict[str, Check]] = {
        "key": Text(NAME_MAX), "name": Text(NAME_MAX), "index": Integer(0, 1 << 31),
        "attempt": Integer(1, 1 << 31), "max_result": Integer(0, MAX_BLOB),
        "setup": JsonObject()}
    key: str
    name: str
    index: int
    attempt: int = 1
    max_result: int = DEFAULT_MAX_BLOB
    setup: dict[str, Any] = field(default_factory=dict)  # see process_setup.ProcessSetup


@dataclass
class Progress(Message):
    """The task's own progress figure, 0..100 (from report_progress)."""

    TYPE: ClassVar[str] = "progress"
    SCHEMA: ClassVar[dict[str, Check]] = {"percent": Number(0, 100)}
    percent: float


@dataclass
class TaskReturned(Message):
    """The task returned (its pickled value went on the payload channel): a JSON summary."""

    TYPE: ClassVar[str] = "task_returned"
    SCHEMA: ClassVar[dict[str, Check]] = {
        "result_type": Text(NAME_MAX), "is_task_result": Flag(), "passed": Flag(),
        "note": Text(NOTE_MAX), "table": Table(), "peak_rss": BYTES}
    FINAL: ClassVar[bool] = True
    result_type: str
    is_task_result: bool = False
    passed: bool = True
    note: str = ""
    table: list[Any] = field(default_factory=list)  # rows: JSON objects
    peak_rss: int = 0  # bytes, the task process and its reaped children


@dataclass
class TaskRaised(Message):
    """The task raised; its pickled exception (tblib) went on the payload channel, if it could."""

    TYPE: ClassVar[str] = "task_raised"
    SCHEMA: ClassVar[dict[str, Check]] = {
        "exc_type": Text(NAME_MAX), "message": Text(NOTE_MAX),
        "traceback": Text(TRACEBACK_MAX), "peak_rss": BYTES}
    FINAL: ClassVar[bool] = True
    exc_type: str
    message: str
    traceback: str
    peak_rss: int = 0


@dataclass
class TaskUnsendable(Message):
    """The task finished but its arguments or result could not cross the boundary."""

    TYPE: ClassVar[str] = "task_unsendable"
    SCHEMA: ClassVar[dict[str, Check]] = {"note": Text(NOTE_MAX), "peak_rss": BYTES}
    FINAL: ClassVar[bool] = True
    note: str
    peak_rss: int = 0


# --- flow channel -------------------------------------------------------------


@dataclass
class StartFlow(Message):
    """Run the flow body of `flow_name`; task arguments may pickle to `max_result` bytes."""

    TYPE: ClassVar[str] = "start_flow"
    SCHEMA: ClassVar[dict[str, Check]] = {
        "flow_name": Text(NAME_MAX), "run_id": Text(NAME_MAX),
        "max_result": Integer(0, MAX_BLOB), "setup": JsonObject()}
    flow_name: str
    run_id: str
    max_result: int = DEFAULT_MAX_BLOB
    setup: dict[str, Any] = field(default_factory=dict)  # see process_setup.ProcessSetup


@dataclass
class CallTask(Message):
    """The flow body called task `key`; its arguments go on each attempt's payload channel.

    `args_error` says why the arguments cannot be sent (no attempt runs then).
    """

    TYPE: ClassVar[str] = "call_task"
    SCHEMA: ClassVar[dict[str, Check]] = {
        "key": Text(NAME_MAX), "name": Text(NAME_MAX), "args_error": Text(NOTE_MAX)}
    key: str
    name: str
    args_error: str = ""


@dataclass
class TaskReply(Message):
    """What the task call evaluates to in the flow body.

    action: "return" (the value the last payload channel brought), "return_none",
    "raise" (the exception the last payload channel brought), or "fail" (raise
    TaskFailed with `note`).
    """

    TYPE: ClassVar[str] = "task_reply"
    SCHEMA: ClassVar[dict[str, Check]] = {
        "action": Choice(("return", "return_none", "raise", "fail")),
        "task_name": Text(NAME_MAX), "note": Text(NOTE_MAX)}
    action: str
    task_name: str
    note: str = ""


@dataclass
class PayloadChannel(Message):
    """Attempt `attempt` of the call runs: its payload channel is the fd sent with this."""

    TYPE: ClassVar[str] = "payload_channel"
    SCHEMA: ClassVar[dict[str, Check]] = {"attempt": Integer(1, 1 << 31)}
    attempt: int


@dataclass
class PayloadReceived(Message):
    """The flow process's receipt for a payload channel: what came back on it.

    `size`: bytes of the task's payload; `note`: why it did not arrive whole ("" if
    it did); `error`: why it arrived whole but does not unpickle ("" if it does).
    """

    TYPE: ClassVar[str] = "payload_received"
    SCHEMA: ClassVar[dict[str, Check]] = {
        "attempt": Integer(1, 1 << 31), "size": BYTES, "note": Text(NOTE_MAX),
        "error": Text(NOTE_MAX)}
    attempt: int
    size: int = 0
    note: str = ""
    error: str = ""


@dataclass
class FlowFinished(Message):
    """The flow body returned."""

    TYPE: ClassVar[str] = "flow_finished"
    FINAL: ClassVar[bool] = True


@dataclass
class FlowRaised(Message):
    """The flow body raised (possibly a crucial task's failure passing through)."""

    TYPE: ClassVar[str] = "flow_raised"
    SCHEMA: ClassVar[dict[str, Check]] = {
        "exc_type": Text(NAME_MAX), "message": Text(NOTE_MAX), "traceback": Text(TRACEBACK_MAX)}
    FINAL: ClassVar[bool] = True
    exc_type: str
    message: str
    traceback: str


# --- who may send what --------------------------------------------------------

TASK_SENDS = frozenset({Progress, TaskReturned, TaskRaised, TaskUnsendable})
FLOW_SENDS = frozenset({CallTask, PayloadReceived, FlowFinished, FlowRaised})
SENDS = {"task": TASK_SENDS, "flow": FLOW_SENDS,
         "control": frozenset({RunTask, StartFlow, PayloadChannel, TaskReply})}


def clip(text: str, limit: int) -> str:
    """`text` cut to fit a field of `limit` characters (child side: never send too much)."""
    marker = " ... [cut]"
    return text if len(text) <= limit else text[:limit - len(marker)] + marker


class Conversation:
    """The turn-taking of one channel, as the control process sees it (see the spec).

    `sent` records our frames; `received` raises ProtocolError for a child's frame
    that comes out of turn.
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self.started = False  # our first frame (RunTask / StartFlow) went out
        self.awaiting_reply = False  # the flow's CallTask has no TaskReply yet
        self.receipt_due: int | None = None  # the attempt whose PayloadReceived is due
        self.channel_ahead = False  # the flow holds the next call's first payload channel
        self.finished = False  # the child's final frame came in

    def sent(self, message: Message, with_fd: bool = False) -> None:
        if isinstance(message, RunTask | StartFlow):
            self.started = True
        if isinstance(message, StartFlow | TaskReply):
            self.channel_ahead = with_fd
        if isinstance(message, PayloadChannel):
            self.receipt_due = message.attempt
        elif isinstance(message, TaskReply):
            self.awaiting_reply = False

    def received(self, message: Message) -> None:
        if self.finished:
            raise ProtocolError(f"{message.TYPE} frame after its final frame")
        if not self.started:
            raise ProtocolError(f"{message.TYPE} frame before it was given its work")
        if isinstance(message, PayloadReceived):
            if message.attempt != self.receipt_due:
                raise ProtocolError(f"payload_received frame for attempt {message.attempt}, "
                                    "which has no payload channel awaiting its receipt")
            self.receipt_due = None
            return
        if self.awaiting_reply:
            raise ProtocolError(f"{message.TYPE} frame while its task call awaits its reply")
        self.awaiting_reply = isinstance(message, CallTask)
        if isinstance(message, CallTask) and not message.args_error and self.channel_ahead:
            self.receipt_due, self.channel_ahead = 1, False  # it uses the channel it holds
        self.finished = message.FINAL


def _check_schemas() -> None:
    # A field without a check would be trusted unseen: refuse to import instead.
    for cls in Message.registry.values():
        names = {f.name for f in fields(cls)}
        if names != set(cls.SCHEMA):
            raise TypeError(f"{cls.__name__}.SCHEMA must list {sorted(names)}")


_check_schemas()
