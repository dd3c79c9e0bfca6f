"""The control process's view of one running child (flow or task process).

It owns the parent ends of the child's pipes and channel, turns output bytes
into lines and channel bytes into messages, and learns of the exit from the
pidfd. It never unpickles anything: blobs are kept as bytes.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable

from .child_bootstrap import ChildConfig
from .launcher import ChildHandle, ExitInfo, Launcher, LaunchError
from .lines import DEFAULT_MAX_LINE, LineSplitter
from .oskit import close_quietly
from .proctree import kill_tree
from .protocol import DEFAULT_MAX_BLOB, FrameReader, Message, ProtocolError, encode_frame
from .selector_loop import SelectorLoop

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1024 * 1024
READ_SIZE = 1024 * 1024
OutputHandler = Callable[[str, list[str]], None]


class ChildProcess:
    """Spawned via `start`; register with a loop; `exit` is set once it is gone."""

    def __init__(self, launcher: Launcher, config: ChildConfig, loop: SelectorLoop,
                 on_output: OutputHandler, max_blob: int = DEFAULT_MAX_BLOB,
                 max_line: int = DEFAULT_MAX_LINE, stderr_tail: int = 5,
                 first_frame: tuple[Message, bytes] | None = None) -> None:
        self.loop = loop
        self.on_output = on_output
        self.frames: deque[tuple[Message, bytes]] = deque()
        self.protocol_error = ""
        self.exit: ExitInfo | None = None
        self.stderr_tail: deque[str] = deque(maxlen=stderr_tail)
        self._reader = FrameReader(max_blob)
        self._splitters = {"stdout": LineSplitter(max_line), "stderr": LineSplitter(max_line)}
        self._max_blob = max_blob
        self._greeting = encode_frame(*first_frame, max_blob) if first_frame else b""
        self.handle = self._spawn(launcher, config)
        self.pid = self.handle.pid
        self._register()

    def _spawn(self, launcher: Launcher, config: ChildConfig) -> ChildHandle:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        chan, chan_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The first frame waits in the socket buffer, so the child reads it at once
        # instead of waiting for us to hear that it exists.
        self._greeting = self._greeting[_send_some(chan, self._greeting):]
        for fd in (out_r, err_r):
            _enlarge_pipe(fd)
        try:
            handle = launcher.spawn(config, (out_w, err_w, chan_child.fileno()))
        except LaunchError:
            for fd in (out_r, err_r):
                os.close(fd)
            chan.close()
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
            chan_child.close()
        self._fds = {"stdout": out_r, "stderr": err_r}
        self.chan = chan
        if self._greeting:
            self._send_raw(self._greeting)
        return handle

    def _register(self) -> None:
        for stream, fd in self._fds.items():
            os.set_blocking(fd, False)
            self.loop.add(fd, lambda s=stream: self._read_output(s))
        self.chan.setblocking(False)
        self.loop.add(self.chan, self._read_channel)
        self.loop.add(self.handle.pidfd, self._on_exit)

    def send(self, message: Message, blob: bytes = b"") -> bool:
        """Send a frame; False when the child is already gone."""
        return self._send_raw(encode_frame(message, blob, self._max_blob))

    def _send_raw(self, data: bytes) -> bool:
        try:
            self.chan.setblocking(True)
            self.chan.sendall(data)
            return True
        except OSError:
            return False
        finally:
            self.chan.setblocking(False)

    @property
    def running(self) -> bool:
        return self.exit is None

    def _read_output(self, stream: str) -> bool:
        fd = self._fds[stream]
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return True
        if not data:
            self._flush_partial(stream)
            return False
        self._emit(stream, self._splitters[stream].feed(data))
        return True

    def _emit(self, stream: str, lines: list[str]) -> None:
        if not lines:
            return
        if stream == "stderr":
            self.stderr_tail.extend(_telling(lines[-20:]))
        self.on_output(stream, lines)

    def _flush_partial(self, stream: str) -> None:
        self._emit(stream, self._splitters[stream].finish())

    def _read_channel(self) -> bool:
        try:
            data = self.chan.recv(READ_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        try:
            self.frames.extend(self._reader.feed(data))
        except ProtocolError as exc:
            self.protocol_error = str(exc)
            return False
        return True

    def _on_exit(self) -> bool:
        self.exit = self.handle.exit_info(timeout=5.0)
        return False

    def drain(self) -> None:
        """Read what is left in the pipes and channel without waiting for EOF."""
        for stream, fd in self._fds.items():
            while fd >= 0 and _readable(fd) and self._read_output(stream):
                pass
        while self.chan.fileno() >= 0 and _readable(self.chan.fileno()) and self._read_channel():
            pass
        for stream in self._fds:
            self._flush_partial(stream)

    def stop(self, timeout: float = 5.0) -> None:
        """Kill its tree, wait for its exit (so nothing outlives us), drain, close."""
        kill_tree(self.pid)
        end = time.monotonic() + timeout
        while self.running and time.monotonic() < end:
            self.loop.poll(end - time.monotonic())
        self.drain()
        self.close()

    def close_io(self) -> None:
        """Close pipes and channel; the pidfd stays watched until the process is gone."""
        for fd in self._fds.values():
            if fd >= 0:
                self.loop.remove(fd)
                close_quietly(fd)
        self._fds = {"stdout": -1, "stderr": -1}
        self.loop.remove(self.chan)
        self.chan.close()

    def close(self) -> None:
        self.close_io()
        self.loop.remove(self.handle.pidfd)
        self.handle.close()


def _send_some(sock: socket.socket, data: bytes) -> int:
    """Write what fits without blocking; how many bytes went."""
    if not data:
        return 0
    sock.setblocking(False)
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def _telling(lines: list[str]) -> list[str]:
    """Lines worth quoting in a note: not blank, not the runner's own stack frames,
    not the headers of a faulthandler dump (the note already names the signal)."""
    return [line.strip() for line in lines if line.strip()
            and "perfect_runner/" not in line and "<frozen runpy>" not in line
            and not line.startswith(("Fatal Python error", "Current thread", "Thread 0x"))]


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _enlarge_pipe(fd: int) -> None:
    # Fewer wakeups per MB of output; the kernel may refuse (pipe-max-size), fine.
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
