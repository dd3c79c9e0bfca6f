"""A log file with a size limit that keeps its first part and its last part.

A task printing 200 MB/s must not fill the disk, yet the end of a run (the
last lines of the task that went wrong, every task's outcome, the run's final
state) is what a user reads first. So, within `limit` bytes:

- the head: the first lines, written as they come (``tail -f`` follows them);
- when the head is full, one line says so, and from then on only the last
  `tail` bytes are kept, in memory, at most a few MiB;
- on close, the kept tail is written, then one last line saying how much was
  cut (bytes and lines), so the file ends with the run's last lines and that
  count.

Lines are kept or cut whole, except a single line longer than the whole tail,
of which only its end is kept. The file never exceeds `limit` bytes: the two
notice lines come out of a small reserve.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..sdk.units import format_size

BUFFER_BYTES = 1 << 20
MAX_TAIL = 4 * 1024 * 1024
NOTICE_RESERVE = 1024  # bytes kept back for the two notice lines


class BoundedLogFile:
    """Append-only bytes with a size limit; `notice(text)` formats a notice line."""

    def __init__(self, path: Path, limit: int, notice: Callable[[str], bytes]) -> None:
        self.file: BinaryIO = open(path, "ab", buffering=BUFFER_BYTES)
        self.limit = limit
        self.notice = notice
        self.tail_budget = min(limit // 2, MAX_TAIL)
        self.head_budget = max(limit - self.tail_budget - NOTICE_RESERVE, 0)
        self.written = self.file.tell()
        self.tail: deque[bytes] | None = None  # None until the head is full
        self.tail_bytes = 0
        self.cut_bytes = 0
        self.cut_lines = 0

    def write(self, data: bytes) -> None:
        if self.tail is None:
            data = self._write_head(data)
            if not data:
                return
        self._keep_in_tail(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        """Write the kept tail and the count of what was cut, then close."""
        try:
            if self.tail is not None:
                self.file.write(b"".join(self.tail))
                self.file.write(self._clip_notice(
                    f"log file cut: {self.cut_bytes} bytes ({self.cut_lines} lines) left "
                    f"out between the first {format_size(self.written)} and the last "
                    f"{format_size(self.tail_bytes)} (--max-log-file-size "
                    f"{format_size(self.limit)})"))
        finally:
            self.file.close()

    # --- the head -------------------------------------------------------

    def _write_head(self, data: bytes) -> bytes:
        """Write what fits in the head (whole lines); return the rest."""
        room = self.head_budget - self.written
        if len(data) <= room:
            self.file.write(data)
            self.written += len(data)
            return b""
        end = data.rfind(b"\n", 0, max(room, 0)) + 1  # 0: not even one line fits
        self.file.write(data[:end])
        self.written += end
        self.file.write(self._clip_notice(
            f"log file limit reached (--max-log-file-size {format_size(self.limit)}): "
            f"from here on only the last {format_size(self.tail_budget)} are kept, "
            "written when the run ends"))
        self.file.flush()
        self.tail = deque()
        return data[end:]

    # --- the tail -------------------------------------------------------

    def _keep_in_tail(self, data: bytes) -> None:
        assert self.tail is not None
        self.tail.append(data)
        self.tail_bytes += len(data)
        while self.tail_bytes > self.tail_budget:
            self._drop_oldest(self.tail_bytes - self.tail_budget)

    def _drop_oldest(self, excess: int) -> None:
        assert self.tail is not None
        oldest = self.tail[0]
        newline = oldest.find(b"\n", excess) if len(oldest) > excess else -1
        if newline == -1 or newline == len(oldest) - 1:
            # Nothing in this chunk after the cut starts a line: drop it whole, unless
            # it is all there is (one line longer than the tail: keep that line's end).
            dropped = len(oldest) if len(self.tail) > 1 or len(oldest) <= excess else excess
        else:
            dropped = newline + 1
        if dropped == len(oldest):
            self.tail.popleft()
        else:
            self.tail[0] = oldest[dropped:]
        self.cut_bytes += dropped
        self.cut_lines += oldest.count(b"\n", 0, dropped)
        self.tail_bytes -= dropped

    def _clip_notice(self, text: str) -> bytes:
        line = self.notice(text)
        return line if len(line) <= NOTICE_RESERVE // 2 else line[: NOTICE_RESERVE // 2 - 1] + b"\n"
