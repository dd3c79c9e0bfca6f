"""The control process's view of one running child (flow or task process).

It owns the parent ends of the child's pipes and channel, turns output bytes
into lines and channel bytes into checked messages, and learns of the exit
from the fork server's report, which comes once the child's whole tree is
gone (never blocking: the report socket is watched by the loop). Every send
is bounded (`SEND_WAIT`): a child that stops reading breaks the protocol.
It never unpickles anything, and never sees a payload: those
go on payload channels whose ends it only passes on (see `protocol`).

A child that breaks the protocol (see `protocol`: a frame that fails its
checks, comes out of turn or is too big) is done at once: its channel is
closed, unread, and its tree is killed, so a child blocked writing to us
cannot hang the run; `protocol_error` says what it did.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections import deque
from collections.abc import Callable

from .child_bootstrap import ChildConfig
from .framing import FrameReader, encode_frame
from .launcher import ExitInfo, Launcher, LaunchError, PendingChild
from .lines import DEFAULT_MAX_LINE, LineSplitter
from .oskit import close_quietly, readable, send_with_fds
from .proctree import descendants, kill_tree
from .protocol import DEFAULT_MAX_BLOB, Conversation, Message, ProtocolError
from .selector_loop import SelectorLoop
from .tracebacks import is_dump_line

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1024 * 1024
READ_SIZE = 1024 * 1024
SEND_WAIT = 10.0  # seconds a child may leave a frame we send it unread
OutputHandler = Callable[[str, list[str]], None]


class ChildProcess:
    """Spawned via `start`; register with a loop; `exit` is set once it is gone."""

    def __init__(self, launcher: Launcher, config: ChildConfig, loop: SelectorLoop,
                 on_output: OutputHandler, max_blob: int = DEFAULT_MAX_BLOB,
                 max_line: int = DEFAULT_MAX_LINE, stderr_tail: int = 5,
                 first_frame: Message | None = None, first_fds: tuple[int, ...] = (),
                 deferred: bool = False) -> None:
        """`first_frame` waits for the child in its channel, with `first_fds` attached."""
        self.loop = loop
        self.on_output = on_output
        self.frames: deque[tuple[Message, bytes]] = deque()
        self.protocol_error = ""
        self.exit: ExitInfo | None = None
        self.pid: int | None = None  # known once the fork server answered (`ready`)
        self.left_behind = False  # its tree had more than itself when we killed it
        self.stderr_tail: deque[str] = deque(maxlen=stderr_tail)
        self._reader = FrameReader(max_blob, sender=config.role, blobs=False)
        self.conversation = Conversation(config.role)
        self._splitters = {"stdout": LineSplitter(max_line), "stderr": LineSplitter(max_line)}
        self._max_blob = max_blob
        self._greeting = encode_frame(first_frame) if first_frame else b""
        if first_frame:
            self.conversation.sent(first_frame, bool(first_fds))
        self._pending: PendingChild | None = self._spawn(launcher, config, first_fds)
        if not deferred:
            self.ready()

    def ready(self) -> None:
        """Take the fork server's answer (pid, pidfd) and start watching the child.

        A deferred child (a spare) calls this only when it is needed, long after
        the answer came: starting it costs its owner no wait.
        """
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            self.handle = pending.wait()
        except LaunchError:
            self._close_parent_ends()
            raise
        self.pid = self.handle.pid
        if self.protocol_error:
            self.kill_tree()  # it broke the protocol while we waited for its pid
        self._register()

    @property
    def pending(self) -> PendingChild | None:
        """The fork server's answer, while it has not been taken (`ready`)."""
        return self._pending

    def _spawn(self, launcher: Launcher, config: ChildConfig,
               fds: tuple[int, ...]) -> PendingChild:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        chan, chan_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The first frame waits in the socket buffer, so the child reads it at once
        # instead of waiting for us to hear that it exists.
        sent = _send_some(chan, self._greeting, fds)
        self._greeting, fds = self._greeting[sent:], (fds if sent == 0 else ())
        for fd in (out_r, err_r):
            _enlarge_pipe(fd)
        self._fds = {"stdout": out_r, "stderr": err_r}
        self.chan = chan
        try:
            pending = launcher.request(config, (out_w, err_w, chan_child.fileno()))
        except LaunchError:
            self._close_parent_ends()
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
            chan_child.close()
        if self._greeting:
            self._send_raw(self._greeting, fds)
        return pending

    def _close_parent_ends(self) -> None:
        for fd in self._fds.values():
            close_quietly(fd)
        self._fds = {"stdout": -1, "stderr": -1}
        self.chan.close()

    def _register(self) -> None:
        for stream, fd in self._fds.items():
            os.set_blocking(fd, False)
            self.loop.add(fd, lambda s=stream: self._read_output(s))
        if self.chan.fileno() >= 0:  # closed: it broke the protocol before we knew it
            self.chan.setblocking(False)
            self.loop.add(self.chan, self._read_channel)
        self.loop.add(self.handle.exit_fd, self._on_exit)

    def send(self, message: Message, fds: tuple[int, ...] = ()) -> bool:
        """Send a frame, `fds` attached to its first byte; False when the child is gone."""
        self.conversation.sent(message, bool(fds))
        if self.chan.fileno() < 0:
            return False  # closed: it broke the protocol
        return self._send_raw(encode_frame(message), fds)

    def _send_raw(self, frame: bytes, fds: tuple[int, ...] = ()) -> bool:
        # Bounded: a child that stops reading its channel must not hang our loop.
        try:
            self.chan.settimeout(SEND_WAIT)
            sent = send_with_fds(self.chan, frame, fds) if fds else 0
            self.chan.sendall(frame[sent:])
            return True
        except TimeoutError:
            self._broke(f"did not read what the runner sent for {SEND_WAIT:g} s")
            return False
        except OSError:
            return False
        finally:
            if self.chan.fileno() >= 0:
                self.chan.setblocking(False)

    @property
    def running(self) -> bool:
        return self.exit is None

    @property
    def over(self) -> bool:
        """Gone, or broke the protocol (then it is being killed): nothing more to hear."""
        return self.exit is not None or bool(self.protocol_error)

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
            for message, blob in self._reader.feed(data):
                self.conversation.received(message)
                self.frames.append((message, blob))
        except ProtocolError as exc:
            self._broke(str(exc))
            return False
        return True

    def _broke(self, what: str) -> None:
        # Stop listening and kill now: a child that lies once is not read further.
        self.protocol_error = what
        if self.pid is not None:
            self.kill_tree()
        self.loop.remove(self.chan)
        self.chan.close()

    def _on_exit(self) -> bool:
        self.exit = self.handle.read_exit()
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

    def kill_tree(self) -> None:
        """SIGKILL the child's whole tree; the fork server reports its exit once all
        of it is gone.

        `left_behind` says whether the next task must wait for that report: the
        tree had more than the child, or the child had already exited when we
        looked (then what it left was reparented to the fork server, out of our
        sight). A child alive after the look had all its descendants below it.
        """
        members = descendants(self.pid)
        exited = _readable(self.handle.pidfd) if self.handle.pidfd >= 0 else True
        kill_tree(self.pid, members)
        self.left_behind = self.left_behind or bool(members) or exited

    def retire(self) -> None:
        """Done with it but for its exit: close pipes and channel, and stop waking the
        loop for the exit report (`exited` looks for it when asked)."""
        self.close_io()
        if self.running:
            self.loop.remove(self.handle.exit_fd)

    def exited(self) -> bool:
        """Whether the fork server has said the child's tree is gone; never blocks."""
        if self.running and _readable(self.handle.exit_fd):
            self.exit = self.handle.read_exit()
        return not self.running

    def await_exit(self, timeout: float = 5.0) -> None:
        """Run the loop until the fork server says the child's tree is gone."""
        if self.running:  # watched again, if `retire` stopped watching
            self.loop.remove(self.handle.exit_fd)
            self.loop.add(self.handle.exit_fd, self._on_exit)
        end = time.monotonic() + timeout
        while self.running and time.monotonic() < end:
            self.loop.poll(end - time.monotonic())

    def stop(self, timeout: float = 5.0) -> None:
        """Kill its tree and wait until all of it is gone (nothing outlives us), then close."""
        self.kill_tree()
        self.await_exit(timeout)
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
        self.loop.remove(self.handle.exit_fd)
        self.handle.close()


def _send_some(sock: socket.socket, data: bytes, fds: tuple[int, ...]) -> int:
    """Write what fits without blocking, `fds` with the first byte; how many bytes went."""
    if not data:
        return 0
    sock.setblocking(False)
    try:
        return send_with_fds(sock, data, fds) if fds else sock.send(data)
    except BlockingIOError:
        return 0


def _telling(lines: list[str]) -> list[str]:
    """Lines worth quoting in a note: not blank, not the runner's own stack frames,
    not a faulthandler dump (the note names the signal; the dump is the traceback)."""
    return [line.strip() for line in lines if line.strip()
            and "perfect_runner/" not in line and "<frozen runpy>" not in line
            and not is_dump_line(line)]


def _readable(fd: int) -> bool:
    return bool(readable([fd], 0))


def _enlarge_pipe(fd: int) -> None:
    # Fewer wakeups per MB of output; the kernel may refuse (pipe-max-size), fine.
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
