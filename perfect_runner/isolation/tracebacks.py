"""Tracebacks a person reads: the task's own frames, the runner's frames trimmed.

A task's exception is formatted in its own process (`format_exception`) from
the traceback objects, so chained causes (`raise ... from ...`) and implicit
context stay, as Python prints them. A stack dump (faulthandler: a timeout's
dump, a SIGSEGV or SIGABRT crash) is text on the task's stderr, so the control
process trims it line by line as it passes (`StackDumpFilter`).

Trimmed: frames in the runner's own package (fork server, child bootstrap,
task loop, the SDK's call wrappers) and `<frozen runpy>`, and faulthandler's
"Extension modules: ..." line. They tell the story of the runner, not of the
task; `--full-tracebacks` keeps them, for reporting a runner bug. Where every
frame is the runner's, they are kept: an empty stack would tell nothing.
"""

from __future__ import annotations

import os
import re
import traceback
from collections import deque
from collections.abc import Iterable

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER_DIRS = tuple({_PACKAGE + os.sep, os.path.realpath(_PACKAGE) + os.sep})
MAX_TRACEBACK_CHARS = 20000
MAX_DUMP_LINES = 1000


def is_runner_file(filename: str) -> bool:
    return filename.startswith((*RUNNER_DIRS, "<frozen runpy"))


def format_exception(exc: BaseException, full: bool = False) -> str:
    """`exc` as Python prints it, chained causes kept, runner frames trimmed unless `full`."""
    try:
        formatted = traceback.TracebackException.from_exception(exc)
        if not full:
            _trim(formatted, set())
        text = "".join(formatted.format())
    except Exception as failure:  # noqa: BLE001 - a hostile exception must not lose the task's
        text = f"(traceback unavailable: {type(failure).__name__} while formatting it)\n"
    # The end of a long traceback (the innermost frames, the exception) matters most.
    return text if len(text) <= MAX_TRACEBACK_CHARS else text[-MAX_TRACEBACK_CHARS:]


def _trim(formatted: traceback.TracebackException, seen: set[int]) -> None:
    if id(formatted) in seen:  # a cycle in __context__
        return
    seen.add(id(formatted))
    kept = [frame for frame in formatted.stack if not is_runner_file(frame.filename)]
    if kept:
        formatted.stack = traceback.StackSummary.from_list(kept)
    nested = [formatted.__cause__, formatted.__context__, *(formatted.exceptions or [])]
    for inner in nested:
        if inner is not None:
            _trim(inner, seen)


# --- faulthandler dumps ---------------------------------------------------------

_DUMP_HEADER = re.compile(
    r"^(Fatal Python error: |Current thread 0x|Thread 0x|Stack \(most recent call first\)"
    r"|Python runtime state: )")
_DUMP_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?:\d+|\?\?\?) in \S.*$')
_DUMP_OTHER = re.compile(r"^(\s*<no Python frame>|\s*\.\.\.|\s*)$")
_EXTENSIONS = "Extension modules: "


def is_dump_line(line: str) -> bool:
    """A line only a faulthandler dump writes (a header, a frame, the modules list)."""
    return bool(_DUMP_HEADER.match(line) or _DUMP_FRAME.match(line)
                or line.startswith(_EXTENSIONS))


class StackDumpFilter:
    """Fed a process's stderr lines in order: passes them on with the runner's dump
    frames trimmed (unless `full`), and keeps what it passed of each dump."""

    def __init__(self, full: bool = False) -> None:
        self.full = full
        # The dumps' lines as shown; the last ones only, so a task printing dump-like
        # lines forever cannot grow the control process.
        self.dump: deque[str] = deque(maxlen=MAX_DUMP_LINES)
        self._in_dump = False

    def feed(self, lines: Iterable[str]) -> list[str]:
        shown = []
        for line in lines:
            if _DUMP_HEADER.match(line):
                self._in_dump = True
            elif self._in_dump and not (_DUMP_FRAME.match(line) or _DUMP_OTHER.match(line)
                                        or line.startswith(_EXTENSIONS)):
                self._in_dump = False
            if self._in_dump and not self.full and self._trimmed(line):
                continue
            shown.append(line)
            if self._in_dump:
                self.dump.append(line)
        return shown

    @staticmethod
    def _trimmed(line: str) -> bool:
        if line.startswith(_EXTENSIONS):
            return True
        frame = _DUMP_FRAME.match(line)
        return bool(frame and is_runner_file(frame.group("file")))

    def text(self) -> str:
        """The dumps seen so far, blank lines at either end removed."""
        text = "\n".join(self.dump).strip("\n")
        return text if len(text) <= MAX_TRACEBACK_CHARS else text[-MAX_TRACEBACK_CHARS:]
