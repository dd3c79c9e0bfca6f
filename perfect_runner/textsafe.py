"""Untrusted text made safe to show on a terminal, in our own log, or in a file name.

Flow and task names, notes, table cells and output lines come from user code.
Before any of it reaches a terminal or the worker's log it goes through
`clean_text`/`clean_lines`, so it cannot move the cursor, retitle the window,
reset the terminal or forge a log line. Before it becomes part of a file name
it goes through `safe_file_stem`, which keeps the name short enough for any
file system (255 bytes per path component).
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC strings, and
# two-character escapes such as ESC c (full reset).
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[ -/]*[0-~]?"
)
# C0 and C1 controls and DEL, plus the bidi overrides that reorder what is shown.
CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_IN_FILE_NAME = re.compile(r"[^A-Za-z0-9._-]")
# Leaves room for the other parts of a report's name (run id, suffix) under 255 bytes.
MAX_FILE_STEM = 80


def clean_text(text: Any) -> str:
    """`text` as one line that cannot drive the terminal: escapes and controls removed."""
    text = str(text)
    if text.isprintable():
        return text
    if "\r" in text:
        # A carriage return redraws the line on a terminal: keep what would remain visible.
        text = next((part for part in reversed(text.split("\r")) if part), "")
    return CONTROLS.sub("", _ESCAPES.sub("", text).expandtabs(4))


def clean_lines(text: Any) -> list[str]:
    """Multi-line `text` (a note, a traceback) as clean lines."""
    return [clean_text(line) for line in str(text).splitlines()] or [""]


def clean_block(text: Any, indent: str = "    ") -> str:
    """Multi-line `text` as one log entry: clean lines, continuation lines indented.

    The indent means no line of a note can pass for a log entry of its own.
    """
    return ("\n" + indent).join(clean_lines(text))


def safe_file_stem(name: str, limit: int = MAX_FILE_STEM) -> str:
    """`name` as a short file-name-safe stem: unusual characters become '_'.

    A stem longer than `limit` is cut, and ends with a hash of the whole name so
    that two long names sharing their start still get different files.
    """
    stem = _UNSAFE_IN_FILE_NAME.sub("_", name).strip(".") or "_"
    if len(stem) <= limit:
        return stem
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{stem[: limit - 12]}--{digest}"


class CleanFormatter(logging.Formatter):
    """The worker's own log: every entry cleaned, its continuation lines indented.

    Log calls pass flow names, notes and backend answers as arguments; cleaning
    the formatted entry covers them all in one place.
    """

    def format(self, record: logging.LogRecord) -> str:
        return clean_block(super().format(record))
