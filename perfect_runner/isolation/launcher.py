"""Starting flow and task processes: the fork server, or a fresh interpreter each.

Control-process side. A launcher hands back a `ChildHandle` per child: its pid,
a pidfd that becomes readable when the child exits (the supervisor waits on
it, not on pipe EOF, which grandchildren can hold open), and the exit status.

- `ForkServerLauncher` (default, "forkserver"): children are forked by our own
  fork server (see `forkserver`), which preloaded the flows modules.
- `SpawnLauncher` ("spawn"): each child is a new interpreter that imports the
  flows modules itself; slower, but nothing is shared.

Neither imports user code here.
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

from .child_bootstrap import ChildConfig
from .oskit import close_quietly

START_METHODS = ("forkserver", "spawn")


class LaunchError(Exception):
    """The flows modules could not be loaded, or a child could not be started."""


@dataclass(frozen=True)
class ExitInfo:
    """How a child ended: raw wait status (None when unknown) and peak RSS."""

    status: int | None
    maxrss: int = 0

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


class ChildHandle(Protocol):
    pid: int
    pidfd: int

    def exit_info(self, timeout: float) -> ExitInfo:
        """The exit status, once the pidfd said the child is gone."""

    def close(self) -> None:
        """Release the pidfd."""


class Launcher(Protocol):
    metadata: dict[str, Any]
    server_pid: int | None

    def spawn(self, config: ChildConfig, fds: tuple[int, int, int]) -> ChildHandle:
        """Start a child whose fds 1/2 and channel are the given fds."""

    def close(self) -> None:
        """Stop the launcher; every child it started dies."""


def start_launcher(method: str, modules: list[str], env: dict[str, str]) -> Launcher:
    if method == "forkserver":
        return ForkServerLauncher(modules, env)
    if method == "spawn":
        return SpawnLauncher(modules, env)
    raise LaunchError(f"unknown start method {method!r}: use one of {', '.join(START_METHODS)}")


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


class ForkServerLauncher:
    def __init__(self, modules: list[str], env: dict[str, str]) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        meta_r, meta_w = os.pipe()
        command = _server_command(modules, meta_w, ["--control-fd", str(child_end.fileno())])
        self.proc = subprocess.Popen(
            command, pass_fds=(meta_w, child_end.fileno()), stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
        os.close(meta_w)
        child_end.close()
        self.control = parent_end
        self.server_pid: int | None = self.proc.pid
        self.metadata = _read_metadata(meta_r, self.proc)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._next_id = 0
        self._spawned: dict[int, tuple[int, int] | str] = {}
        self._exits: dict[int, ExitInfo] = {}
        self._dead = False
        threading.Thread(target=self._read_replies, name="forkserver-reader", daemon=True).start()

    def spawn(self, config: ChildConfig, fds: tuple[int, int, int]) -> ChildHandle:
        with self._cond:
            self._next_id += 1
            request_id = self._next_id
        payload = {k: v for k, v in config.to_json().items() if k != "parent_pid"}
        message = json.dumps({"op": "spawn", "id": request_id, "config": payload}).encode()
        with self._send_lock:
            try:
                socket.send_fds(self.control, [message], list(fds))
            except OSError as exc:
                raise LaunchError(f"fork server is gone: {exc}") from None
        with self._cond:
            self._cond.wait_for(lambda: request_id in self._spawned or self._dead)
            reply = self._spawned.pop(request_id, "fork server exited")
        if isinstance(reply, str):
            raise LaunchError(f"could not start a child process: {reply}")
        pid, pidfd = reply
        return _ForkedChild(self, pid, pidfd)

    def wait_exit(self, pid: int, timeout: float) -> ExitInfo:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self._dead, timeout)
            return self._exits.pop(pid, ExitInfo(None))

    def _read_replies(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.control, 65536, 1)
            except OSError:
                data, fds = b"", []
            if not data:
                break
            self._dispatch(json.loads(data), fds)
        with self._cond:
            self._dead = True
            self._cond.notify_all()

    def _dispatch(self, reply: dict[str, Any], fds: list[int]) -> None:
        with self._cond:
            if reply["op"] == "spawned":
                self._spawned[reply["id"]] = (reply["pid"], fds[0])
            elif reply["op"] == "spawn_failed":
                self._spawned[reply["id"]] = reply["error"]
            elif reply["op"] == "exited":
                self._exits[reply["pid"]] = ExitInfo(reply["status"], reply.get("maxrss", 0))
            self._cond.notify_all()

    def close(self) -> None:
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


class _ForkedChild:
    def __init__(self, launcher: ForkServerLauncher, pid: int, pidfd: int) -> None:
        self.launcher = launcher
        self.pid = pid
        self.pidfd = pidfd

    def exit_info(self, timeout: float) -> ExitInfo:
        return self.launcher.wait_exit(self.pid, timeout)

    def close(self) -> None:
        close_quietly(self.pidfd)
        self.pidfd = -1


class SpawnLauncher:
    def __init__(self, modules: list[str], env: dict[str, str]) -> None:
        self.modules = modules
        self.env = env
        self.server_pid: int | None = None
        meta_r, meta_w = os.pipe()
        proc = subprocess.Popen(
            _server_command(modules, meta_w, ["--describe-only"]), pass_fds=(meta_w,),
            stdin=subprocess.DEVNULL, env=env,
        )
        os.close(meta_w)
        self.metadata = _read_metadata(meta_r, proc)
        proc.wait()

    def spawn(self, config: ChildConfig, fds: tuple[int, int, int]) -> ChildHandle:
        command = [
            sys.executable, "-m", "perfect_runner.isolation.spawn_child",
            json.dumps({"config": {**config.to_json(), "parent_pid": os.getpid()},
                        "modules": self.modules, "sys_path": sys.path, "fds": list(fds)}),
        ]
        try:
            proc = subprocess.Popen(command, pass_fds=fds, stdin=subprocess.DEVNULL,
                                    env=self.env)
        except OSError as exc:
            raise LaunchError(f"could not start a child process: {exc}") from None
        return _SpawnedChild(proc)

    def close(self) -> None:
        pass


class _SpawnedChild:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.pidfd = os.pidfd_open(proc.pid)

    def exit_info(self, timeout: float) -> ExitInfo:
        # Reap it ourselves (wait4 gives peak RSS); tell Popen so it never reaps again.
        try:
            pid, status, usage = os.wait4(self.pid, 0)
        except ChildProcessError:
            return ExitInfo(None)
        self.proc.returncode = -1
        return ExitInfo(status, usage.ru_maxrss * 1024)

    def close(self) -> None:
        close_quietly(self.pidfd)
        self.pidfd = -1
