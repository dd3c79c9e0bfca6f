"""A task process started ahead of the next task call.

Starting a task process (a request to the fork server, a fork, the child's
bootstrap) is most of a task call's overhead. A run keeps one spare, already
bootstrapped and waiting for its RunTask, and starts the next one while the
current task runs, so a task call does not wait for a fork. The spare learns
its environment, limits and user from the RunTask, so one spare fits any task.
"""

from __future__ import annotations

import logging

from ..isolation.child_process import ChildProcess
from ..isolation.launcher import Launcher, LaunchError
from ..isolation.selector_loop import SelectorLoop
from ..isolation.supervisor import start_task_process

log = logging.getLogger("perfect_runner.executor")


class WarmSpare:
    def __init__(self, launcher: Launcher, loop: SelectorLoop, max_result: int) -> None:
        self.launcher = launcher
        self.loop = loop
        self.max_result = max_result
        self._child: ChildProcess | None = None

    def prepare(self) -> None:
        """Start the next spare, unless one is waiting already."""
        if self._child is not None or not self.launcher.running:
            return  # no fork server now: a call starts its own once one is back
        try:
            # Deferred: we do not wait for the fork server's answer now (the task that
            # just started may finish meanwhile); it is read when the spare is taken.
            self._child = start_task_process(self.launcher, self.loop, _idle_output,
                                             self.max_result, deferred=True)
        except LaunchError as exc:
            log.debug("no spare task process: %s", exc)  # the call will start its own

    def take(self) -> ChildProcess | None:
        """The waiting spare, if it is still alive; the caller owns it from now on."""
        child, self._child = self._child, None
        if child is None:
            return None
        try:
            child.ready()
        except LaunchError as exc:
            log.debug("spare task process did not start: %s", exc)
            return None
        self.loop.poll(0)  # hear of its exit, if it died (or broke the protocol) waiting
        if child.over:
            child.stop()
            return None
        return child

    def discard(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        try:
            child.ready()
        except LaunchError:
            return
        child.stop()


def _idle_output(stream: str, lines: list[str]) -> None:
    # A spare has run no user code yet; anything it says is the runner's own trouble.
    for line in lines:
        log.warning("spare task process (%s): %s", stream, line)
