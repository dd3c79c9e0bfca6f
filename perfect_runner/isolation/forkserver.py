"""The fork server: a small process with the flows modules preloaded.

Started by the control process as `python -m perfect_runner.isolation.forkserver`.
It imports the user's modules once (reporting a failure loudly, never silently),
writes their description as JSON on the metadata fd, then forks a flow or task
process for every spawn request. Forking this small process costs about a
millisecond, and no child re-imports user code.

Control socket (SOCK_SEQPACKET, one JSON object per packet):

    control -> server  {"op": "spawn", "config": ChildConfig}
                       with fds [stdout_w, stderr_w, channel, reply] attached

Each spawn brings its own `reply` socket (SOCK_SEQPACKET), on which the server
answers that spawn and nothing else:

    server -> control  {"op": "spawned", "pid": p} with [pidfd] attached,
                       later {"op": "exited", "status": raw, "maxrss": bytes}
                       or {"op": "spawn_failed", "error": "..."}

With the sandbox (see `sandbox`), the process started by the control
process unshares a PID and mount namespace and forks init, which is the fork
server proper: every flow and task process lives and dies in its namespace,
and when init dies the kernel kills all of it. The outer process is a stub
that waits for init and ends the way it ended.

Either way the server is the one owner of its children's lifetime: it is
their parent (init, or a child subreaper), so grandchildren that double-fork
out of a task are reparented here and killed here; it reports a child's
"exited" once nothing that child left behind is running, without blocking.
It dies with the control process, and kills everything below it when the
control socket closes. Without the sandbox, the control process's death is a
signal it catches, to kill everything below it until nothing is left.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from . import sandbox
from .child_bootstrap import ChildConfig, become_child, preload_roles, prepare_streams
from .loader import ModuleLoadError, describe, load_modules
from .oskit import (
    become_subreaper,
    close_quietly,
    die_with_parent,
    recv_with_fds,
    send_with_fds,
)
from .proctree import direct_children, kill_all_below, kill_tree
from .protocol import EXIT_BOOTSTRAP

MAX_PACKET = 65536
CHILDREN_READ = 65536  # bytes of /proc children list read at once (thousands of pids)
ORPHAN_WAIT = 2.0  # seconds an exit report waits at most for orphans to be gone
# Without the sandbox, the control process's death is a signal we catch (not SIGKILL):
# we then kill everything below us before we go.
PARENT_DEATH_SIGNAL = signal.SIGTERM


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    die_with_parent(args.parent_pid)
    become_subreaper()
    probe = sandbox.Probe(args.sandbox, args.sandbox_fail)  # runs while we import
    sys.path[:0] = [p for p in json.loads(args.sys_path) if p not in sys.path]
    try:
        load_modules(json.loads(args.modules))
    except ModuleLoadError as exc:
        _report_failure(args.meta_fd, str(exc))
    choice = probe.choice()
    if args.sandbox == "namespace" and choice.mode != "namespace":
        _report_failure(args.meta_fd, f"--sandbox namespace is not possible here: {choice.why}; "
                        "use --sandbox auto to fall back to plain processes")
    if choice.mode == "namespace":
        _enter_sandbox(args)  # from here on we are init, PID 1 of the namespace
    else:
        _guard_without_sandbox(args.parent_pid)
    with os.fdopen(args.meta_fd, "w", encoding="utf-8") as meta:
        json.dump({"ok": True, "sandbox": {"mode": choice.mode, "why": choice.why},
                   **describe()}, meta)
    control = socket.socket(fileno=args.control_fd)
    if args.exec_children:
        _flush_std()
        spawner = ExecSpawner(json.loads(args.modules), sys.path)
        ForkServer(control, spawner.become_child).serve()
        return 0
    preload_roles()
    prepare_streams()
    # Children share our heap copy-on-write; keep their garbage collector off it.
    gc.freeze()
    ForkServer(control, become_child).serve()
    return 0


def _enter_sandbox(args: argparse.Namespace) -> None:
    """Unshare, fork init and return in it; this process stays outside as its stub.

    The stub only waits: it dies with the control process (parent-death signal),
    and init dies with the stub, taking the whole namespace with it. When init
    ends, the stub ends the same way, so the control process sees how.
    """
    try:
        sandbox.enter_namespace()
        init = os.fork()
    except (sandbox.SandboxError, OSError) as exc:
        _report_failure(args.meta_fd, f"could not enter the sandbox: {exc}")
    if init == 0:
        try:
            sandbox.become_init()
        except sandbox.SandboxError as exc:
            _report_failure(args.meta_fd, f"could not set up the sandbox: {exc}")
        return
    for fd in (args.meta_fd, args.control_fd):
        os.close(fd)  # init holds them: their EOF must mean init is gone
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, status = os.waitpid(init, 0)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _report_failure(meta_fd: int, error: str) -> NoReturn:
    with os.fdopen(meta_fd, "w", encoding="utf-8") as meta:
        json.dump({"ok": False, "error": error}, meta)
    os._exit(3)


def _guard_without_sandbox(parent_pid: int) -> None:
    """Without the namespace: a subreaper that, when the control process dies, kills
    everything below it until nothing is left, so no setsid daemon escapes to init."""
    signal.signal(PARENT_DEATH_SIGNAL, lambda *_: _kill_everything_and_exit())
    die_with_parent(parent_pid, PARENT_DEATH_SIGNAL)


def _kill_everything_and_exit() -> NoReturn:
    kill_all_below(os.getpid())
    os._exit(128 + PARENT_DEATH_SIGNAL)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="perfect_runner.isolation.forkserver")
    parser.add_argument("--modules", required=True)
    parser.add_argument("--sys-path", default="[]")
    parser.add_argument("--meta-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, default=-1)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--sandbox", choices=sandbox.MODES, default="off")
    parser.add_argument("--sandbox-fail", default="", help="test only: fail the probe here")
    parser.add_argument("--exec-children", action="store_true",
                        help="start each child as a fresh interpreter (start method spawn)")
    return parser.parse_args(argv)


class ExecSpawner:
    """Start method "spawn": the forked child execs a fresh interpreter at once.

    The server still forks it, so it stays the parent: the same reaping, exit
    statuses and orphan killing as the fork server, only no shared heap.
    """

    def __init__(self, modules: list[str], sys_path: list[str]) -> None:
        self.modules = modules
        self.sys_path = list(sys_path)

    def become_child(self, config: ChildConfig, out_fd: int, err_fd: int, chan_fd: int) -> None:
        for fd in (out_fd, err_fd, chan_fd):
            os.set_inheritable(fd, True)
        spec = {"config": config.to_json(), "modules": self.modules,
                "sys_path": self.sys_path, "fds": [out_fd, err_fd, chan_fd]}
        try:
            os.execv(sys.executable, [sys.executable, "-m", "perfect_runner.isolation.spawn_child",
                                      json.dumps(spec)])
        finally:
            os._exit(EXIT_BOOTSTRAP)  # exec failed; stderr said why


class ForkServer:
    """The loop: a spawn request forks, a SIGCHLD reaps and reports.

    Kept lean on purpose: every fork write-protects all of this process's pages
    again, so each page the loop writes between two forks costs a copy-on-write
    fault (~3 us here). Plain epoll instead of `selectors`, and one open
    /proc children file read in place, keep that set small.
    """

    def __init__(self, control: socket.socket,
                 start_child: Callable[[ChildConfig, int, int, int], None]) -> None:
        self.control = control
        self.start_child = start_child
        self.children: dict[int, socket.socket] = {}  # pid -> its reply socket
        self.orphans: list[int] = []  # left by dead children; killed, not yet reaped
        self.exits: list[tuple[float, socket.socket, dict]] = []  # waiting for the orphans
        self.epoll = select.epoll()
        self.children_file = _open_children_file()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        # The control process handles Ctrl-C; a terminal's SIGINT must not kill us first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def serve(self) -> None:
        control = self.control.fileno()
        self.epoll.register(control, select.EPOLLIN)
        self.epoll.register(self.wake_r, select.EPOLLIN)
        try:
            while True:
                for fd, _ in self.epoll.poll(self._next_deadline()):
                    if fd == control and not self._on_request():
                        return
                    if fd == self.wake_r:
                        self._on_sigchld()
                self._report_exits()
        finally:
            self._kill_children()

    def _on_request(self) -> bool:
        try:
            data, fds = recv_with_fds(self.control, MAX_PACKET, 4)
        except ConnectionResetError:
            return False
        if not data:
            return False
        request = json.loads(data)
        if request.get("op") == "spawn" and len(fds) == 4:
            reply = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fds[3])
            self._spawn(request, fds[:3], reply)
        else:
            for fd in fds:
                close_quietly(fd)
        return True

    def _spawn(self, request: dict, fds: list[int], reply: socket.socket) -> None:
        config = ChildConfig(**{**request["config"], "parent_pid": os.getpid()})
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                close_quietly(fd)
            _send(reply, {"op": "spawn_failed", "error": str(exc)})
            reply.close()
            return
        if pid == 0:
            self._become_child(config, fds, reply)
        for fd in fds:
            close_quietly(fd)
        self.children[pid] = reply
        pidfd = os.pidfd_open(pid)
        try:
            _send(reply, {"op": "spawned", "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)

    def _become_child(self, config: ChildConfig, fds: list[int], reply: socket.socket) -> None:
        """The forked child's only path: it never returns into the server's loop.

        `start_child` ends in `os._exit` itself; this `finally` covers whatever
        fails before or inside it, so a child can never become a second server
        reading the control socket (Airflow's supervisor ends its fork the same way).
        """
        try:
            self.control.close()
            reply.close()
            self.start_child(config, *fds)
        finally:
            os._exit(EXIT_BOOTSTRAP)

    def _on_sigchld(self) -> None:
        try:
            os.read(self.wake_r, 4096)  # one read: more bytes wake us again
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reply = self.children.pop(pid, None)
            if reply is not None:
                exited = {"op": "exited", "status": status, "maxrss": usage.ru_maxrss * 1024}
                self.exits.append((time.monotonic() + ORPHAN_WAIT, reply, exited))
        self._kill_orphans()

    def _kill_orphans(self) -> None:
        """Kill what dead flow and task processes left behind, without waiting.

        Every child of ours that we did not fork was reparented to us because
        the flow or task process above it died (they are subreapers, so nothing
        else reaches us): it belongs to a finished process and must not live on.
        Each one's death wakes us again (SIGCHLD), until none is left.
        """
        self.orphans = [pid for pid in self._direct_children() if pid not in self.children]
        for pid in self.orphans:
            kill_tree(pid)

    def _direct_children(self) -> list[int]:
        if self.children_file >= 0:
            data = os.pread(self.children_file, CHILDREN_READ, 0)
            if len(data) < CHILDREN_READ:
                return [int(pid) for pid in data.split()]
        return direct_children(os.getpid())  # no such file, or more children than fit

    def _report_exits(self) -> None:
        """Say "exited" once nothing a dead child left behind is running any more.

        Orphans cannot be told apart by who left them, so every waiting exit goes
        out when none is left (or after ORPHAN_WAIT, for one the kernel will not
        let die): the control process hears of an exit when the whole tree is gone.
        """
        now = time.monotonic()
        keep = []
        for deadline, reply, exited in self.exits:
            if not self.orphans or deadline <= now:
                _send(reply, exited)
                reply.close()
            else:
                keep.append((deadline, reply, exited))
        self.exits = keep

    def _next_deadline(self) -> float | None:
        if not self.exits:
            return None
        return max(0.0, min(deadline for deadline, _, _ in self.exits) - time.monotonic())

    def _kill_children(self) -> None:
        kill_all_below(os.getpid())


def _open_children_file() -> int:
    """Our children, as the kernel lists them (we have one thread); -1 without the file."""
    try:
        return os.open(f"/proc/self/task/{os.getpid()}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    try:
        send_with_fds(sock, json.dumps(message).encode(), fds or ())
    except OSError:
        pass  # the control process no longer listens for this child


def _flush_std() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
