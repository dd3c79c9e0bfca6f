"""Bounded, non-blocking delivery of one run's updates to the backend.

One `RunSender` per run owns its pending items and one thread. The executor side
only enqueues (`log`, `progress`, `update`, `complete`): that takes a lock for a
few microseconds and never touches the network, so a task's print never waits
on a slow backend. Only this thread talks to the backend for the run, one
request at a time.

Rules (each one protects the user's view of the run or the backend):

- Terminal states first. States (and `complete`) keep their order among
  themselves and never wait long behind log lines: a state waits at most
  `state_wait` seconds for the lines printed before it (sent one per entry if
  they fit in that time, else joined into one entry); past that, or when they
  do not fit in one entry, the state goes first and the lines follow it.
- End of run: once `complete` is queued, the log backlog left becomes at most
  one entry (the lines themselves if they fit in one entry, else a note saying
  how many lines and where the full log is), then the states, then complete.
- Readable logs: while the backend keeps up (see `pacing.Pace`), each line is
  its own entry, bursts of a few dozen lines included. Lines are joined only
  when the pending ones cannot go one by one within `max_lag` seconds, and a
  joined entry starts with "[N lines]". Entries go at most `log_rate` per
  second after a burst of `log_burst`.
- Short, bounded backlog: pending log text is capped at what the backend can
  take in `max_backlog` seconds at its measured pace (and at `max_bytes`). Past
  the cap the oldest pending lines are dropped and counted (the newest, where
  errors are, are kept); one entry "N log lines not delivered to the backend
  (too slow to keep up); full log at <path>" takes their place. Past
  `max_log_entries` entries per run, output is kept only locally and one last
  entry says so. A state update and complete are never dropped.
- Progress: RUNNING updates for a task coalesce (a newer pending one merges into
  the unsent one) and go out at most once per `progress_interval`; a task's
  first RUNNING (it may create the task entry server-side) is never dropped.
- Faults: RETRYABLE -> the same item again with capped exponential backoff and
  jitter. NOT_FOUND on a state or complete -> the run is no longer wanted (or
  forgotten): `on_cancel(run_id)`, drop everything, send nothing more. Other
  4xx -> log once, drop that item, go on.
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
from ..sdk.result import TaskState
from .api import ApiResult, ApiStatus, PerfectAPIClient
from .backlog import Entry, LogBacklog, clip_line
from .pacing import Pace, ProgressGate

log = logging.getLogger("perfect_runner.transport")

STATES = frozenset(TaskState)
_LOG, _STATE, _COMPLETE = "log", "state", "complete"
_EXIT = -1.0  # _choose's wait value: nothing more will ever come


@dataclass
class _Item:
    """One delivery: a log entry, a state update or complete."""

    kind: str
    seq: int = 0
    queued_at: float = 0.0
    text: str = ""
    lines: int = 0
    task_index: int = -1
    payload: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    first: bool = False
    task_count: int = 0


class RunSender:
    """Delivers one run's log lines and state updates from its own thread."""

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
        log_burst: int = 50,
        max_log_entries: int = 2000,
        progress_interval: float = 0.5,
        max_bytes: int = 8 * 1024 * 1024,
        entry_max_bytes: int = 16 * 1024,
        max_lag: float = 2.0,
        state_wait: float = 0.5,
        max_backlog: float = 10.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.log_path = log_path
        self.on_cancel = on_cancel
        self.on_fault = on_fault
        self.flow_name = flow_name  # for the final report and the test-only fault hook
        self._faulted = False
        self.max_log_entries = max(2, max_log_entries)
        self.progress_interval = progress_interval
        self.max_bytes = max_bytes
        self.entry_max_bytes = max(256, entry_max_bytes)
        self.max_lag = max_lag
        self.state_wait = state_wait
        self.max_backlog = max_backlog
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

        self._cond = threading.Condition()
        self._pace = Pace(log_rate, log_burst)
        self._lines = LogBacklog(self.entry_max_bytes)
        self._states: deque[_Item] = deque()
        self._seq = 0
        self._finishing = False  # no more items will come; exit once drained
        self._abandon = False  # the flush gave up: exit now
        self._stopped = False  # 404: nothing more for this run
        self._complete_at: float | None = None
        self._no_more_states = False  # a crucial FAILED was queued
        self._progress = ProgressGate(progress_interval)
        self._limit_hit = False
        self._notice_sent = False
        self._logged: set[str] = set()
        self._in_flight = False
        self._complete_answered = False

        self.entries_sent = 0  # log entries taken for delivery (the limit counts these)
        self.joined_entries = 0  # entries holding more than one line
        self.dropped_lines = 0  # lines dropped from a too long backlog
        self.collapsed_lines = 0  # lines left at the end of the run, not sent themselves
        self.suppressed_lines = 0  # lines past the entry limit (kept only locally)
        self.discarded_items = 0  # items dropped by 404 handling or an abandoned flush
        self.delivered = 0  # requests answered (any final answer): flush progress

        self._thread = threading.Thread(
            target=self._run, name=f"perfect-sender-{run_id}", daemon=True
        )
        self._thread.start()

    # -- enqueue side (never blocks, never does I/O) -------------------------

    def log(self, line: str) -> None:
        """Queue one of the runner's own lines (no trailing newline): kept under a flood."""
        self.log_lines((line,), keep=True)

    def log_lines(self, lines: Iterable[str], keep: bool = False) -> None:
        """Queue several output lines under one lock acquisition.

        `keep`: lines a person reads to learn why something failed (stderr, the
        runner's own); a flood of plain output is dropped before them.
        """
        with self._cond:
            idle = not self._lines
            self._add_lines(lines, keep)
            if idle:
                # Else the thread is busy or waiting for a rate slot with a timeout: waking
                # it for every batch of a flood would only burn the control process's CPU.
                self._cond.notify()

    def progress(self, task_index: int, payload: dict[str, Any], first: bool = False) -> None:
        """Queue a RUNNING update that may merge with an unsent one for the same task.

        `first` marks the task's start: never throttled or dropped.
        """
        payload = {**payload, "state": TaskState.RUNNING}
        with self._cond:
            if not self._accepts_state():
                return
            now = time.monotonic()
            if self._progress.merge(task_index, payload) or \
                    not self._progress.may_queue(task_index, first, now):
                return
            item = self._new_state(_STATE, task_index=task_index, payload=payload,
                                   progress=True, first=first)
            self._progress.queued(task_index, item, now)

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
            self._progress.superseded(task_index)
            # The wire carries the plain string; TaskState is a str enum, so it is the same.
            self._new_state(_STATE, task_index=task_index,
                            payload={**payload, "state": TaskState(state)})
            if state == TaskState.FAILED and payload.get("crucialPass") is not False:
                self._no_more_states = True

    def complete(self, task_count: int) -> None:
        """Queue POST complete; nothing is accepted after it."""
        with self._cond:
            if self._stopped or self._complete_at is not None:
                return
            self._new_state(_COMPLETE, task_count=task_count)
            self._complete_at = time.monotonic()

    def finish(self) -> None:
        """No more items will come: the thread exits once it has delivered the rest."""
        with self._cond:
            self._finishing = True
            self._cond.notify_all()

    def abandon(self) -> int:
        """Give up now: drop what is pending; returns how many items were not delivered."""
        with self._cond:
            if not self._thread.is_alive():
                return 0
            self._abandon = True
            left = self._pending_items() + (1 if self._in_flight else 0)
            self.discarded_items += self._pending_items()
            self._clear()
            self._cond.notify_all()
        return left

    def close(self, timeout: float) -> int:
        """Flush for at most `timeout` seconds; returns how many items were not delivered."""
        self.finish()
        self._thread.join(timeout)
        left = self.abandon()
        if left:
            log.warning("run %s: gave up delivering to the backend after %.1fs; "
                        "%d updates not delivered", self.run_id, timeout, left)
        return left

    @property
    def run_over_on_backend(self) -> bool:
        """The backend heard how the run ended (complete answered), or stopped it (404)."""
        with self._cond:
            return self._complete_answered or self._stopped

    @property
    def done(self) -> bool:
        """The thread has exited (everything delivered, or given up)."""
        return not self._thread.is_alive()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending_items()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- enqueue helpers (lock held) -----------------------------------------

    def _accepts_state(self) -> bool:
        return not (self._stopped or self._complete_at is not None or self._no_more_states)

    def _pending_items(self) -> int:
        return len(self._states) + (1 if self._lines else 0)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _new_state(self, kind: str, **fields: Any) -> _Item:
        item = _Item(kind, seq=self._next_seq(), queued_at=time.monotonic(), **fields)
        self._states.append(item)
        self._cond.notify()
        return item

    def _add_lines(self, lines: Iterable[str], keep: bool) -> None:
        # Per line, only what must be: a task printing 2,000 lines costs the control
        # process this loop 2,000 times (the cap cannot change while the lock is held).
        if self._stopped or self._complete_at is not None:
            return
        if self._limit_hit:
            self.suppressed_lines += sum(1 for _ in lines)
            return
        cap, most = self._backlog_cap(), self.entry_max_bytes - 32
        add, dropped = self._lines.add, 0
        for line in lines:
            self._seq += 1
            dropped += add(self._seq, clip_line(line, most), cap, keep)
        self.dropped_lines += dropped

    def _backlog_cap(self) -> int:
        """Log text the backend can take in `max_backlog` s at its pace (floor 256 KiB)."""
        entries = self._pace.backlog_entries(self.max_backlog)
        return min(self.max_bytes, max(256 * 1024, entries * self.entry_max_bytes))

    def _clear(self) -> None:
        self._lines.clear()
        self._states.clear()
        self._progress.clear()

    # -- choosing what goes next (lock held) ---------------------------------

    def _choose(self, now: float) -> tuple[_Item | None, float | None]:
        """The next item to send, else how long to wait (None: until notified; _EXIT).

        A wait of 0 means "choose again": an entry was refused by the entry limit.
        """
        if self._complete_at is not None and self._lines:
            return self._end_entry(now), 0.0
        if self._states:
            head = self._states[0]
            if head.kind == _COMPLETE and self._notice_due():
                return self._final_notice(), 0.0
            before = self._lines.before(head.seq)
            take = self._lines_to_take_before(head, before, now) if before else 0
            if take:
                return self._take_entry(take, now), 0.0
            self._states.popleft()
            return (head if self._admit_state(head) else None), 0.0
        if self._lines:
            wait = self._pace.token_wait(now)
            if wait > 0:
                return None, wait
            return self._take_entry(self._per_entry(now), now), 0.0
        if self._finishing:
            return (self._final_notice(), 0.0) if self._notice_due() else (None, _EXIT)
        return None, None

    def _per_entry(self, now: float) -> int:
        """Lines per entry so the backlog drains within `max_lag` and a burst cannot use
        more than a quarter of the entries the run has left."""
        lines = self._lines.line_count()
        left = max(1, self.max_log_entries - 1 - self.entries_sent)
        by_limit = -(-lines * 4 // left)
        return max(by_limit, self._pace.lines_per_entry(lines, self.max_lag, now))

    def _end_entry(self, now: float) -> _Item | None:
        """Run over: lines go one by one while they fit in `state_wait`, else as one entry."""
        left = self.state_wait - (now - (self._complete_at or now))
        lines = self._lines.line_count()
        if not self._lines.head_is_marker() and self._pace.entries_within(left, now) >= lines:
            return self._take_entry(1, now)
        if not self._lines.fits_one_entry():
            self.collapsed_lines += lines
        return self._log_item(self._lines.collapse(self._where()), now)

    def _lines_to_take_before(self, head: _Item, before: int, now: float) -> int:
        """Lines printed before a waiting state: one by one (1), all joined, or 0: the
        state goes first (they do not fit in one entry, or `state_wait` is over)."""
        left = self.state_wait - (now - head.queued_at)
        if self._lines.head_is_marker():
            return 1  # a drop notice: one short entry
        if self._pace.entries_within(left, now) >= before:
            return 1
        return before if self._lines.fits_one_entry(before) else 0

    def _take_entry(self, per_entry: int, now: float) -> _Item | None:
        return self._log_item(self._lines.take(per_entry, self._where()), now)

    def _log_item(self, entry: Entry, now: float) -> _Item | None:
        """An entry, unless the per-run limit is reached (its last slot is the notice's)."""
        if self._limit_hit or self.entries_sent >= self.max_log_entries - 1:
            self._limit_hit = True
            self.suppressed_lines += entry.lines
            return None
        self.entries_sent += 1
        self.joined_entries += entry.joined
        self._pace.take(now)
        return _Item(_LOG, text=entry.text, lines=entry.lines)

    def _admit_state(self, item: _Item) -> bool:
        """False drops a RUNNING update that comes too soon after the last one sent."""
        return not item.progress or self._progress.may_send(
            item.task_index, item, item.first, time.monotonic())

    def _notice_due(self) -> bool:
        return not self._notice_sent and self.suppressed_lines > 0

    def _final_notice(self) -> _Item:
        self._notice_sent = True
        self.entries_sent += 1
        text = (f"{self.suppressed_lines} more log lines were kept only locally "
                f"(limit of {self.max_log_entries} log entries per run reached); "
                f"full log at {self._where()}")
        return _Item(_LOG, text=text)

    def _where(self) -> str:
        return self.log_path or "the runner's local log"

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
            while not (self._abandon or self._stopped):
                item, wait = self._choose(time.monotonic())
                if item is not None:
                    self._in_flight = True
                    return item
                if wait == _EXIT:
                    return None
                if wait is None or wait > 0:
                    self._cond.wait(wait)
            return None

    def _deliver(self, item: _Item) -> None:
        delay = self.backoff_initial
        while True:
            started = time.monotonic()
            result = self._send(item)
            if result.status is not ApiStatus.RETRYABLE:
                break
            self._log_once("down", logging.WARNING,
                           "run %s: backend unreachable (%s); retrying", result.describe())
            if not self._backoff(delay):
                return
            delay = min(self.backoff_max, delay * 2)
        with self._cond:
            self._pace.observe(time.monotonic() - started)
            self.delivered += 1
            self._complete_answered |= item.kind == _COMPLETE
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
        if item.kind == _LOG:
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
            if item.kind == _STATE and item.payload.get("state") == TaskState.RUNNING:
                with self._cond:
                    self._progress.sent(item.task_index, time.monotonic())
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
        if state in (TaskState.RUNNING, TaskState.RETRYING):
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
            dropped = self._pending_items()
            self.discarded_items += dropped
            self._clear()
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

