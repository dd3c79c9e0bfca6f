"""Ctrl-C and SIGTERM during a local run.

The first signal stops the run the way Ctrl-C stops a plain script: each
running task gets KeyboardInterrupt (its `finally` blocks run) and
`--kill-grace` seconds, then its whole tree is killed. The run ends FAILED,
its tasks noted "interrupted by ...", its summary, reports and log written,
and no further flow starts. A second signal stops at once: every process the
runner started is killed (the fork server is a subreaper, so its tree holds
them all) and the runner exits.

The handler runs on the main thread between two bytecodes of whatever it was
doing, so it only sets state and wakes the run's loop (the run then says it is
stopping, through its listeners); it takes no lock the interrupted code may
hold, and writes to fd 2 only when no run is there to speak, or to exit.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..executor.flow_run import FlowRun
from ..isolation.outcome import Kind
from ..isolation.proctree import kill_tree

_HOW = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + signum


class Interruption:
    """Installed around the local runs (main thread only); `signum` is the first signal."""

    def __init__(self, server_pid: Callable[[], int | None]) -> None:
        self.server_pid = server_pid  # the fork server running now (it may be replaced)
        self.signum: int | None = None
        self._run: FlowRun | None = None
        self._previous: dict[int, Any] = {}

    @property
    def reason(self) -> str:
        return _HOW.get(self.signum or 0, f"signal {self.signum}")

    def __enter__(self) -> Interruption:
        for signum in _HOW:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def attach(self, run: FlowRun | None) -> None:
        """The run a signal stops (None between runs)."""
        self._run = run
        if run is not None and self.signum is not None:
            run.cancel(self.reason, Kind.INTERRUPTED)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            self._stop_now(signum)
        self.signum = signum
        if self._run is not None:
            self._run.cancel(self.reason, Kind.INTERRUPTED)  # the run says it is stopping
        else:
            _say(f"{_HOW[signum]}: stopping (Ctrl-C again stops at once)")

    def _stop_now(self, signum: int) -> None:
        _say(f"{_HOW[signum]} again: stopping now")
        try:
            server = self.server_pid()
            if server:
                kill_tree(server)
        finally:
            os._exit(exit_code(signum))


def _say(text: str) -> None:
    try:
        os.write(2, f"\nperfect-runner: {text}\n".encode())
    except OSError:
        pass
