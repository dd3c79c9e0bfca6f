"""Frames on a child's channel: encode, decode and check them, read and write them.

The wire format and the messages are `protocol`'s; this module turns them into
bytes and back. Everything decoded here from a child is checked against its
message's schema and its sender's role before anyone sees it; see
`decode_header`.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import MISSING, fields
from typing import Any

from .oskit import recv_with_fds
from .protocol import (
    DEFAULT_MAX_BLOB,
    MAX_BLOB,
    MAX_HEADER,
    PREFIX,
    SENDS,
    ChannelClosed,
    Message,
    ProtocolError,
)
from .schema import describe


def encode_frame(message: Message, blob: bytes = b"", max_blob: int = DEFAULT_MAX_BLOB) -> bytes:
    return frame_head(message, len(blob), max_blob) + blob


def frame_head(message: Message, blob_len: int, max_blob: int = DEFAULT_MAX_BLOB) -> bytes:
    """Prefix and header of a frame; sent before the blob, a big blob is never copied."""
    header = encode_header(message)
    if len(header) > MAX_HEADER:
        raise ProtocolError(f"{message.TYPE} header of {len(header)} bytes exceeds {MAX_HEADER}")
    if blob_len > max_blob:
        raise ProtocolError(f"{message.TYPE} payload of {blob_len} bytes exceeds {max_blob}")
    return PREFIX.pack(len(header), blob_len) + header


def encode_header(message: Message) -> bytes:
    return _ENCODER.encode(message.header()).encode()


def decode_header(raw: bytes, sender: str | None = None) -> Message:
    """The message in a header, checked against its schema and the `sender`'s role.

    Frames from the control process are not checked field by field: a child
    trusts its supervisor (a control process that lies has lost already), and
    the check would cost every task process ~0.2 ms of copy-on-write faults on
    the pages it touches.
    """
    data = _parse_json(raw)
    name = data.pop("type", None)
    cls = Message.registry.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown frame type {describe(name)}")
    if sender is not None and cls not in SENDS[sender]:
        raise ProtocolError(f"a {sender} process may not send {cls.TYPE} frames")
    if sender != "control":
        _check_fields(cls, data)
    try:
        return cls(**data)
    except TypeError as exc:  # a field missing or unknown (checked above for children)
        raise ProtocolError(f"{cls.TYPE} frame: {exc}") from None


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        data = _DECODER.decode(raw.decode())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"malformed frame header: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"malformed frame header: {describe(data)}, not a JSON object")
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Made once: json.dumps/loads with options build a new coder on every call, which in
# a freshly forked task process also means copy-on-write faults.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _check_fields(cls: type[Message], data: dict[str, Any]) -> None:
    unknown = sorted(set(data) - set(cls.SCHEMA))
    if unknown:
        raise ProtocolError(f"{cls.TYPE} frame has unknown keys: {describe(unknown, 80)}")
    missing = [f.name for f in _required(cls) if f.name not in data]
    if missing:
        raise ProtocolError(f"{cls.TYPE} frame lacks {', '.join(missing)}")
    for key, value in data.items():
        if (wanted := cls.SCHEMA[key].problem(value)) is not None:
            raise ProtocolError(f"{cls.TYPE}.{key} must be {wanted}, got {describe(value)}")


@functools.cache
def _required(cls: type[Message]) -> list[Any]:
    return [f for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


class FrameReader:
    """Incremental parser: feed it bytes as they arrive, take whole, checked frames out.

    Used by the control process on non-blocking sockets; needs no process to test.
    `sender` is the role whose frames these are ("task" or "flow"): see `SENDS`.
    """

    def __init__(self, max_blob: int = DEFAULT_MAX_BLOB, sender: str | None = None,
                 blobs: bool = True) -> None:
        """`blobs=False`: any blob is an error (children send payloads elsewhere)."""
        self.max_blob = max_blob
        self.sender = sender
        self.blobs = blobs
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[Message, bytes]]:
        self._buffer += data
        while len(self._buffer) >= PREFIX.size:
            header_len, blob_len = PREFIX.unpack_from(self._buffer)
            self._check_sizes(header_len, blob_len)
            end = PREFIX.size + header_len + blob_len
            if len(self._buffer) < end:
                return
            with memoryview(self._buffer) as view:  # one copy of a big blob, not two
                header = bytes(view[PREFIX.size : PREFIX.size + header_len])
                blob = bytes(view[PREFIX.size + header_len : end])
            del self._buffer[:end]
            yield decode_header(header, self.sender), blob

    def pending(self) -> int:
        """Bytes of an unfinished frame (non-zero at EOF means a truncated frame)."""
        return len(self._buffer)

    def _check_sizes(self, header_len: int, blob_len: int) -> None:
        if header_len > MAX_HEADER:
            raise ProtocolError(f"frame header of {header_len} bytes exceeds {MAX_HEADER}")
        if blob_len > self.max_blob:
            raise ProtocolError(f"frame payload of {blob_len} bytes exceeds {self.max_blob}")
        if blob_len and not self.blobs:
            raise ProtocolError(f"frame payload of {blob_len} bytes on its channel "
                                "(payloads go on the payload channel)")


def send_message(sock: socket.socket, message: Message, blob: bytes = b"",
                 max_blob: int = DEFAULT_MAX_BLOB) -> None:
    sock.sendall(encode_frame(message, blob, max_blob))


def recv_message(sock: socket.socket, max_blob: int = MAX_BLOB,
                 sender: str | None = None) -> tuple[Message, bytes]:
    """Blocking read of one frame (child side: from the control process)."""
    message, blob, fds = recv_message_fds(sock, max_blob, sender)
    for fd in fds:
        os.close(fd)
    return message, blob


def recv_message_fds(sock: socket.socket, max_blob: int = MAX_BLOB, sender: str | None = None,
                     max_fds: int = 1) -> tuple[Message, bytes, list[int]]:
    """`recv_message`, and the fds sent with the frame (close-on-exec; the caller owns them)."""
    prefix, fds = recv_with_fds(sock, PREFIX.size, max_fds)
    if not prefix:
        raise ChannelClosed(f"channel closed after 0 of {PREFIX.size} bytes of frame prefix")
    try:
        prefix += recv_exact(sock, PREFIX.size - len(prefix), "frame prefix")
        header_len, blob_len = PREFIX.unpack(prefix)
        FrameReader(max_blob)._check_sizes(header_len, blob_len)
        header = recv_exact(sock, header_len, "frame header")
        blob = recv_exact(sock, blob_len, "frame payload")
        return decode_header(header, sender), blob, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def recv_exact(sock: socket.socket, size: int, what: str) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise ChannelClosed(f"channel closed after {len(chunks)} of {size} bytes of {what}")
        chunks += chunk
    return bytes(chunks)
