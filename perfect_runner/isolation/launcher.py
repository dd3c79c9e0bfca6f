"""One fork server process, and the handles of the children it starts.

Control-process side. `ServerProcess` is one running fork server (see
`forkserver`): a request hands back a `PendingChild`, whose answer is a
`ChildHandle`: its pid as numbered on our side (read from the pidfd the server
hands over, since in the sandbox the server numbers its children in a PID
namespace of its own), the pidfd, and a report socket that becomes readable
once the child and everything it left behind are gone (watched by the loop,
not pipe EOF, which grandchildren can hold open), carrying the exit status.
`healing.HealingLauncher` keeps one running and starts a new one when it dies.

Both start methods go through our own fork server, which stays the parent of
every child: it reaps them, reports their exit status and kills what they
leave behind.

- "forkserver" (default): children are forked from the server, which
  preloaded the flows modules: about a millisecond, no re-import.
- "spawn": each forked child execs a new interpreter that imports the flows
  modules itself; slower, but nothing is shared.

Every flow and task process dies with the fork server that forked it
(parent-death signal), so when a server dies, the exit status of its
children is lost: their `ExitInfo` then says how the server died instead.

Nothing here imports user code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from . import server_output
from .child_bootstrap import ChildConfig
from .metadata import Metadata, MetadataError, parse_metadata
from .oskit import close_quietly, pid_of_pidfd, recv_with_fds, send_with_fds
from .sandbox import FAIL_ENV, Choice

START_METHODS = ("forkserver", "spawn")
MAX_REPLY = 4096
DEATH_WAIT = 2.0  # seconds to learn how a server whose sockets closed has died
SPAWN_WAIT = 10.0  # seconds a spawn request waits for the server's answer (a fork: ~1 ms)


class LaunchError(Exception):
    """The flows modules could not be loaded, or a child could not be started."""


class ServerGone(LaunchError):
    """The fork server this request went to is dead."""


@dataclass(frozen=True)
class ExitInfo:
    """How a child ended: raw wait status (None when unknown) and peak RSS.

    `server_died` says how the fork server died ("killed by SIGKILL") when the
    child died with it and its own status is therefore unknown.
    """

    status: int | None
    maxrss: int = 0
    server_died: str = ""

    @property
    def signal(self) -> int | None:
        if self.status is not None and os.WIFSIGNALED(self.status):
            return os.WTERMSIG(self.status)
        return None

    @property
    def code(self) -> int | None:
        if self.status is not None and os.WIFEXITED(self.status):
            return os.WEXITSTATUS(self.status)
        return None


def how_it_ended(returncode: int | None) -> str:
    """A Popen return code in words: "killed by SIGKILL", "exited with code 3"."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class ChildHandle(Protocol):
    pid: int
    pidfd: int

    @property
    def exit_fd(self) -> int:
        """Readable once the child and everything it left behind are gone."""

    def read_exit(self) -> ExitInfo:
        """How it ended, once `exit_fd` is readable; never blocks."""

    def close(self) -> None:
        """Release the pidfd and the report socket."""


