"""Small, errno-precise helpers around Linux process primitives."""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import select
import signal
import socket
import struct
from collections.abc import Iterable

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36

# Looked up once, in the fork server: children call it right after fork. No argtypes
# and no errno copy: the options used take small ints, and the conversions would
# cost every forked child ~25 copy-on-write faults.
_prctl_fn = ctypes.CDLL(None).prctl


def prctl(option: int, value: int) -> bool:
    """One prctl(2) call with a single argument; whether it succeeded."""
    return _prctl_fn(option, value, 0, 0, 0) == 0


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    """Get `sig` when the parent dies; exit now if it already did."""
    prctl(PR_SET_PDEATHSIG, sig)
    # The parent may have died between fork and prctl: then we were reparented.
    if os.getppid() != expected_parent:
        os._exit(1)


def make_undumpable() -> bool:
    """Other processes of our user can no longer read our memory or /proc/<pid>/environ."""
    return prctl(PR_SET_DUMPABLE, 0)


def become_subreaper() -> bool:
    """Orphaned descendants get reparented to us instead of init, so none escape."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1)


def signal_process(pid: int, sig: int) -> bool:
    """Send `sig`; False when the process is already gone ("no such process")."""
    if pid <= 1:
        return False  # never everyone (-1), our own group (0) or init: a pid not known
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def signal_group(pgid: int, sig: int) -> bool:
    if pgid <= 1:
        return False  # killpg(0) is our own group; a group not known is no one's
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        # A group member under another uid (setuid helper): signal what we can.
        if exc.errno == errno.EPERM:
            return False
        raise


def drain_pipe(fd: int) -> None:
    """Empty a non-blocking wake-up pipe (what it held does not matter, only that it woke us)."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def readable(fds: Iterable[int], timeout: float) -> set[int]:
    """The fds that are readable (or hung up) within `timeout` s.

    poll, not select: a worker running many runs at once holds fds past 1024,
    which select() refuses ("filedescriptor out of range").
    """
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return {fd for fd, _ in poller.poll(max(0.0, timeout) * 1000)}


def raise_open_files(need: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to `need` if it is lower, as far as the hard
    limit allows; the (soft, hard) limits in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft, hard
    wanted = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def close_quietly(fd: int | None) -> None:
    if fd is None or fd < 0:
        return
    try:
        os.close(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise


def pid_of_pidfd(pidfd: int) -> int:
    """The pid a pidfd refers to, as numbered in our own PID namespace.

    A fork server in its own namespace knows its children by the pids there; the
    pidfd it hands over tells us the pid on our side (kernel 5.3+: "Pid:" in fdinfo).
    -1 when the process is already gone (reaped): the signal helpers ignore it.
    """
    with open(f"/proc/self/fdinfo/{pidfd}") as handle:
        for line in handle:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise OSError(f"fd {pidfd} is not a pidfd")


_FD = struct.Struct("i")


def recv_with_fds(sock: socket.socket, size: int, max_fds: int,
                  flags: int = 0) -> tuple[bytes, list[int]]:
    """Up to `size` bytes and the fds sent with them, close-on-exec.

    Not `socket.recv_fds`: on Python 3.11 it drops its `flags` (so neither
    MSG_CMSG_CLOEXEC nor MSG_DONTWAIT reaches the kernel), and its array
    handling is more code for every forked child to touch.
    """
    data, ancdata, _, _ = sock.recvmsg(size, socket.CMSG_SPACE(max_fds * _FD.size),
                                       flags | socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            count = len(payload) // _FD.size
            fds.extend(struct.unpack(f"{count}i", payload[:count * _FD.size]))
    return data, fds


def send_with_fds(sock: socket.socket, data: bytes, fds: Iterable[int]) -> int:
    """One sendmsg of `data` with `fds` attached (SCM_RIGHTS); how many bytes went.

    What `socket.send_fds` does, with less Python around the one system call.
    """
    fds = list(fds)
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    return sock.sendmsg([data], rights if fds else [])
