"""What a local run shows on the terminal.

Two modes, chosen by whether the stream is a terminal:

- live: a status block at the bottom (each active run, its tasks with state,
  progress bar and duration) redrawn with ANSI at most ~10 times a second,
  with task output scrolling above it;
- plain: one line per event, for logs and pipes.

Both modes print at most ``max_lines_per_second`` output lines a second per
source (a task call, or a flow body) and four times that in total, so one
flooding task neither buries the terminal nor silences the next task. What is
held back is counted and reported as "... N lines not shown (see log file)"
when the source may speak again, when its task finishes, or at the next
progress tick once the rate allows. Nothing is dropped without a count. When a
run finishes, a summary (tasks, states, durations, notes, result tables and
the log file's path) is printed.

Task-provided text (output, notes, names, table cells) is untrusted: ANSI
escape sequences and control characters are stripped before it reaches the
terminal, so a task cannot move the cursor, retitle the window or reset it.

Several runs may report at once from their own threads. Events update state
and queue text under one lock; the text is written outside it, by whichever
thread gets the write lock first, in queue order, so a slow terminal never
blocks another run's bookkeeping and frames never interleave.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from ..executor.events import NullListener
from ..executor.records import RunRecord, TaskRecord, shown_state, tally
from ..sdk.result import TaskState
from ..textsafe import clean_lines, clean_text
from .report_html import cell_text, format_bytes, format_duration, table_columns

FRAME_INTERVAL_S = 0.1
MAX_LINE_CHARS = 1000
MAX_NOTE_LINES = 20
MAX_SUMMARY_ROWS = 20
MAX_CELL_CHARS = 40
MAX_BLOCK_TASKS = 10
LIVE_TRACEBACK_LINES = 6  # the end of a traceback shown as it happens
MAX_TRACEBACK_LINES = 200  # per failed task in the summary; the log file has all
BAR_WIDTH = 20
# Info and warning lines from the runner repeat what the task events already show
# (the executor logs every task failure at "warning"); they are all in the log file.
# A notice is for the person at the terminal (e.g. "Ctrl-C: stopping").
DEFAULT_RUNNER_LEVELS = ("notice", "error", "critical")

_COLORS = {TaskState.COMPLETED: "32", TaskState.FAILED: "31", TaskState.RUNNING: "36",
           TaskState.RETRYING: "33", TaskState.PENDING: "2"}
_FINISHED = {TaskState.COMPLETED, TaskState.FAILED}


def _last_frames(lines: list[str]) -> list[str]:
    """The end of the last exception's traceback (a chained cause is in the summary)."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if len(starts) <= 1 and len(lines) <= LIVE_TRACEBACK_LINES + 1:
        return lines
    if starts:
        lines = lines[starts[-1] + 1:]
    return lines[-LIVE_TRACEBACK_LINES:]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class _LineBudget:
    """How many output lines may still be shown in the current one-second window."""

    def __init__(self, per_second: int, clock: Callable[[], float]) -> None:
        self.per_second = per_second
        self.clock = clock
        self.window_start = float("-inf")
        self.used = 0

    def available(self) -> int:
        now = self.clock()
        if now - self.window_start >= 1.0:
            self.window_start, self.used = now, 0
        return self.per_second - self.used



_Key = tuple[str, int | None]  # (run_id, task index or None for the flow body)


class _OutputGate:
    """How many of a source's lines may be shown now, and how many were held back."""

    def __init__(self, per_source: int, total: int, clock: Callable[[], float]) -> None:
        self._per_source = per_source
        self._clock = clock
        self._total = _LineBudget(total, clock)
        self._sources: dict[_Key, _LineBudget] = {}
        self.held: dict[_Key, list[Any]] = {}  # key -> [lines held back, source label]

    def can_show(self, key: _Key) -> bool:
        source = self._sources.get(key)
        return (source is None or source.available() > 0) and self._total.available() > 0

    def admit(self, key: _Key, count: int, label: str) -> int:
        source = self._sources.setdefault(key, _LineBudget(self._per_source, self._clock))
        granted = min(count, source.available(), self._total.available())
        source.used += granted
        self._total.used += granted
        if granted < count:
            self.held.setdefault(key, [0, label])[0] += count - granted
        return granted

    def reportable(self) -> list[_Key]:
        """Sources with lines held back that may speak again."""
        return [key for key in self.held if self.can_show(key)]

    def forget(self, key: _Key) -> None:
        self._sources.pop(key, None)


class TerminalView(NullListener):
    """A RunListener that shows runs on a terminal (live) or as plain lines."""

    def __init__(
        self,
        stream: TextIO | None = None,
        live: bool | None = None,
        *,
        max_lines_per_second: int = 50,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
        runner_levels: Iterable[str] = DEFAULT_RUNNER_LEVELS,
    ) -> None:
        self.stream = sys.stdout if stream is None else stream
        self.live = _is_tty(self.stream) if live is None else live
        self._clock = clock
        self._width = width
        self._runner_levels = {level.lower() for level in runner_levels}
        self._gate = _OutputGate(max_lines_per_second, 4 * max_lines_per_second, clock)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._runs: dict[str, RunRecord] = {}
        self._pending: list[str] = []  # lines waiting for the next frame (live mode)
        self._outbox: list[str] = []  # text waiting to be written, in order
        self._block_height = 0
        self._last_frame = float("-inf")
        self._broken = False

    # --- events -----------------------------------------------------------------

    def run_started(self, run: RunRecord) -> None:
        with self._lock:
            self._runs[run.run_id] = run
            self._add([f"==> {clean_text(run.flow_name)}: run {clean_text(run.run_id)} started"])
            self._compose(force=True)
        self._drain()

    def runner_log(self, run: RunRecord, line: str, level: str = "info") -> None:
        if level.lower() not in self._runner_levels:
            return
        with self._lock:
            self._add(self._with_note(f"{self._run_tag(run)}!!! {level.upper()}", line))
            self._compose(force=True)
        self._drain()

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        with self._lock:
            if not self.live:
                self._add([f"{self._run_tag(run)}--> {self._label(task)} started"])
            self._compose(force=True)
        self._drain()

    def task_progress(self, run: RunRecord, task: TaskRecord) -> None:
        with self._lock:
            self._report_held(self._gate.reportable())
            self._compose(force=False)
        self._drain()

    def task_output(
        self, run: RunRecord, task: TaskRecord | None, stream: str, lines: list[str]
    ) -> None:
        with self._lock:
            key = (run.run_id, None if task is None else task.index)
            source = self._source(run, task)
            if self._gate.can_show(key):
                self._report_held([key])  # the count comes before the lines that follow it
            shown = self._gate.admit(key, len(lines), source)
            mark = "|" if stream == "stdout" else "!"
            prefix = f"    {source} {mark} "
            self._add(prefix + _clip(clean_text(line), MAX_LINE_CHARS) for line in lines[:shown])
            self._compose(force=False)
        self._drain()

    def task_traceback(self, run: RunRecord, task: TaskRecord) -> None:
        # Its last frames now; the whole of it in the summary of failed tasks.
        lines = clean_lines(task.traceback.rstrip())
        tail = _last_frames(lines)
        prefix = f"    {self._source(run, task)} ! "
        with self._lock:
            if len(tail) < len(lines):
                self._add([f"{prefix}Traceback (last frames; {len(lines) - len(tail)} more "
                           "lines in the summary):"])
            self._add(prefix + _clip(line, MAX_LINE_CHARS) for line in tail)
            self._compose(force=False)
        self._drain()

    def task_retrying(self, run: RunRecord, task: TaskRecord) -> None:
        with self._lock:
            # The note already says "attempt N failed: ...".
            head = f"{self._run_tag(run)}~~> {self._label(task)} retrying"
            self._add(self._with_note(head, task.note))
            self._compose(force=True)
        self._drain()

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        with self._lock:
            self._report_held([(run.run_id, task.index)])
            self._gate.forget((run.run_id, task.index))
            # Live, the block shows completions; a failure's note is worth keeping above it.
            if not self.live or task.state != TaskState.COMPLETED:
                head = (f"{self._run_tag(run)}<-- {self._label(task)} {task.state} "
                        f"in {format_duration(task.duration_ms)}")
                self._add(self._with_note(head, task.note))
            self._compose(force=True)
        self._drain()

    def run_finished(self, run: RunRecord) -> None:
        with self._lock:
            self._report_held([key for key in self._gate.held if key[0] == run.run_id])
            self._gate.forget((run.run_id, None))
            self._runs.pop(run.run_id, None)
            self._add(summary_lines(run))
            self._compose(force=True)
        self._drain()

    def print_line(self, text: str) -> None:
        """Print a line of the caller's (e.g. the report paths) without breaking the view."""
        with self._lock:
            self._add(clean_lines(text))
            self._compose(force=True)
        self._drain()

    # --- labels -----------------------------------------------------------------

    def _run_tag(self, run: RunRecord) -> str:
        # Only needed to tell runs apart when several report at once.
        return f"[{clean_text(run.flow_name)}] " if len(self._runs) > 1 else ""

    @staticmethod
    def _label(task: TaskRecord) -> str:
        return f"#{task.index} {clean_text(task.name)}"

    def _source(self, run: RunRecord, task: TaskRecord | None) -> str:
        return self._run_tag(run) + ("flow" if task is None else self._label(task))

    @staticmethod
    def _with_note(head: str, note: str) -> list[str]:
        if not note:
            return [head]
        first, *rest = clean_lines(note)
        more = len(rest) - MAX_NOTE_LINES
        lines = [f"{head}: {first}", *(f"        {line}" for line in rest[:MAX_NOTE_LINES])]
        return lines + ([f"        ... {more} more lines (see log file)"] if more > 0 else [])

    # --- held-back output -------------------------------------------------------------

    def _report_held(self, keys: Iterable[_Key]) -> None:
        for key in keys:
            if key not in self._gate.held:
                continue
            count, source = self._gate.held.pop(key)
            run = self._runs.get(key[0])
            where = f"see log file {run.log_path}" if run and run.log_path else "see log file"
            lines = "line" if count == 1 else "lines"
            self._add([f"    {source} | ... {count:,} {lines} not shown ({where})"])

    # --- composing and writing ----------------------------------------------------

    def _add(self, lines: Iterable[str]) -> None:
        self._pending.extend(lines)

    def _compose(self, force: bool) -> None:
        """Move pending lines (and, live, a fresh status block) to the outbox."""
        if not self.live:
            if self._pending:
                self._outbox.append("".join(line + "\n" for line in self._pending))
                self._pending.clear()
            return
        now = self._clock()
        if not force and now - self._last_frame < FRAME_INTERVAL_S:
            return
        self._last_frame = now
        self._outbox.append(self._frame())

    def _frame(self) -> str:
        width, height = self._terminal_size()
        # Back to the top of the old block and clear it; output lines then scroll
        # above where the new block is drawn.
        erase = f"\r\x1b[{self._block_height}A\x1b[J" if self._block_height else ""
        block = block_lines(list(self._runs.values()), width, color=True)[: max(height - 2, 1)]
        self._block_height = len(block)
        text = erase + "".join(line + "\n" for line in self._pending + block)
        self._pending.clear()
        return text

    def _terminal_size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(self.stream.fileno())
            columns, lines = size.columns, size.lines
        except (AttributeError, ValueError, OSError):
            columns, lines = 0, 0
        # A pseudo-terminal nobody sized reports 0 x 0.
        columns, lines = columns or 100, lines or 24
        return max(self._width or columns, 20), max(lines, 5)

    def _drain(self) -> None:
        """Write the outbox in order; the thread that holds the write lock writes for all."""
        while self._write_lock.acquire(blocking=False):
            try:
                while True:
                    with self._lock:
                        text = "".join(self._outbox)
                        self._outbox.clear()
                    if not text:
                        break
                    self._write(text)
            finally:
                self._write_lock.release()
            with self._lock:
                if not self._outbox:
                    return

    def _write(self, text: str) -> None:
        if self._broken:
            return
        try:
            try:
                self.stream.write(text)
            except UnicodeEncodeError:
                encoding = getattr(self.stream, "encoding", None) or "ascii"
                self.stream.write(text.encode(encoding, "replace").decode(encoding))
            self.stream.flush()
        except (OSError, ValueError):
            # A closed pipe or terminal must not take the run down; the log file has it all.
            self._broken = True


