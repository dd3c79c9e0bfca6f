"""A task's process tree: measure it, and kill all of it.

The tree is the task process, its process group, and every descendant found
by walking /proc (descendants that called setsid left the group but are still
descendants). Errors mean "already gone" and are treated as such.
"""

from __future__ import annotations

import os
import signal

import psutil

from .oskit import signal_group, signal_process


def direct_children(pid: int) -> list[int]:
    """Children of a process from /proc, without scanning every process."""
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


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def tree_usage(pid: int) -> tuple[int, int]:
    """Resident memory (bytes) and process count of the process and its descendants."""
    total = 0
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return 0, 0
    for member in members:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return total, len(members)


def kill_tree(pid: int, known: list[psutil.Process] | None = None) -> None:
    """SIGKILL the process, its group, and its descendants (found now or earlier)."""
    members = {p.pid for p in (known or [])} | {p.pid for p in descendants(pid)}
    signal_group(pid, signal.SIGKILL)
    signal_process(pid, signal.SIGKILL)
    for member in members:
        signal_process(member, signal.SIGKILL)
        if _leads_group(member):
            signal_group(member, signal.SIGKILL)


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except (ProcessLookupError, PermissionError):
        return False
