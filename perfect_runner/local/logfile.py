"""The log of a run, one file per run, bounded in size.

Every line the runner logs and every line a task or the flow body prints ends
up in ``<log_dir>/<run_id>.log``, in arrival order, as::

    2026-11-26T13:07:08.123+00:00 runner INFO  flow started
    2026-11-26T13:07:08.456+00:00 #3 extract_sales_data OUT Extracting sales data...
    2026-11-26T13:07:08.457+00:00 #3 extract_sales_data ERR warning: slow query
    2026-11-26T13:07:08.500+00:00 flow OUT a line the flow body printed

A task that floods output must not slow its run down, so a batch of lines
gets one timestamp and one prefix, is joined into one string and goes into a
large write buffer: no per-line syscall. The buffer is flushed when a task
finishes, when the run finishes, and at most a second after the last flush,
so ``tail -f`` keeps up.

Each file is bounded (``--max-log-file-size``, default 100 MiB): past it, the
first part and the last part are kept and the file ends with a line saying how
much was cut (see `bounded_file`).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

from ..executor.events import NullListener
from ..executor.records import RunRecord, TaskRecord
from ..sdk.result import TaskState
from ..textsafe import safe_file_stem
from .bounded_file import BoundedLogFile
from .report_html import format_bytes

DEFAULT_MAX_BYTES = 100 * 1024 * 1024  # --max-log-file-size
_FLUSH_INTERVAL_S = 1.0
_STREAM_MARK = {"stdout": "OUT", "stderr": "ERR"}


def _timestamp() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def _source(task: TaskRecord | None) -> str:
    return "flow" if task is None else f"#{task.index} {task.name}"


def _seconds(duration_ms: int | None) -> str:
    return "?" if duration_ms is None else f"{duration_ms / 1000:.3f} s"


class _OpenLog:
    """One run's log file, bounded, and when it was last flushed."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.file = BoundedLogFile(path, max_bytes, _notice_line)  # closed in run_finished
        self.last_flush = time.monotonic()

    def write(self, text: str) -> None:
        self.file.write(_encode(text))
        now = time.monotonic()
        if now - self.last_flush >= _FLUSH_INTERVAL_S:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        self.file.flush()
        self.last_flush = time.monotonic() if now is None else now


def _encode(text: str) -> bytes:
    # backslashreplace: a line with undecodable bytes is still written, never dropped
    return text.encode("utf-8", "backslashreplace")


def _notice_line(message: str) -> bytes:
    return _encode(f"{_timestamp()} runner WARN  {message}\n")


class LogFileListener(NullListener):
    """Writes each run's complete, timestamped log to ``<log_dir>/<run_id>.log``."""

    def __init__(self, log_dir: str | Path, max_bytes: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.max_bytes = max_bytes or DEFAULT_MAX_BYTES
        self._logs: dict[str, _OpenLog] = {}
        # Guards only the dict: each run's events come from that run's own thread.
        self._lock = threading.Lock()

    def path_for(self, run_id: str) -> Path:
        return self.log_dir / f"{safe_file_stem(run_id)}.log"

    # --- events ---------------------------------------------------------------

    def run_started(self, run: RunRecord) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.path_for(run.run_id)
        log = _OpenLog(path, self.max_bytes)
        with self._lock:
            self._logs[run.run_id] = log
        run.log_path = str(path)
        tags = "".join(f" {key}={value}" for key, value in run.tags.items())
        self._event(run, f"run {run.run_id} of flow {run.flow_name!r} started{tags}")

    def runner_log(self, run: RunRecord, line: str, level: str = "info") -> None:
        self._event(run, line, level=level.upper())

    def task_started(self, run: RunRecord, task: TaskRecord) -> None:
        about = f": {task.description}" if task.description else ""
        self._event(run, f"{_source(task)} started{about}")

    def task_output(
        self, run: RunRecord, task: TaskRecord | None, stream: str, lines: list[str]
    ) -> None:
        if not lines:
            return
        prefix = f"{_timestamp()} {_source(task)} {_STREAM_MARK.get(stream, stream)} "
        self._write(run, prefix + ("\n" + prefix).join(lines) + "\n")

    def task_retrying(self, run: RunRecord, task: TaskRecord) -> None:
        # The note already says "attempt N failed: ...".
        self._event(run, f"{_source(task)} retrying: {task.note}", level="WARN")

    def task_finished(self, run: RunRecord, task: TaskRecord) -> None:
        level = "INFO" if task.state == TaskState.COMPLETED else "ERROR"
        peak = f" (peak memory {format_bytes(task.peak_rss)})" if task.peak_rss else ""
        note = f": {task.note}" if task.note else ""
        took = _seconds(task.duration_ms)
        self._event(run, f"{_source(task)} {task.state} in {took}{peak}{note}", level=level)
        self._flush(run)

    def run_finished(self, run: RunRecord) -> None:
        level = "INFO" if run.state == TaskState.COMPLETED else "ERROR"
        self._event(run, f"run {run.run_id} {run.state}{': ' + run.note if run.note else ''}",
                    level=level)
        with self._lock:
            log = self._logs.pop(run.run_id, None)
        if log is not None:
            log.file.close()

    # --- writing --------------------------------------------------------------

    def _event(self, run: RunRecord, message: str, level: str = "INFO") -> None:
        # Notes may hold tracebacks: indent their continuation lines under the entry.
        message = message.replace("\n", "\n    ")
        self._write(run, f"{_timestamp()} runner {level:<5} {message}\n")

    def _write(self, run: RunRecord, text: str) -> None:
        with self._lock:
            log = self._logs.get(run.run_id)
        if log is not None:
            log.write(text)
            return
        # An event outside run_started..run_finished breaks the contract, but its
        # line still belongs in the log: append it on its own.
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path_for(run.run_id), "a", encoding="utf-8",
                  errors="backslashreplace") as file:
            file.write(text)

    def _flush(self, run: RunRecord) -> None:
        with self._lock:
            log = self._logs.get(run.run_id)
        if log is not None:
            log.flush()
