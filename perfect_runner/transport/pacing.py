"""How fast one run's log entries may go: the backend's measured cost and the rate cap.

A log POST makes the real backend rewrite the whole run in SQLite and push it to
every open UI: 2-20 ms with no UI open, 0.1-0.4 s with one open on a large
database. `Pace` measures what the backend actually takes (a moving average of
the run's POST round trips) and holds a token bucket for `--log-rate` (bursts of
`burst` entries, then `rate` per second). From both it answers the one question
the sender asks: how many entries can go within a time budget? While the
answer covers every pending line, each line is its own entry; only when it does
not are lines joined, just enough to fit.
"""

from __future__ import annotations

import math
import time
from typing import Any


class Pace:
    """The backend's cost per entry and the log-rate token bucket (caller holds a lock)."""

    def __init__(self, rate: float, burst: int = 50, initial_cost: float = 0.01) -> None:
        self.rate = rate  # 0: no cap
        self.burst = max(1, burst)
        self.cost = initial_cost
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()

    def observe(self, seconds: float) -> None:
        """One POST's round trip; the average follows a slowing backend within a few."""
        self.cost = 0.6 * self.cost + 0.4 * max(0.0, seconds)

    def _refill(self, now: float) -> float:
        if self.rate:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._tokens

    def token_wait(self, now: float) -> float:
        """Seconds until the rate cap lets the next entry go (0: now)."""
        if not self.rate:
            return 0.0
        tokens = self._refill(now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def take(self, now: float) -> None:
        """One entry went out (a state-driven one may go without a token)."""
        if self.rate:
            self._tokens = max(0.0, self._refill(now) - 1)

    def entries_within(self, budget: float, now: float) -> int:
        """How many entries can be delivered one after the other within `budget` seconds."""
        if budget <= 0:
            return 0
        cost = max(self.cost, 1e-4)
        if not self.rate:
            return int(budget / cost)
        tokens = int(self._refill(now))
        if tokens * cost >= budget:
            return int(budget / cost)
        return tokens + int((budget - tokens * cost) / max(cost, 1 / self.rate))

    def lines_per_entry(self, lines: int, budget: float, now: float) -> int:
        """Lines to put in the next entry so that `lines` drain within `budget`."""
        return max(1, math.ceil(lines / max(1, self.entries_within(budget, now))))

    def backlog_entries(self, seconds: float) -> int:
        """Entries that can be delivered in `seconds` at the sustained pace."""
        per_entry = max(self.cost, 1 / self.rate if self.rate else 0.0, 1e-4)
        return int(seconds / per_entry)


class ProgressGate:
    """How often a task's RUNNING updates go: coalesced while unsent, then throttled.

    A newer update for a task whose last one is still queued merges into it (it keeps
    its place); otherwise one is queued at most once per `interval`, and one leaves
    the queue only if none was sent within `interval`. A task's first RUNNING (it may
    create the task's row server-side) always goes. Items are the sender's queued
    updates (anything with a `payload` dict). The caller holds its lock.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._pending: dict[int, Any] = {}
        self._queued_at: dict[int, float] = {}
        self._sent_at: dict[int, float] = {}

    def merge(self, task_index: int, payload: dict[str, Any]) -> bool:
        """True when an unsent update of the task took `payload` (nothing to queue)."""
        pending = self._pending.get(task_index)
        if pending is None:
            return False
        pending.payload.update(payload)
        return True

    def may_queue(self, task_index: int, first: bool, now: float) -> bool:
        last = self._queued_at.get(task_index)
        return first or last is None or now - last >= self.interval

    def queued(self, task_index: int, item: Any, now: float) -> None:
        self._pending[task_index] = item
        self._queued_at[task_index] = now

    def superseded(self, task_index: int) -> None:
        """A final state of the task was queued: its unsent RUNNING takes no more merges."""
        self._pending.pop(task_index, None)

    def may_send(self, task_index: int, item: Any, first: bool, now: float) -> bool:
        """The item leaves the queue: False drops it (one was sent too recently)."""
        if self._pending.get(task_index) is item:
            del self._pending[task_index]
        last = self._sent_at.get(task_index)
        return first or last is None or now - last >= self.interval

    def sent(self, task_index: int, now: float) -> None:
        self._sent_at[task_index] = now

    def clear(self) -> None:
        self._pending.clear()
