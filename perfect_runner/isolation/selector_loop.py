"""One small event loop per flow run: readable fds with callbacks.

Contract: a callback takes no argument and returns False when its fd is done
(EOF); the loop then unregisters it. Child exit is one more readable fd (a
pidfd). Other threads wake the loop with `wake()`.
"""

from __future__ import annotations

import os
import selectors
from collections.abc import Callable
from typing import Any

from .oskit import drain_pipe


class SelectorLoop:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add(self._wake_r, self._drain_wake)

    def add(self, fileobj: Any, callback: Callable[[], bool]) -> None:
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def remove(self, fileobj: Any) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def poll(self, timeout: float | None) -> None:
        """Wait up to `timeout` s for readable fds and run their callbacks."""
        if timeout is not None and timeout < 0:
            timeout = 0
        for key, _ in self.selector.select(timeout):
            if key.data() is False:
                self.remove(key.fileobj)

    def wake(self) -> None:
        # A late wake (another thread, a signal handler) must not write to a closed fd,
        # whose number may already be someone else's.
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # already woken, or closed meanwhile

    def close(self) -> None:
        wake_w, self._wake_w = self._wake_w, -1
        self.selector.close()
        os.close(self._wake_r)
        os.close(wake_w)

    def _drain_wake(self) -> bool:
        drain_pipe(self._wake_r)
        return True
