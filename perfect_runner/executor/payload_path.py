"""The control process's part in a payload channel: make it, hand it out, hear the receipt.

Each attempt of a task call gets a fresh socketpair (see `protocol`). Its task
end goes with the RunTask; its flow end went ahead with the StartFlow or the
previous TaskReply (a call's first attempt: the flow process writes the
arguments as it calls, off the critical path) or goes with a PayloadChannel
frame (a retry). The control process closes its copies as soon as both are
out and never reads them. The attempt's outcome then waits for the flow
process's PayloadReceived: a task whose final frame promised a value the flow
process did not get whole broke the protocol.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import replace

from ..isolation.child_process import ChildProcess
from ..isolation.outcome import Kind, Outcome
from ..isolation.protocol import Message, PayloadChannel, PayloadReceived
from ..isolation.selector_loop import SelectorLoop


class PayloadPair:
    """One attempt's payload channel, held here only until both children have their end."""

    def __init__(self) -> None:
        self.flow_end, self.task_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.handed_over = False  # the flow process has its end: a receipt is due once used

    def give_flow(self, flow: ChildProcess, message: Message) -> None:
        """Send `message` to the flow process with its end attached."""
        self.handed_over = flow.send(message, (self.flow_end.fileno(),))
        self.flow_end.close()

    def task_has_it(self, flow: ChildProcess, attempt: int) -> None:
        """The task's RunTask went out; a retry's flow end goes now (a first attempt's is there)."""
        self.task_end.close()
        if not self.handed_over:
            self.give_flow(flow, PayloadChannel(attempt=attempt))

    def close(self) -> None:
        self.task_end.close()
        self.flow_end.close()


class ChannelAhead:
    """The payload channel the flow process holds for its next call's first attempt."""

    def __init__(self) -> None:
        self.pair: PayloadPair | None = None

    def flow_fds(self) -> tuple[int, ...]:
        """A new channel for the flow process's first frame (StartFlow)."""
        self.drop()
        self.pair = PayloadPair()
        return (self.pair.flow_end.fileno(),)

    def sent(self) -> None:
        """The first frame went out with it."""
        if self.pair is not None:
            self.pair.flow_end.close()
            self.pair.handed_over = True

    def give_with(self, flow: ChildProcess, message: Message) -> None:
        """Send `message` with a new channel; one left unused (the arguments could not
        be sent) is closed: the flow process drops its end when the new one comes."""
        self.drop()
        self.pair = PayloadPair()
        self.pair.give_flow(flow, message)

    def take(self, args_error: str) -> PayloadPair | None:
        """The channel a CallTask's first attempt uses (none when its arguments failed)."""
        if args_error:
            return None
        pair, self.pair = self.pair, None
        return pair

    def drop(self) -> None:
        if self.pair is not None:
            self.pair.close()
            self.pair = None


def await_receipt(loop: SelectorLoop, flow: ChildProcess,
                  stop: Callable[[], object], time_left: Callable[[], float | None]
                  ) -> PayloadReceived | None:
    """The flow process's receipt; None when the flow is over or the run stops first."""
    while not flow.over and not stop():
        # Mid-call the flow process may send nothing else (`Conversation`).
        if flow.frames and isinstance(flow.frames[0][0], PayloadReceived):
            return flow.frames.popleft()[0]
        loop.poll(time_left())
    return None


def with_receipt(outcome: Outcome, receipt: PayloadReceived, name: str) -> Outcome:
    """`outcome` as the receipt of task `name` leaves it: a value the flow process
    holds, one it cannot unpickle, or a broken promise."""
    if outcome.kind in (Kind.COMPLETED, Kind.NOT_PASSED):
        if receipt.note or not receipt.size:
            what = receipt.note or "it sent an empty payload"
            return replace(outcome, kind=Kind.PROTOCOL,
                           detail=f"its result did not reach the flow process: {what}")
        if receipt.error:
            return replace(outcome, kind=Kind.UNSENDABLE,
                           detail=f"result of task {name!r} could not be unpickled in the "
                                  f"flow process: {receipt.error}")
        outcome.has_value = True
    elif outcome.kind is Kind.RAISED:
        outcome.has_value = not receipt.note and not receipt.error and receipt.size > 0
    return outcome
