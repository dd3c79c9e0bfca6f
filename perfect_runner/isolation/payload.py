"""The payload channel: pickled bytes straight between a flow and a task process.

Child side only: the control process creates the channel (a socketpair, one
end to each child, see `protocol`) and never reads it. On it each side sends
exactly one payload, the flow process first (the call's pickled (args,
kwargs)), then the task process (its pickled return value or exception, or
an empty payload when it has neither)::

    +-----------------+----------------------------+
    | size, uint64 BE | `size` bytes of one pickle |
    +-----------------+----------------------------+

The sender pickles into a list of parts: the pickler hands big bytes and
bytearrays over by reference, so the size (and any pickling error) is known
before a byte is sent, without copying the value. The receiver refuses a
size over its cap from the prefix alone, then unpickles straight from the
socket (a big bytes object is read into place, not buffered first), and
reads exactly `size` bytes whatever the pickle says.
"""

from __future__ import annotations

import pickle
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from ..sdk.units import format_limit
from .framing import recv_exact
from .protocol import ChannelClosed

SIZE = struct.Struct(">Q")
SMALL = 256 * 1024  # read whole, then unpickle: fewer system calls than streaming
DRAIN = 1 << 20


class PayloadError(Exception):
    """The payload did not arrive whole: the peer closed early, or sent too much."""


@dataclass
class Pickled:
    """A value pickled to `parts` (frames, and big buffers by reference)."""

    parts: list[Any] = field(default_factory=list)
    size: int = 0

    def write(self, data: Any) -> int:  # the pickler's file
        self.parts.append(data)
        size = memoryview(data).nbytes
        self.size += size
        return size


def pickled(value: Any) -> Pickled:
    """`value` pickled without copying its big buffers; raises what pickling raises."""
    out = Pickled()
    pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return out


@dataclass
class Received:
    """What came in: `size` bytes, their value, or the error unpickling them raised."""

    size: int = 0
    value: Any = None
    error: BaseException | None = None


def send_payload(sock: socket.socket, payload: Pickled) -> None:
    """Send one payload; PayloadError when the peer is gone."""
    try:
        if payload.size <= SMALL:  # one system call for the usual small payload
            sock.sendall(b"".join([SIZE.pack(payload.size), *payload.parts]),
                         socket.MSG_NOSIGNAL)
            return
        sock.sendall(SIZE.pack(payload.size), socket.MSG_NOSIGNAL)
        for part in payload.parts:
            sock.sendall(part, socket.MSG_NOSIGNAL)
    except OSError as exc:
        raise PayloadError(f"the other side closed the payload channel ({exc.strerror})") \
            from None


def recv_payload(sock: socket.socket, cap: int) -> Received:
    """Receive one payload of at most `cap` bytes; PayloadError when it is not whole."""
    try:
        (size,) = SIZE.unpack(recv_exact(sock, SIZE.size, "payload size"))
        if size > cap:
            raise PayloadError(f"a payload of {size:,} bytes exceeds the result size cap of "
                               f"{format_limit(cap)}")
        received = Received(size)
        if size == 0:
            return received
        reader = _Reader(sock, size)
        try:
            if size <= SMALL:
                data, reader.left = recv_exact(sock, size, "payload"), 0
                received.value = pickle.loads(data)
            else:
                received.value = pickle.Unpickler(reader).load()
        except (ChannelClosed, PayloadError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - the receiver decides what it means
            received.error = exc
        reader.drain()
        return received
    except ChannelClosed as exc:
        raise PayloadError(f"the other side closed the payload channel: {exc}") from None
    except OSError as exc:
        raise PayloadError(f"the payload channel failed: {exc.strerror}") from None


class _Reader:
    """The unpickler's file: exactly `left` more bytes of the socket, never one more."""

    def __init__(self, sock: socket.socket, size: int) -> None:
        self.sock = sock
        self.size = size
        self.left = size

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if len(view) > self.left:
            raise PayloadError(f"the pickle reads past its {self.size:,} bytes")
        got = 0
        while got < len(view):
            count = self.sock.recv_into(view[got:], min(len(view) - got, 1 << 24))
            if not count:
                raise PayloadError(f"the other side closed the payload channel after "
                                   f"{self.size - self.left + got:,} of {self.size:,} bytes")
            got += count
        self.left -= got
        return got

    def read(self, size: int = -1) -> bytes:
        wanted = self.left if size < 0 else min(size, self.left)
        buffer = bytearray(wanted)
        self.readinto(buffer)
        return bytes(buffer)

    def readline(self) -> bytes:
        line = bytearray()
        while self.left and not line.endswith(b"\n"):
            line += self.read(1)
        return bytes(line)

    def drain(self) -> None:
        """Read what the pickle left unread (a failed unpickling, trailing bytes)."""
        scratch = bytearray(min(self.left, DRAIN))
        while self.left:
            self.readinto(memoryview(scratch)[:min(self.left, DRAIN)])
