"""The worker's liveness signal: POST /api/heartbeat every few seconds, always.

The backend keeps one "last heartbeat" time for all clients and fails every
RUNNING/PENDING run when it is more than 10 s old; a stale timestamp left by
an earlier client fails the next run within 1 s. So the heartbeat starts
before anything else (`wait_first_beat` lets the caller register flows only
after the first beat went out) and runs on its own thread, with its own
session and short timeouts, so a slow log upload can never delay it.
"""

from __future__ import annotations

import logging
import threading
import time

from .api import PerfectAPIClient

log = logging.getLogger("perfect_runner.transport")


class Heartbeat:
    """A daemon thread sending a heartbeat at start and then every `interval` seconds."""

    def __init__(
        self,
        client: PerfectAPIClient,
        interval: float = 3.0,
        timeout: tuple[float, float] = (2.0, 3.0),
    ) -> None:
        # The client's sessions are per thread, so this thread has its own
        # connection pool; the short timeouts keep one hung request from
        # costing more than about one beat.
        self.client = client
        self.interval = interval
        self.timeout = timeout
        self.beats_sent = 0
        self.failures = 0
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, name="perfect-heartbeat", daemon=True)
        self._down = False

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def wait_first_beat(self, timeout: float) -> bool:
        """Wait until the first beat was attempted; True if it was delivered."""
        self._first.wait(timeout)
        return self.beats_sent > 0

    def stop(self, timeout: float = 1.0) -> None:
        """Stop beating; returns within `timeout` (an in-flight request is left to time out)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            due = time.monotonic()
            while not self._stop.is_set():
                self._beat()
                self._first.set()
                # Due `interval` after the last one was due, not after it was answered:
                # a beat slowed by a busy control process (many runs at once) does not
                # push the next one back by as much.
                now = time.monotonic()
                due = max(due + self.interval, now)
                self._stop.wait(due - now)
        finally:
            self._first.set()
            self.client.close_thread_session()

    def _beat(self) -> None:
        try:
            result = self.client.send_heartbeat(timeout=self.timeout)
        except Exception:  # the heartbeat must outlive any bug in one beat
            log.exception("heartbeat failed unexpectedly")
            return
        if result.ok:
            self.beats_sent += 1
            if self._down:
                log.info("Perfect backend reachable again (heartbeat delivered)")
                self._down = False
            return
        self.failures += 1
        if not self._down:
            log.warning("Perfect backend not answering heartbeats (%s); runs may be "
                        "failed by its watchdog", result.describe())
            self._down = True
