"""Task processes started ahead of the next task calls.

Starting a task process (a request to the fork server, a fork, the child's
bootstrap) is most of a task call's overhead. A run keeps spares, already
bootstrapped (and rehearsed, see `task_child.rehearse`) and waiting for their
RunTask, so a task call does not wait for a fork. The run starts the next ones
once a call's reply is out, or beside a task that lasts (its first progress
tick): a short call's successor is not forked while the call runs, competing
with it for a core. A spare learns its environment, limits and user from the
RunTask, so one spare fits any task of its run, and it serves no other: the
spares are the run's and die with it.

How many: as many as measured demand calls for, within `MAX_SPARES`. A call
that finds no spare whose fork server answer has come (the fork was not done
in time) raises the count by one; `CALM_CALLS` calls in a row that found one
lower it again, down to one. Every run keeps one; the spares beyond that come
from a budget shared by all runs of the worker (`EXTRA_BUDGET`), so many runs
at once on a busy machine do not each hold `MAX_SPARES` idle processes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque

from ..isolation.child_process import ChildProcess
from ..isolation.launcher import Launcher, LaunchError
from ..isolation.oskit import readable
from ..isolation.selector_loop import SelectorLoop
from ..isolation.supervisor import start_task_process

log = logging.getLogger("perfect_runner.executor")

# Each waiting spare is a forked interpreter sharing the fork server's pages:
# a few hundred KiB of its own. Three keep a call from waiting for a fork on a
# loaded machine; more only hold memory.
MAX_SPARES = 3
CALM_CALLS = 50
EXTRA_BUDGET = 2 * (os.cpu_count() or 1)


class _Budget:
    """Spares beyond each run's first, counted across the worker's runs."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.free <= 0:
                return False
            self.free -= 1
            return True

    def give(self, count: int) -> None:
        with self._lock:
            self.free += count


EXTRA = _Budget(EXTRA_BUDGET)


class SparePool:
    def __init__(self, launcher: Launcher, loop: SelectorLoop, max_result: int,
                 limit: int = MAX_SPARES) -> None:
        self.launcher = launcher
        self.loop = loop
        self.max_result = max_result
        self.limit = max(0, limit)
        self.wanted = min(1, self.limit)  # how many to keep: measured demand
        self.started = 0  # spares requested over the run (for the bench and tests)
        self._calm = 0  # calls in a row that found a spare ready
        self._spares: deque[ChildProcess] = deque()

    @property
    def waiting(self) -> int:
        return len(self._spares)

    def prepare(self) -> None:
        """Start spares until `wanted` are waiting."""
        while len(self._spares) < self.wanted and self.launcher.running:
            try:
                # Deferred: the fork server's answer is not waited for here.
                child = start_task_process(self.launcher, self.loop, _idle_output,
                                           self.max_result, deferred=True)
                self.started += 1
            except LaunchError as exc:
                log.debug("no spare task process: %s", exc)  # the call starts its own
                return
            self._spares.append(child)
            # Its answer is taken when it comes, while the run waits for the flow
            # process anyway, not when a call needs the spare.
            self.loop.add(child.pending.reply, lambda c=child: self._on_answer(c))

    def _on_answer(self, child: ChildProcess) -> bool:
        self._unwatch(child)
        try:
            child.ready()
        except LaunchError as exc:
            log.debug("spare task process did not start: %s", exc)
            self._spares.remove(child)
        return True  # unwatched already: the reply socket now reports the exit

    def _unwatch(self, child: ChildProcess) -> None:
        if child.pending is not None:
            self.loop.remove(child.pending.reply)

    def take(self) -> ChildProcess | None:
        """The oldest waiting spare that is alive; the caller owns it from now on."""
        self._measure()
        while self._spares:
            child = self._usable(self._spares.popleft())
            if child is not None:
                return child
        return None

    def _measure(self) -> None:
        if self._spares and _answered(self._spares[0]):
            self._calm += 1
            if self._calm >= CALM_CALLS and self.wanted > 1:
                self.wanted, self._calm = self.wanted - 1, 0
                EXTRA.give(1)
            return
        # No spare, or its fork was not done: this call waits for one.
        self._calm = 0
        if 0 < self.wanted < self.limit and EXTRA.take():
            self.wanted += 1

    def _usable(self, child: ChildProcess) -> ChildProcess | None:
        self._unwatch(child)
        try:
            child.ready()
        except LaunchError as exc:
            log.debug("spare task process did not start: %s", exc)
            return None
        self.loop.poll(0)  # hear of its exit, if it died (or broke the protocol) waiting
        # Its pidfd says it is dead before the fork server's report of its exit comes.
        if child.over or _dead(child):
            child.stop()
            return None
        return child

    def discard(self) -> None:
        """Stop every waiting spare and wait until each is gone; the run keeps none."""
        EXTRA.give(max(0, self.wanted - 1))
        self.wanted = 0
        while self._spares:
            child = self._spares.popleft()
            self._unwatch(child)
            try:
                child.ready()
            except LaunchError:
                continue
            child.stop()


def _answered(child: ChildProcess) -> bool:
    """The fork server has answered for it: forked (perhaps still bootstrapping)."""
    pending = child.pending
    if pending is None:
        return True
    return bool(readable([pending.reply.fileno()], 0))


def _dead(child: ChildProcess) -> bool:
    pidfd = child.handle.pidfd
    return pidfd < 0 or bool(readable([pidfd], 0))


def _idle_output(stream: str, lines: list[str]) -> None:
    # A spare has run no user code yet; anything it says is the runner's own trouble.
    for line in lines:
        log.warning("spare task process (%s): %s", stream, line)