# --- rendering (pure functions of the records) -------------------------------------


def block_lines(runs: list[RunRecord], width: int, color: bool = False) -> list[str]:
    """The live status block: per run a header and a window of its tasks."""
    lines: list[str] = []
    for run in runs:
        done = sum(task.state in _FINISHED for task in run.tasks)
        # A task called in a loop has one record per call: the calls made so far plus
        # the declared tasks not called yet, never fewer than are done.
        expected = len(run.tasks) + len(run.tasks_not_called())
        elapsed = _elapsed_ms(run.started_at, None)
        header = (f"{clean_text(run.flow_name)} ({clean_text(run.run_id)})  "
                  f"{done}/{expected} tasks  {format_duration(elapsed)}")
        lines.append(_clip(header, width - 1))
        lines.extend(_task_window(run.tasks, width, color))
    return lines


def _task_window(tasks: list[TaskRecord], width: int, color: bool) -> list[str]:
    pending = (i for i, t in enumerate(tasks) if t.state == TaskState.PENDING)
    first_pending = next(pending, len(tasks))
    end = min(len(tasks), first_pending + 2)
    start = max(0, end - MAX_BLOCK_TASKS)
    lines = [f"  ... {start} earlier tasks"] if start else []
    lines += [_task_line(task, width, color) for task in tasks[start:end]]
    if end < len(tasks):
        lines.append(f"  ... {len(tasks) - end} more tasks")
    return lines


