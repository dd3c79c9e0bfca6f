"""Ordered, bounded, non-blocking delivery of one run's updates to the backend.

One `RunSender` per run owns one queue and one thread. The executor side only
enqueues (`log`, `progress`, `update`, `complete`): that takes a lock for a
few microseconds and never touches the network, so a task's print never waits
on a slow backend. The thread delivers items strictly in enqueue order.

Rules (each one protects the backend or the user's view of the run):

- Logs: one entry per line while output is slow. Entries go out at most
  `log_rate` per second; lines that arrive meanwhile join the pending entry
  (newline-separated, at most `entry_max_bytes`). Past `max_log_entries`
  entries per run, output is kept only locally and the backend gets one final
  entry saying how many lines and where (the last entry slot is reserved for
  it). Every log POST rewrites the whole run server-side, so this is what
  keeps a chatty task from slowing the backend quadratically.
- Progress: RUNNING updates for a task coalesce (a newer pending one merges
  into the older unsent one, keeping its place) and go out at most once per
  `progress_interval`; a task's first RUNNING (it may create the task entry
  server-side) is never dropped. Other state updates never coalesce or move.
- Bounded memory: the queue holds at most `max_items` items / `max_bytes`
  bytes of log text. On overflow new log lines are dropped and counted; one
  entry "N log lines not delivered to the backend; full log at <path>" takes
  their place in the order. State updates and complete are never dropped.
- Faults: RETRYABLE → the same item again with capped exponential backoff and
  jitter. NOT_FOUND on a RUNNING/RETRYING update → the run is no longer
  wanted: `on_cancel(run_id)`, drop everything, send nothing more. NOT_FOUND
  on COMPLETED/FAILED/complete → the backend forgot the run: drop everything,
  and `on_cancel(run_id)` too (nothing more can be reported for it).
  Other 4xx → log once, drop that item, go on.
- Nothing is accepted after `complete`; after a crucial FAILED update only log
  lines and the complete are.
- A failure of ours while delivering an item (an exception, not an HTTP answer)
  does not end the thread: it is logged, `on_fault(run_id, note)` fails the run
  (once), the item is tried once more, then dropped and counted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..fault_injection import fault_point
from .api import ApiResult, ApiStatus, PerfectAPIClient

log = logging.getLogger("perfect_runner.transport")

STATES = frozenset({"PENDING", "RUNNING", "COMPLETED", "FAILED", "RETRYING"})
_LOG, _DROPPED, _STATE, _COMPLETE, _NOTICE = "log", "dropped", "state", "complete", "notice"


@dataclass
class _Item:
    """One queued delivery. Log items grow while pending (lines join)."""

    kind: str
    lines: list[str] = field(default_factory=list)
    nbytes: int = 0
    count: int = 0
    task_index: int = -1
    payload: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    first: bool = False
    task_count: int = 0
    text: str = ""


class RunSender:
    """Delivers one run's log lines and state updates, in order, from its own thread."""

    def __init__(
        self,
        client: PerfectAPIClient,
        run_id: str,
        *,
        log_path: str | None = None,
        on_cancel: Callable[[str], None] | None = None,
        on_fault: Callable[[str, str], None] | None = None,
        flow_name: str = "",
        log_rate: float = 20.0,
        max_log_entries: int = 2000,
        progress_interval: float = 0.5,
        max_items: int = 10_000,
        max_bytes: int = 8 * 1024 * 1024,
        entry_max_bytes: int = 16 * 1024,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.log_path = log_path
        self.on_cancel = on_cancel
        self.on_fault = on_fault
        self.flow_name = flow_name  # only for the test-only fault hook
        self._faulted = False
        self.log_rate = log_rate
        self.max_log_entries = max(1, max_log_entries)
        self.progress_interval = progress_interval
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.entry_max_bytes = max(256, entry_max_bytes)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._bytes = 0
        self._finishing = False  # no more items will come; exit once drained
        self._abandon = False  # close() timed out: exit now
        self._stopped = False  # 404: nothing more for this run
        self._complete_queued = False
        self._no_more_states = False  # a crucial FAILED was queued
        self._pending_progress: dict[int, _Item] = {}
        self._progress_queued_at: dict[int, float] = {}
        self._running_sent_at: dict[int, float] = {}
        self._next_log_at = 0.0
        self._limit_hit = False
        self._notice_sent = False
        self._logged: set[str] = set()
        self._in_flight = False

        self.entries_sent = 0  # log entries taken for delivery (the limit counts these)
        self.dropped_lines = 0  # lines lost to queue overflow
        self.suppressed_lines = 0  # lines past the entry limit (kept only locally)
        self.discarded_items = 0  # items dropped by 404 handling or an abandoned close

        self._thread = threading.Thread(
            target=self._run, name=f"perfect-sender-{run_id}", daemon=True
        )
        self._thread.start()

    # -- enqueue side (never blocks, never does I/O) -------------------------

    def log(self, line: str) -> None:
        """Queue one output line (no trailing newline)."""
        self.log_lines((line,))

    def log_lines(self, lines: Iterable[str]) -> None:
        """Queue several output lines under one lock acquisition."""
        with self._cond:
            for line in lines:
                self._add_line(line)
            self._cond.notify()

    def progress(self, task_index: int, payload: dict[str, Any], first: bool = False) -> None:
        """Queue a RUNNING update that may merge with an unsent one for the same task.

        `first` marks the task's start: never throttled or dropped.
        """
        payload = {**payload, "state": "RUNNING"}
        with self._cond:
            if not self._accepts_state():
                return
            pending = self._pending_progress.get(task_index)
            if pending is not None:
                pending.payload.update(payload)
                return
            now = time.monotonic()
            last = self._progress_queued_at.get(task_index)
            if not first and last is not None and now - last < self.progress_interval:
                return
            item = _Item(_STATE, task_index=task_index, payload=payload, progress=True, first=first)
            self._pending_progress[task_index] = item
            self._progress_queued_at[task_index] = now
            self._append(item)

    def update(self, task_index: int, payload: dict[str, Any]) -> None:
        """Queue a state update that keeps its place (RETRYING, COMPLETED, FAILED...)."""
        state = str(payload.get("state", "")).upper()
        if state not in STATES or not isinstance(task_index, int) or task_index < 0:
            # Without a valid state the server poisons the whole run: refuse here.
            log.error("run %s: refusing a state update without a valid state: %r",
                      self.run_id, payload.get("state"))
            return
        with self._cond:
            if not self._accepts_state():
                return
            self._pending_progress.pop(task_index, None)
            self._append(_Item(_STATE, task_index=task_index, payload={**payload, "state": state}))
            if state == "FAILED" and payload.get("crucialPass") is not False:
                self._no_more_states = True

    def complete(self, task_count: int) -> None:
        """Queue POST complete; nothing is accepted after it."""
        with self._cond:
            if self._stopped or self._complete_queued:
                return
            self._complete_queued = True
            self._append(_Item(_COMPLETE, task_count=task_count))

    def finish(self) -> None:
        """No more items will come: the thread exits once it has delivered the rest."""
        with self._cond:
            self._finishing = True
            self._cond.notify_all()

    def close(self, timeout: float) -> int:
        """Flush for at most `timeout` seconds; returns how many items were not delivered."""
        self.finish()
        self._thread.join(timeout)
        with self._cond:
            if not self._thread.is_alive():
                return 0
            self._abandon = True
            left = len(self._queue) + (1 if self._in_flight else 0)
            self.discarded_items += len(self._queue)
            self._queue.clear()
            self._bytes = 0
            self._cond.notify_all()
        log.warning("run %s: gave up delivering to the backend after %.1fs; "
                    "%d updates not delivered", self.run_id, timeout, left)
        return left

    @property
    def done(self) -> bool:
        """The thread has exited (everything delivered, or given up)."""
        return not self._thread.is_alive()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- enqueue helpers (lock held) -----------------------------------------

    def _accepts_state(self) -> bool:
        return not (self._stopped or self._complete_queued or self._no_more_states)

    def _append(self, item: _Item) -> None:
        self._queue.append(item)
        self._bytes += item.nbytes
        self._cond.notify()

    def _add_line(self, line: str) -> None:
        if self._stopped or self._complete_queued:
            return
        if self._limit_hit:
            self.suppressed_lines += 1
            return
        line = _clip(line, self.entry_max_bytes)
        size = len(line.encode("utf-8", "replace")) + 1
        if self._bytes + size > self.max_bytes:
            self._drop_line()
            return
        tail = self._queue[-1] if self._queue else None
        if tail is not None and tail.kind == _LOG and tail.nbytes + size <= self.entry_max_bytes:
            tail.lines.append(line)
            tail.nbytes += size
            self._bytes += size
            return
        if len(self._queue) >= self.max_items:
            self._drop_line()
            return
        self._append(_Item(_LOG, lines=[line], nbytes=size))

    def _drop_line(self) -> None:
        """Overflow: count the line into the notice that takes its place in the order."""
        self.dropped_lines += 1
        tail = self._queue[-1] if self._queue else None
        if tail is not None and tail.kind == _DROPPED:
            tail.count += 1
        else:
            # Exempt from the bounds: between two notices there is always a real item.
            self._queue.append(_Item(_DROPPED, count=1))

    # -- delivery thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                item = self._next_item()
                if item is None:
                    return
                self._deliver_contained(item)
        except Exception:  # a sender bug must not pass silently
            log.exception("run %s: backend sender crashed", self.run_id)
        finally:
            with self._cond:
                self._in_flight = False
            self.client.close_thread_session()

    def _next_item(self) -> _Item | None:
        """The next item to send (waiting for one), or None when the thread should exit."""
        with self._cond:
            self._in_flight = False
            while True:
                if self._abandon or self._stopped:
                    return None
                item = self._take_ready()
                if item is not None:
                    self._in_flight = True
                    return item
                if not self._queue and self._finishing:
                    notice = self._final_notice()
                    if notice is None:
                        return None
                    self._in_flight = True
                    return notice
                self._cond.wait(self._wait_time())

    def _wait_time(self) -> float | None:
        head = self._queue[0] if self._queue else None
        if head is not None and head.kind in (_LOG, _DROPPED):
            return max(0.0, self._next_log_at - time.monotonic())
        return None

    def _take_ready(self) -> _Item | None:
        """Pop the head if it may go now; log entries wait for their rate slot."""
        while self._queue:
            head = self._queue[0]
            if head.kind == _COMPLETE and not self._notice_sent and self.suppressed_lines:
                return self._final_notice()
            if head.kind in (_LOG, _DROPPED):
                now = time.monotonic()
                if now < self._next_log_at:
                    return None
            self._queue.popleft()
            self._bytes -= head.nbytes
            if self._admit(head):
                return head
        return None

    def _admit(self, item: _Item) -> bool:
        """Last checks as an item leaves the queue; False means drop it."""
        if item.kind in (_LOG, _DROPPED):
            lines = len(item.lines) if item.kind == _LOG else item.count
            if self.entries_sent >= self.max_log_entries - 1:
                # The last slot is reserved for the "kept only locally" entry.
                self._limit_hit = True
                self.suppressed_lines += lines
                return False
            self.entries_sent += 1
            self._next_log_at = time.monotonic() + (1.0 / self.log_rate if self.log_rate else 0)
            item.text = self._entry_text(item)
            return True
        if item.kind == _STATE and item.progress:
            if self._pending_progress.get(item.task_index) is item:
                del self._pending_progress[item.task_index]
            last = self._running_sent_at.get(item.task_index)
            recent = last is not None and time.monotonic() - last < self.progress_interval
            return item.first or not recent
        return True

    def _entry_text(self, item: _Item) -> str:
        if item.kind == _LOG:
            return "\n".join(item.lines)
        return (f"{item.count} log lines not delivered to the backend; "
                f"full log at {self._where()}")

    def _final_notice(self) -> _Item | None:
        if self._notice_sent or not self.suppressed_lines:
            return None
        self._notice_sent = True
        self.entries_sent += 1
        text = (f"{self.suppressed_lines} more log lines were kept only locally "
                f"(limit of {self.max_log_entries} log entries per run reached); "
                f"full log at {self._where()}")
        return _Item(_NOTICE, text=text)

    def _where(self) -> str:
        return self.log_path or "the runner's local log"

    def _deliver(self, item: _Item) -> None:
        delay = self.backoff_initial
        while True:
            result = self._send(item)
            if result.status is not ApiStatus.RETRYABLE:
                break
            self._log_once("down", logging.WARNING,
                           "run %s: backend unreachable (%s); retrying", result.describe())
            if not self._backoff(delay):
                return
            delay = min(self.backoff_max, delay * 2)
        if "down" in self._logged:
            self._logged.discard("down")
            log.info("run %s: backend reachable again", self.run_id)
        self._handle(item, result)

    def _deliver_contained(self, item: _Item) -> None:
        for attempt in (1, 2):
            try:
                fault_point("sender.deliver", self.flow_name, self.run_id)
                self._deliver(item)
                return
            except Exception as exc:  # noqa: BLE001 - a bug of ours fails the run, not the thread
                log.exception("run %s: delivering %s failed (attempt %d)", self.run_id,
                              self._describe(item), attempt)
                self._fault(f"delivering {self._describe(item)} to the backend raised "
                            f"{type(exc).__name__}: {exc}")
        self.discarded_items += 1
        log.error("run %s: %s dropped after 2 failed attempts", self.run_id,
                  self._describe(item))

    def _fault(self, note: str) -> None:
        if self._faulted or self.on_fault is None:
            return
        self._faulted = True
        try:
            self.on_fault(self.run_id, note)
        except Exception:  # noqa: BLE001
            log.exception("run %s: on_fault callback failed", self.run_id)

    def _send(self, item: _Item) -> ApiResult:
        if item.kind in (_LOG, _DROPPED, _NOTICE):
            return self.client.send_log(self.run_id, item.text)
        if item.kind == _COMPLETE:
            return self.client.complete_flow(self.run_id, item.task_count)
        return self.client.post_state(self.run_id, item.task_index, item.payload)

    def _backoff(self, delay: float) -> bool:
        """Wait before a retry; False when the sender was abandoned meanwhile."""
        deadline = time.monotonic() + delay * random.uniform(0.5, 1.0)
        with self._cond:
            while not self._abandon:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                self._cond.wait(remaining)
        return False

    def _handle(self, item: _Item, result: ApiResult) -> None:
        if result.ok:
            if item.kind == _STATE and item.payload.get("state") == "RUNNING":
                with self._cond:
                    self._running_sent_at[item.task_index] = time.monotonic()
            return
        if result.status is ApiStatus.NOT_FOUND and item.kind in (_STATE, _COMPLETE):
            self._not_found(item)
            return
        what = self._describe(item)
        self._log_once(f"4xx:{item.kind}:{result.http_status}", logging.WARNING,
                       "run %s: backend refused %s (%s); not retried",
                       what, result.describe())

    def _not_found(self, item: _Item) -> None:
        state = item.payload.get("state") if item.kind == _STATE else None
        dropped = self._stop()
        if state in ("RUNNING", "RETRYING"):
            log.warning("run %s: backend answered 404 to task %d's %s update: the run is no "
                        "longer wanted (stopped in the UI or failed by the heartbeat watchdog); "
                        "%d pending updates dropped", self.run_id, item.task_index, state, dropped)
        else:
            log.warning("run %s: backend no longer knows this run (404 on %s); "
                        "%d pending updates dropped", self.run_id, self._describe(item), dropped)
        # Either way nothing more can be reported for this run: it is not wanted.
        if self.on_cancel is not None:
            try:
                self.on_cancel(self.run_id)
            except Exception:
                log.exception("run %s: on_cancel callback failed", self.run_id)

    def _stop(self) -> int:
        with self._cond:
            self._stopped = True
            dropped = len(self._queue)
            self.discarded_items += dropped
            self._queue.clear()
            self._bytes = 0
            self._pending_progress.clear()
            self._cond.notify_all()
            return dropped

    def _describe(self, item: _Item) -> str:
        if item.kind == _STATE:
            return f"task {item.task_index}'s {item.payload.get('state')} update"
        if item.kind == _COMPLETE:
            return "complete"
        return "a log entry"

    def _log_once(self, key: str, level: int, msg: str, *args: Any) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        log.log(level, msg, self.run_id, *args)


def _clip(line: str, max_bytes: int) -> str:
    """Cut a single line that would not fit in one entry (the local log keeps it whole)."""
    if len(line) * 4 <= max_bytes:
        return line
    raw = line.encode("utf-8", "replace")
    if len(raw) <= max_bytes - 1:
        return line
    kept = raw[: max_bytes - 80].decode("utf-8", "ignore")
    return f"{kept} ... [line of {len(raw)} bytes cut]"
