"""A task's process tree: measure it, and kill all of it.

The tree is the task process, its process group, and every descendant (those
that called setsid left the group but are still descendants: task processes
are subreapers, so even double-forked ones stay below them). Descendants are
found through /proc/<pid>/task/<tid>/children, a few small reads, instead of
scanning every process on the machine (psutil's way, ~1 ms): this runs at the
end of every task. Errors mean "already gone" and are treated as such.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable

from .oskit import readable, signal_group, signal_process

_PAGE = os.sysconf("SC_PAGE_SIZE")
_HAS_CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def direct_children(pid: int) -> list[int]:
    """Children of a process, from /proc."""
    if not _HAS_CHILDREN_FILES:
        return _psutil_children(pid)
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                found.extend(int(p) for p in handle.read().split())
        except OSError:
            pass
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, breadth first."""
    found: list[int] = []
    seen = {pid}
    frontier = [pid]
    while frontier:
        children = [c for p in frontier for c in direct_children(p) if c not in seen]
        seen.update(children)
        found.extend(children)
        frontier = children
    return found


def tree_usage(pid: int) -> tuple[int, int]:
    """Resident memory (bytes) and process count of the process and its descendants."""
    members = [pid, *descendants(pid)]
    return sum(_rss(member) for member in members), len(members)


def kill_tree(pid: int, members: list[int] | None = None) -> list[int]:
    """SIGKILL the process, its group, and every descendant (`members`, when the
    caller has just listed them); the descendants killed."""
    members = descendants(pid) if members is None else members
    signal_group(pid, signal.SIGKILL)
    signal_process(pid, signal.SIGKILL)
    for member in members:
        signal_process(member, signal.SIGKILL)
        if _leads_group(member):
            signal_group(member, signal.SIGKILL)
    return members


def kill_all_below(pid: int) -> None:
    """SIGKILL every descendant of `pid`, which is us and a subreaper, until none remain.

    Orphans are reparented to us before their parent can be reaped, so once we
    have no child left, nothing is left below us: a setsid daemon tree included.
    """
    while True:
        for member in descendants(pid):
            signal_process(member, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until every process has exited (a zombie counts); those still there."""
    pidfds = []
    for pid in pids:
        try:
            pidfds.append((pid, os.pidfd_open(pid)))
        except (ProcessLookupError, OSError):
            pass  # already gone
    deadline = time.monotonic() + timeout
    try:
        waiting = [fd for _, fd in pidfds]
        while waiting and (left := deadline - time.monotonic()) > 0:
            ready = readable(waiting, left)
            waiting = [fd for fd in waiting if fd not in ready]
        return [pid for pid, fd in pidfds if fd in waiting]
    finally:
        for _, fd in pidfds:
            os.close(fd)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except (ProcessLookupError, PermissionError):
        return False


def _psutil_children(pid: int) -> list[int]:
    # Kernels built without CONFIG_PROC_CHILDREN: scan every process instead. Imported
    # here: the fork server imports this module, and every fork copies what it holds.
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children()]
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []
