"""Split a child's output bytes into lines, with bounded memory.

A parser fed bytes as they arrive; no process needed to test it. Lines are
decoded as UTF-8 with replacement characters (a task may write any bytes). A
line longer than `max_line` bytes is cut into pieces, each but the last marked,
so a task writing hundreds of MB without a newline cannot grow our memory.
"""

from __future__ import annotations

DEFAULT_MAX_LINE = 64 * 1024
CONTINUED = " [line continues]"


class LineSplitter:
    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._partial = b""
        self.split_lines = 0  # how many pieces were cut from over-long lines

    def feed(self, data: bytes) -> list[str]:
        """The complete lines in `data` (with what was pending before it)."""
        buffer = self._partial + data if self._partial else data
        last_newline = buffer.rfind(b"\n")
        if last_newline < 0:
            self._partial = buffer
            return self._cut_partial()
        complete, self._partial = buffer[:last_newline], buffer[last_newline + 1 :]
        lines = complete.decode("utf-8", "replace").split("\n")
        if len(complete) > self.max_line:
            lines = self._cut_long(lines)
        return lines + self._cut_partial()

    def finish(self) -> list[str]:
        """The last partial line, when the stream ended without a newline."""
        rest, self._partial = self._partial, b""
        return [rest.decode("utf-8", "replace")] if rest else []

    def _cut_partial(self) -> list[str]:
        if len(self._partial) <= self.max_line:
            return []
        pieces = []
        while len(self._partial) > self.max_line:
            piece, self._partial = self._partial[: self.max_line], self._partial[self.max_line :]
            pieces.append(piece.decode("utf-8", "replace") + CONTINUED)
        self.split_lines += len(pieces)
        return pieces

    def _cut_long(self, lines: list[str]) -> list[str]:
        result: list[str] = []
        for line in lines:
            while len(line) > self.max_line:
                result.append(line[: self.max_line] + CONTINUED)
                line = line[self.max_line :]
                self.split_lines += 1
            result.append(line)
        return result
