"""Keep a fork server running: start one, and a new one whenever it dies.

A fork server can die: a task kills it (it is the parent of every flow and
task process, so `os.kill(os.getppid(), signal.SIGKILL)` reaches it), or the
OOM killer picks it. Its flow and task processes die with it (parent-death
signal), and the runs they served fail with a note saying how it died (see
`ExitInfo.server_died`).

A watcher thread waits for the server to exit, says so in the log, and starts
a new one, which preloads the flows modules again. A server that keeps dying
is restarted with a backoff (`Backoff`): at once the first time; when a server
dies within `STABLE_AFTER` seconds of its start, the next start waits 1 s,
then 2, 4, 8, 16, then 30 s (the cap); a server that stayed up `STABLE_AFTER`
seconds resets this. A start that fails (the modules no longer load) counts
as a quick death.

While no server is running, `running` is False (the worker stops polling for
work meanwhile), and a request waits up to `READY_WAIT` seconds for the next
server before it fails with a note saying why there is none.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass

from .child_bootstrap import ChildConfig
from .launcher import (
    START_METHODS,
    LaunchError,
    PendingChild,
    ServerGone,
    ServerProcess,
    how_it_ended,
)
from .metadata import Metadata
from .sandbox import MODES

log = logging.getLogger("perfect_runner.isolation")

STABLE_AFTER = 30.0  # seconds a server must live for its death not to count as "again"
READY_WAIT = 10.0  # seconds a request waits for a new server


@dataclass
class Backoff:
    """Delays between starts of a fork server that keeps dying; a pure step, no clock."""

    first: float = 1.0
    cap: float = 30.0
    stable_after: float = STABLE_AFTER
    quick_deaths: int = 0  # deaths in a row, each within `stable_after` of its start

    def after_death(self, uptime: float) -> float:
        """Seconds to wait before the next start, given how long the dead server lived."""
        self.quick_deaths = self.quick_deaths + 1 if uptime < self.stable_after else 1
        if self.quick_deaths <= 1:
            return 0.0
        return min(self.cap, self.first * 2 ** (self.quick_deaths - 2))


def start_launcher(method: str, modules: list[str], env: dict[str, str],
                   sandbox: str = "auto") -> HealingLauncher:
    if method not in START_METHODS:
        raise LaunchError(f"unknown start method {method!r}: use one of "
                          f"{', '.join(START_METHODS)}")
    if sandbox not in MODES:
        raise LaunchError(f"unknown sandbox mode {sandbox!r}: use one of {', '.join(MODES)}")
    return HealingLauncher(modules, env, exec_children=method == "spawn", sandbox=sandbox)


FALLBACK_WARNING = (
    "sandbox unavailable ({why}); tasks run as plain processes: they can see and signal "
    "the worker's processes, a task running as root can read the worker's token, and only "
    "the fork server's cleanup keeps a killed worker from leaving task processes behind. "
    "Use --sandbox off to silence this, or see 'Security model' in the README")


class HealingLauncher:
    """The Launcher of the executor: one fork server at a time, restarted when it dies."""

    def __init__(self, modules: list[str], env: dict[str, str],
                 exec_children: bool = False, sandbox: str = "auto") -> None:
        self._start_server = functools.partial(ServerProcess, modules, env, exec_children,
                                               sandbox)
        server = self._start_server()  # a LaunchError here is the user's: modules do not load
        self.sandbox = server.sandbox  # the mode the first server chose; said once
        if self.sandbox.why:
            log.warning(FALLBACK_WARNING.format(why=self.sandbox.why))
        self.metadata: Metadata = server.metadata
        self.down_reason = ""  # why no server is running, while none is
        self.restarts = 0
        self._server: ServerProcess | None = server
        self._started_at = time.monotonic()
        self._backoff = Backoff()
        self._closed = False
        self._cond = threading.Condition()
        self._watcher = threading.Thread(target=self._watch, args=(server,),
                                         name="forkserver-watch", daemon=True)
        self._watcher.start()

    @property
    def server_pid(self) -> int | None:
        server = self._server
        return server.pid if server else None

    @property
    def running(self) -> bool:
        return self._server is not None

    def wait_running(self, timeout: float) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._server is not None or self._closed, timeout)
            return self._server is not None

    def request(self, config: ChildConfig, fds: tuple[int, int, int]) -> PendingChild:
        """Send the request to the running server; if it just died, to the next one."""
        gone: ServerGone | None = None
        for _ in range(2):
            server = self._up_server()
            try:
                return server.request(config, fds)
            except ServerGone as exc:
                gone = exc
                server.death()  # until the watcher has taken it down
        raise LaunchError(f"{gone}; a new one did not start in time") from None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            server, self._server = self._server, None
            self._cond.notify_all()
        if server is not None:
            server.close()
        self._watcher.join(5.0)

    # --- the watcher thread ------------------------------------------------

    def _up_server(self) -> ServerProcess:
        with self._cond:
            self._cond.wait_for(lambda: self._server is not None or self._closed, READY_WAIT)
            if self._closed:
                raise LaunchError("the runner is shutting down")
            if self._server is None:
                raise LaunchError(f"no fork server is running: {self.down_reason}")
            return self._server

    def _watch(self, server: ServerProcess) -> None:
        while server is not None:
            how = how_it_ended(server.proc.wait())
            uptime = time.monotonic() - self._started_at
            with self._cond:
                closed = self._closed
                self._server = None
                self.down_reason = f"the fork server died ({how})"
            server.mark_dead(how)
            if closed:
                return
            log.error("fork server (pid %d) died (%s); the flow and task processes it "
                      "served died with it; starting a new one", server.pid, how)
            server = self._restart(self._backoff.after_death(uptime))

    def _restart(self, delay: float) -> ServerProcess | None:
        """Start a new server after `delay` s, retrying with backoff; None once closed."""
        while True:
            if delay:
                log.warning("fork server died %d times in a row; next start in %.0f s",
                            self._backoff.quick_deaths, delay)
                self.down_reason += f"; next start in {delay:.0f} s"
            with self._cond:
                if self._cond.wait_for(lambda: self._closed, delay):
                    return None
            try:
                server = self._start_server()
            except Exception as exc:  # noqa: BLE001 - keep trying, loudly
                log.error("could not start a new fork server: %s", exc)
                self.down_reason = f"a new fork server could not start: {exc}"
                delay = self._backoff.after_death(0.0)
                continue
            return self._came_up(server)

    def _came_up(self, server: ServerProcess) -> ServerProcess | None:
        with self._cond:
            if self._closed:
                server.close()
                return None
            self._server, self._started_at = server, time.monotonic()
            self.restarts += 1
            self._cond.notify_all()
        log.info("new fork server started (pid %d) with the flows modules preloaded",
                 server.pid)
        if server.metadata != self.metadata:
            log.warning("the flows modules changed since the worker started: runs use the "
                        "new code, the backend still shows the definitions read at start")
        return server