class Launcher(Protocol):
    metadata: Metadata

    @property
    def server_pid(self) -> int | None:
        """The running fork server's pid; None while there is none."""

    @property
    def running(self) -> bool:
        """A fork server is up and takes requests."""

    def wait_running(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a fork server to be up; whether one is."""

    def request(self, config: ChildConfig, fds: tuple[int, int, int]) -> PendingChild:
        """Start a child whose fds 1/2 and channel are the given fds; answer later."""

    def close(self) -> None:
        """Stop the launcher; every child it started dies."""


def _server_command(modules: list[str], meta_fd: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "perfect_runner.isolation.forkserver",
        "--modules", json.dumps(modules), "--sys-path", json.dumps(sys.path),
        "--meta-fd", str(meta_fd), "--parent-pid", str(os.getpid()), *extra,
    ]


def _read_metadata(meta_r: int, proc: subprocess.Popen) -> dict[str, Any]:
    with os.fdopen(meta_r, "rb") as meta:
        raw = meta.read()
    if not raw:
        code = proc.wait()
        raise LaunchError(f"the process loading the flows modules died (exit status {code}) "
                          "before describing them; see its output above")
    data = json.loads(raw)
    if not data.get("ok"):
        proc.wait()
        raise LaunchError(data.get("error", "the flows modules could not be loaded"))
    data.pop("ok")
    return data


class ServerProcess:
    """One fork server: started with the flows modules loaded, or LaunchError."""

    def __init__(self, modules: list[str], env: dict[str, str],
                 exec_children: bool = False, sandbox: str = "off") -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        meta_r, meta_w = os.pipe()
        extra = ["--control-fd", str(child_end.fileno()), "--sandbox", sandbox,
                 "--sandbox-fail", os.environ.get(FAIL_ENV, "")]
        command = _server_command(modules, meta_w, extra + ["--exec-children"] * exec_children)
        output_r, output_w = os.pipe2(os.O_CLOEXEC)
        self.proc = subprocess.Popen(
            command, pass_fds=(meta_w, child_end.fileno()), stdin=subprocess.DEVNULL,
            stdout=output_w, stderr=output_w, env=env, start_new_session=True,
        )
        os.close(output_w)
        server_output.relay(output_r, f"forkserver-output-{self.proc.pid}")
        os.close(meta_w)
        child_end.close()
        self.control = parent_end
        self.pid = self.proc.pid
        self.dead = threading.Event()  # set by its reaper (`mark_dead`)
        self.how = ""  # how it ended, once `dead` is set
        self._send_lock = threading.Lock()
        try:
            data = _read_metadata(meta_r, self.proc)
            about = data.pop("sandbox")
            self.metadata = parse_metadata(data)
        except MetadataError as exc:
            self.control.close()  # the fork server exits at EOF
            raise LaunchError("the process loading the flows modules described them "
                              f"wrongly ({exc}); check for a flows module that changes "
                              "perfect_runner's own modules") from None
        except BaseException:
            self.control.close()
            raise
        self.sandbox = Choice(about["mode"], about["why"])

    def request(self, config: ChildConfig, fds: tuple[int, int, int]) -> PendingChild:
        """Ask for a child and return at once; `wait()` on the answer later."""
        # Each child gets a private reply socket: the caller's thread reads its own
        # answers (pid, then exit status) with no dispatcher thread in between.
        reply, reply_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        payload = {k: v for k, v in config.to_json().items() if k != "parent_pid"}
        message = json.dumps({"op": "spawn", "config": payload}).encode()
        try:
            with self._send_lock:
                send_with_fds(self.control, message, [*fds, reply_child.fileno()])
        except OSError as exc:
            reply.close()
            raise ServerGone(f"fork server is gone: {exc}") from None
        finally:
            reply_child.close()
        return PendingChild(reply, self)

    def mark_dead(self, how: str) -> None:
        """Its reaper says how it ended; its control socket is closed."""
        self.how = how
        self.dead.set()
        with self._send_lock:  # not under a request's feet
            self.control.close()

    def death(self, timeout: float = DEATH_WAIT) -> str:
        """How it died, once its reaper knows (empty if it is not known to be dead)."""
        return self.how if self.dead.wait(timeout) else ""

    def close(self) -> None:
        """Close the control socket (the server kills its children and exits); reap it."""
        try:
            self.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.control.close()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class PendingChild:
    """A spawn request on its way: the fork server answers on `reply`."""

    def __init__(self, reply: socket.socket, server: ServerProcess) -> None:
        self.reply = reply
        self.server = server

    def wait(self, timeout: float = SPAWN_WAIT) -> ChildHandle:
        self.reply.settimeout(timeout)
        try:
            data, pidfds = recv_with_fds(self.reply, MAX_REPLY, 1)
        except TimeoutError:
            self.reply.close()
            raise LaunchError(f"the fork server did not answer within {timeout:.0f} s") from None
        except OSError:
            data, pidfds = b"", []
        if not data:
            self.reply.close()
            how = self.server.death()
            raise ServerGone(f"the fork server died ({how or 'exit status unknown'})")
        answer = json.loads(data)
        if answer["op"] != "spawned" or not pidfds:
            self.reply.close()
            raise LaunchError(f"could not start a child process: {answer.get('error')}")
        # The server may number its children in a PID namespace of its own: the pidfd
        # tells us the pid we can signal and find in our /proc.
        return _ForkedChild(pid_of_pidfd(pidfds[0]), pidfds[0], self.reply, self.server)

    def cancel(self) -> None:
        self.reply.close()  # the server's answers go nowhere; it still reaps the child


class _ForkedChild:
    def __init__(self, pid: int, pidfd: int, reply: socket.socket,
                 server: ServerProcess) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.reply = reply
        self.server = server

    @property
    def exit_fd(self) -> int:
        return self.reply.fileno()

    def read_exit(self) -> ExitInfo:
        """The fork server's report, once `exit_fd` is readable: it has reaped the
        child and nothing the child left behind runs any more."""
        try:
            data = self.reply.recv(MAX_REPLY, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return ExitInfo(None)  # woken for nothing: should not happen
        except OSError:
            data = b""
        if not data:
            # No status: the server closed our reply socket by dying, and we died with it.
            return ExitInfo(None, server_died=self.server.death())
        answer = json.loads(data)
        return ExitInfo(answer["status"], answer.get("maxrss", 0))

    def close(self) -> None:
        close_quietly(self.pidfd)
        self.pidfd = -1
        self.reply.close()
