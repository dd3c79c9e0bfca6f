"""One run's pending log lines, and how they become log entries.

Lines keep their order and their sequence number (shared with the run's state
updates, so the sender knows which lines were printed before a state). When the
backlog is too long the oldest pending lines make room: a marker at the head
counts them, and becomes its own entry, so the UI says so where they were. The
newest lines are kept because the end of a task's output is where its errors
and traceback are. Lines marked `keep` (stderr, the runner's own lines: where a
person looks for why a task failed) are passed over while plain output near the
head can go instead, so a traceback printed in the middle of a flood reaches the
UI. The caller (the run's sender) holds the lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

HEADROOM = 32  # bytes of an entry kept for the "[N lines]" header
# How far past the head a drop looks for plain output to drop instead of a kept
# line: bounds the cost of a drop, and a traceback is rarely longer.
KEEP_SCAN = 256


@dataclass(slots=True)
class _Line:
    """One pending output line, or (text None) a count of lines dropped at that place."""

    seq: int
    text: str | None
    size: int = 0
    dropped: int = 0
    keep: bool = False


@dataclass(frozen=True)
class Entry:
    """The text of one log entry and how many output lines it stands for."""

    text: str
    lines: int
    joined: bool = False


class LogBacklog:
    """Pending lines in order; entries of at most `entry_max_bytes`."""

    def __init__(self, entry_max_bytes: int) -> None:
        self.entry_max_bytes = entry_max_bytes
        self._lines: deque[_Line] = deque()
        self.bytes = 0
        self.count = 0  # output lines pending, dropped ones included

    def __bool__(self) -> bool:
        return bool(self._lines)

    def add(self, seq: int, line: str, cap: int, keep: bool = False) -> int:
        """Append a line, dropping the oldest ones while over `cap` bytes; how many."""
        size = (len(line) if line.isascii() else len(line.encode("utf-8", "replace"))) + 1
        dropped = 0
        while self.bytes + size > cap and self._drop_oldest():
            dropped += 1
        self._lines.append(_Line(seq, line, size, keep=keep))
        self.bytes += size
        self.count += 1
        return dropped

    def _drop_oldest(self) -> bool:
        """Turn the oldest droppable line into (or count it in) a marker at its place."""
        index = self._victim()
        if index is None:
            return False
        victim = self._lines[index]
        self.bytes -= victim.size
        before = self._lines[index - 1] if index else None
        if before is not None and before.text is None:
            before.dropped += 1
            del self._lines[index]
        else:
            self._lines[index] = _Line(victim.seq, None, dropped=1)
        return True

    def _victim(self) -> int | None:
        """The oldest plain line near the head, else the oldest line of any kind."""
        first = None
        for index, line in enumerate(self._lines):
            if index >= KEEP_SCAN and first is not None:
                break
            if line.text is None:
                continue
            if not line.keep:
                return index
            if first is None:
                first = index
        return first

    def clear(self) -> None:
        self._lines.clear()
        self.bytes = 0
        self.count = 0

    def line_count(self) -> int:
        """Output lines pending (dropped ones included)."""
        return self.count

    def head_is_marker(self) -> bool:
        return bool(self._lines) and self._lines[0].text is None

    def before(self, seq: int) -> int:
        """How many pending items were queued before sequence number `seq`."""
        count = 0
        for line in self._lines:
            if line.seq > seq:
                break
            count += 1
        return count

    def fits_one_entry(self, count: int | None = None) -> bool:
        """The first `count` items (all by default) are lines that fit in one entry."""
        limit = self.entry_max_bytes - HEADROOM
        size = 0
        for n, line in enumerate(self._lines):
            if count is not None and n >= count:
                return True
            if line.text is None:
                return False
            size += line.size
            if size > limit:
                return False
        return True

    def take(self, per_entry: int, where: str) -> Entry:
        """Pop up to `per_entry` lines (within the entry size) as one entry.

        A drop marker at the head becomes a note, followed by the lines after it when
        more than one line may go (one entry instead of two under a flood).
        """
        head = self._lines[0]
        if head.text is None:
            self._lines.popleft()
            self.count -= head.dropped
            note = (f"{head.dropped} log lines not delivered to the backend (too slow to "
                    f"keep up); full log at {where}")
            taken = self._pop_lines(per_entry - 1 if per_entry > 1 else 0, len(note))
            if not taken:
                return Entry(note, head.dropped)
            return Entry(f"{note}; the next {len(taken)} lines:\n" + "\n".join(taken),
                         head.dropped + len(taken), joined=True)
        taken = self._pop_lines(per_entry, 0)
        if len(taken) == 1:
            return Entry(taken[0], 1)
        return Entry(f"[{len(taken)} lines]\n" + "\n".join(taken), len(taken), joined=True)

    def _pop_lines(self, most: int, used: int) -> list[str]:
        """Up to `most` lines from the head that fit in an entry with `used` bytes taken."""
        taken: list[str] = []
        size, limit = used, self.entry_max_bytes - HEADROOM
        while self._lines and len(taken) < most:
            line = self._lines[0]
            if line.text is None or ((taken or used) and size + line.size > limit):
                break
            self._lines.popleft()
            self.bytes -= line.size
            self.count -= 1
            taken.append(line.text)
            size += line.size
        return taken

    def collapse(self, where: str) -> Entry:
        """Everything pending as one entry: the lines if they fit, else a note saying
        how many were not sent and where they are, followed by the last lines that fit
        (the end of a run's output is where its errors are)."""
        if self.fits_one_entry():
            return self.take(len(self._lines), where)
        count = self.line_count()
        chosen = self._collapse_choice()
        texts = [line.text for line in self._lines if id(line) in chosen and line.text]
        kept = sum(1 for line in self._lines if id(line) in chosen and line.keep)
        self.clear()
        note = (f"{count - len(texts)} log lines were not sent to the backend (it was too "
                f"slow to keep up when the run ended); full log at {where}")
        if not texts:
            return Entry(note, count)
        what = f"the last {len(texts)} lines"
        if kept:
            what += f" ({kept} of them stderr or the runner's own, kept from earlier)"
        return Entry(f"{note}; {what}:\n" + "\n".join(texts), count)

    def _collapse_choice(self) -> set[int]:
        """Ids of the lines a collapsed entry shows: the last lines that fit in half an
        entry, and before them the latest kept lines that fit in a quarter."""
        chosen: set[int] = set()
        size, limit = 0, self.entry_max_bytes // 2
        tail_start = len(self._lines)
        for line in reversed(self._lines):
            if line.text is None or size + line.size > limit:
                break
            chosen.add(id(line))
            size += line.size
            tail_start -= 1
        size, limit = 0, self.entry_max_bytes // 4
        for index in range(tail_start - 1, -1, -1):
            line = self._lines[index]
            if line.text is None or not line.keep:
                continue
            if size + line.size > limit:
                break
            chosen.add(id(line))
            size += line.size
        return chosen


def clip_line(line: str, max_bytes: int) -> str:
    """Cut a single line that would not fit in one entry (the local log keeps it whole)."""
    if len(line) * 4 <= max_bytes:
        return line
    raw = line.encode("utf-8", "replace")
    if len(raw) <= max_bytes - 1:
        return line
    kept = raw[: max_bytes - 80].decode("utf-8", "ignore")
    return f"{kept} ... [line of {len(raw)} bytes cut]"