def _task_line(task: TaskRecord, width: int, color: bool) -> str:
    progress = 100 if task.state == TaskState.COMPLETED else max(0, min(int(task.progress), 99))
    filled = progress * BAR_WIDTH // 100
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    duration = task.duration_ms
    if duration is None and task.state not in _FINISHED | {TaskState.PENDING}:
        duration = _elapsed_ms(task.started_at, None)
    head = f"  #{task.index:<3} {_clip(clean_text(task.name), 28):<28} "
    tail = f" [{bar}] {progress:>3}%  {format_duration(duration) if duration else ''}"
    line = _clip(head + f"{task.state:<9}" + tail, width - 1)
    code = _COLORS.get(task.state)
    start, end = len(head), len(head) + 9
    if not color or not code or len(line) < end:
        return line
    # Colour only the state column, at its known position, after clipping to the width.
    return f"{line[:start]}\x1b[{code}m{line[start:end]}\x1b[0m{line[end:]}"


def _elapsed_ms(started: float | None, ended: float | None) -> float | None:
    if started is None:
        return None
    return ((time.time() if ended is None else ended) - started) * 1000


def summary_lines(run: RunRecord) -> list[str]:
    """The end-of-run summary: task table, result tables, log file."""
    duration = format_duration(_elapsed_ms(run.started_at, run.ended_at))
    lines = [f"==> {clean_text(run.flow_name)}: run {clean_text(run.run_id)} "
             f"{run.state} in {duration}", counts_line(run)]
    if run.note:
        lines += [f"    {line}" for line in clean_lines(run.note)[:MAX_NOTE_LINES]]
    rows = [
        {"#": task.index, "task": task.name, "state": _shown_state(task),
         "duration": format_duration(task.duration_ms),
         "peak mem": format_bytes(task.peak_rss) if task.peak_rss else "-",
         "note": clean_lines(task.note)[0]}
        for task in run.tasks
    ]
    rows += [{"#": "-", "task": name, "state": "NOT RUN", "duration": "-", "peak mem": "-",
              "note": ""} for name in run.not_run]
    lines += format_table(rows, max_cell=60) if rows else ["    (no tasks ran)"]
    with_tables = [task for task in run.tasks if task.table]
    if with_tables:
        lines.append("Results:")
    for task in with_tables:
        lines.append(f"    #{task.index} {clean_text(task.name)}")
        lines += ["  " + line for line in format_table(task.table)]
    lines += traceback_lines(run)
    if run.log_path:
        lines.append(f"Log file: {clean_text(run.log_path)}")
    return lines


def _shown_state(task: TaskRecord) -> str:
    return shown_state(task.state, task.note)


def traceback_lines(run: RunRecord) -> list[str]:
    """The failed tasks' tracebacks, after the table (as pytest's short summary)."""
    failed = [task for task in run.tasks if task.state == TaskState.FAILED and task.traceback]
    lines = ["Tracebacks of failed tasks:"] if failed else []
    for task in failed:
        lines.append(f"  ____ #{task.index} {clean_text(task.name)} ____")
        body = clean_lines(task.traceback.strip("\n"))
        lines += ["    " + _clip(line, MAX_LINE_CHARS) for line in body[:MAX_TRACEBACK_LINES]]
        if len(body) > MAX_TRACEBACK_LINES:
            lines.append(f"    ... {len(body) - MAX_TRACEBACK_LINES} more lines (see log file)")
    return lines


def counts_line(run: RunRecord) -> str:
    """'5 task calls: 3 passed, 1 failed, 1 not run (publish)'."""
    not_run = run.not_run
    counts = tally((_shown_state(task) for task in run.tasks), len(not_run))
    calls = "task call" if len(run.tasks) == 1 else "task calls"
    parts = [f"{number} {label}" for label, number in counts.items()]
    if not_run:  # named right after their count
        names = ", ".join(clean_text(name) for name in not_run[:10])
        parts[2] += f" ({names}{', ...' if len(not_run) > 10 else ''})"
    return f"    {len(run.tasks)} {calls}: {', '.join(parts)}"


def format_table(rows: list[Any], max_cell: int = MAX_CELL_CHARS) -> list[str]:
    """Rows of dicts as aligned text columns (at most MAX_SUMMARY_ROWS rows)."""
    rows = [{str(k): v for k, v in row.items()} if isinstance(row, dict) else {"value": row}
            for row in rows]
    columns = table_columns(rows)
    shown = rows[:MAX_SUMMARY_ROWS]
    cells = [[_clip(clean_text(column), max_cell) for column in columns]]
    cells += [[_clip(clean_text(cell_text(row.get(c, ""))), max_cell) for c in columns]
              for row in shown]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["    " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    if len(rows) > len(shown):
        lines.append(f"    ... {len(rows) - len(shown):,} more rows (see the report)")
    return lines
