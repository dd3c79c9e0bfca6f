"""The first moments of a flow or task process, in a fixed order.

Whatever the start method (forked from the fork server, or a fresh
interpreter), a child runs `become_child` and never returns from it:

1. last-chance stderr: bootstrap errors go straight to the stderr pipe;
2. reset signal dispositions inherited from the fork server;
3. its own session and process group, so its whole tree can be signalled;
4. parent-death signal, so it never outlives the runner; child subreaper, so
   descendants that double-fork stay in its tree while it lives (and go to the
   fork server, which kills them, once it is gone);
5. the pipes onto fds 1 and 2, /dev/null onto fd 0;
6. close every other inherited fd but the channel;
7. run the role: it reads its first frame, applies the `ProcessSetup` in it
   (see `process_setup`), and only then runs user code;
8. leave through `os._exit` (no atexit, no flushing of buffers inherited
   from the fork server); what the role left running is reparented to the
   fork server, which kills it before it reports the exit.

Exit codes at or above `EXIT_BOOTSTRAP` are reserved for failures of the
runner's own code, so the supervisor can tell them from a task's `os._exit`.
"""

from __future__ import annotations

import _signal
import faulthandler
import io
import os
import resource
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .oskit import become_subreaper, die_with_parent
from .protocol import EXIT_BOOTSTRAP, STACK_DUMP_SIGNAL


@dataclass
class ChildConfig:
    """What a child is, known when it is started; crosses the boundary as JSON."""

    role: str  # "task" or "flow"
    parent_pid: int

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def become_child(config: ChildConfig, out_fd: int, err_fd: int, chan_fd: int) -> None:
    """Set up the process and run its role; never returns."""
    code = EXIT_BOOTSTRAP
    report_fd = err_fd
    try:
        _reset_signals()
        os.setsid()
        die_with_parent(config.parent_pid)
        # Orphans of our descendants stay in our tree, where the supervisor finds them.
        become_subreaper()
        chan_fd = _wire_fds(out_fd, err_fd, chan_fd)
        report_fd = 2
        chan = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, chan_fd)
        code = _role_entry(config.role)(chan)
    except BaseException:  # noqa: BLE001 - last chance: say what broke, exit reserved
        _last_chance_report(report_fd)
    finally:
        _flush_std()
        os._exit(code)  # what we leave running, the fork server kills (and reaps)


def _reset_signals() -> None:
    # The C-level _signal skips the enum wrapping of `signal`: this runs in every child.
    _signal.set_wakeup_fd(-1)
    for sig in _DEFAULT_SIGNALS:
        if sig != STACK_DUMP_SIGNAL or not _streams.inherited:  # faulthandler's, see below
            _signal.signal(sig, _signal.SIG_DFL)
    _signal.signal(signal.SIGINT, _signal.default_int_handler)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])


_DEFAULT_SIGNALS = tuple(int(s) for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP,
                                           signal.SIGUSR1, signal.SIGUSR2))


class _Streams:
    inherited = False  # the fork server made them: see `prepare_streams`


_streams = _Streams()


def prepare_streams() -> None:
    """In the fork server, once: the std streams and fault handler its children use.

    A child puts its pipes on fds 1 and 2 under these very objects, and keeps
    the fault handler (and its SIGUSR1 stack dumps) it inherits. Making them in
    every child cost it ~0.3 ms: the io and codec objects that creation touches
    are copy-on-write faults in a forked child.
    """
    _flush_std()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _make_streams()
    _streams.inherited = True


def _make_streams() -> None:
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = _text_stream(1)
    sys.stderr = _text_stream(2)
    sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(STACK_DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)


def _wire_fds(out_fd: int, err_fd: int, chan_fd: int) -> int:
    """Put the pipes on 1/2 and /dev/null on 0; close all else; return the channel fd."""
    _flush_std()
    if not _streams.inherited:  # the fork server's fd 0 is /dev/null already
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    # Move the channel to fd 3 so one closerange clears everything else.
    if chan_fd != 3:
        os.dup2(chan_fd, 3)
    os.set_inheritable(3, False)
    os.closerange(4, _max_fd())
    if not _streams.inherited:
        _make_streams()
    return 3


def _text_stream(fd: int) -> io.TextIOWrapper:
    # Line buffered so the user sees lines live and a crash loses at most a partial line.
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
        line_buffering=True,
    )


def _max_fd() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 65536


_ROLES: dict[str, Callable[[socket.socket], int]] = {}


def preload_roles() -> None:
    """Import the child-side code once in the fork server, not in every child (an
    import statement, even of a loaded module, runs importlib code in the child)."""
    from .flow_child import run_flow
    from .task_child import run_task

    _ROLES.update(task=run_task, flow=run_flow)


def _role_entry(role: str) -> Callable[[socket.socket], int]:
    if not _ROLES:
        preload_roles()
    if role not in _ROLES:
        raise ValueError(f"unknown child role {role!r}")
    return _ROLES[role]


def _last_chance_report(fd: int) -> None:
    try:
        text = "perfect_runner: child bootstrap failed:\n" + traceback.format_exc()
        os.write(fd, text.encode(errors="replace"))
    except OSError:
        pass


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or replaced stream: nothing to flush
            pass
