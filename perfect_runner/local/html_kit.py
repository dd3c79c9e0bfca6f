"""What the HTML pages of local mode share: escaping, state colours, the page shell,
and writing a file so that a reader never sees half of it.

Every string that reaches a page came from a task or a JSON file and is
untrusted: `text()` strips terminal escapes and control characters (which are
also invalid in SVG) and escapes it for HTML text and attribute values.
"""

from __future__ import annotations

import math
import os
import tempfile
from html import escape
from pathlib import Path
from typing import Any

from ..sdk.result import TaskState
from ..textsafe import clean_lines, clean_text

STATE_COLORS = {
    TaskState.COMPLETED: "#1a7f37",
    TaskState.FAILED: "#cf222e",
    TaskState.RUNNING: "#0969da",
    TaskState.RETRYING: "#bf8700",
    TaskState.PENDING: "#6e7781",
    "INTERRUPTED": "#8250df",
    "NOT RUN": "#8c959f",
    "NOT_RUN": "#8c959f",
}
RETRIED_COLOR = "#d4a72c"  # an attempt that failed and was retried
DEFAULT_COLOR = "#57606a"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 0 auto; padding: 1.5rem 2rem 3rem; max-width: 78rem; color: #1f2328;
       background: #fff; line-height: 1.4; }
h1 { margin: 0 0 .2rem; font-size: 1.7rem; overflow-wrap: anywhere; }
h2 { margin: 2rem 0 .6rem; font-size: 1.25rem; border-bottom: 1px solid #d8dee4;
     padding-bottom: .3rem; }
h3 { margin: 0 0 .4rem; font-size: 1.05rem; overflow-wrap: anywhere; }
a { color: #0969da; text-decoration: none; }
a:hover { text-decoration: underline; }
.muted { color: #656d76; }
.tag { display: inline-block; background: #ddf4ff; color: #0550ae; border-radius: 1rem;
       padding: .1rem .6rem; margin: .1rem; font-size: .85rem; }
.badge { display: inline-block; color: #fff; border-radius: .35rem; padding: .05rem .5rem;
         font-size: .8rem; font-weight: 600; letter-spacing: .02em; white-space: nowrap; }
table { border-collapse: collapse; margin: .4rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left;
         vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.note { white-space: pre-wrap; overflow-wrap: anywhere; }
.result td, .result th { font-size: .85rem; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .82rem; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: .4rem;
      padding: .6rem .8rem; overflow-x: auto; white-space: pre-wrap;
      overflow-wrap: anywhere; margin: .3rem 0 .6rem; }
pre .err { color: #a40e26; }
details > summary { cursor: pointer; font-weight: 600; margin: .3rem 0; }
.counts { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.count { border: 1px solid #d0d7de; border-radius: .5rem; padding: .5rem 1rem;
         min-width: 7rem; border-top: 4px solid var(--c); }
.count strong { display: block; font-size: 1.6rem; color: var(--c); }
.reason { border-left: 4px solid #cf222e; background: #ffebe9; padding: .6rem .9rem;
          border-radius: .3rem; margin: .8rem 0; white-space: pre-wrap;
          overflow-wrap: anywhere; }
.failed-list { border: 1px solid #ff818266; background: #fff8f8; border-radius: .5rem;
               padding: .5rem 1rem; margin: .8rem 0; }
.failed-list ul { margin: .3rem 0; padding-left: 1.2rem; }
tr.failed td:first-child { box-shadow: inset 4px 0 #cf222e; }
tr.notrun td { color: #8c959f; }
section.task { border: 1px solid #d0d7de; border-radius: .5rem; padding: .8rem 1rem;
               margin: 1rem 0; border-left: 5px solid var(--c); }
section.task:target { outline: 2px solid #0969da; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem;
           margin: .3rem 0 .6rem; font-size: .9rem; }
dl.facts dt { color: #656d76; }
dl.facts dd { margin: 0; }
.picture { overflow-x: auto; }
.nowrap { white-space: nowrap; }
td.bad { color: #cf222e; font-weight: 600; }
.picture svg { max-width: 100%; height: auto; }
"""


def text(value: Any) -> str:
    """One line of untrusted text, safe as HTML/SVG text or attribute value."""
    return escape(clean_text(value), quote=True)


def block(value: Any) -> str:
    """Multi-line untrusted text (a note, a traceback), lines kept."""
    return "\n".join(escape(line, quote=True) for line in clean_lines(value))


def color(state: Any) -> str:
    return STATE_COLORS.get(str(state).upper(), DEFAULT_COLOR)


def badge(state: Any) -> str:
    return f'<span class="badge" style="background:{color(state)}">{text(state)}</span>'


def page(title: str, body: str) -> str:
    """A whole self-contained page: inline CSS, no script, nothing fetched."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{text(title)}</title><style>{CSS}</style></head><body>\n"
        f"{body}\n</body></html>\n"
    )


def write_atomic(path: Path, content: str) -> None:
    """Write `content` to `path` via a temporary file and a rename, so a browser
    (or another runner rebuilding the index) never reads a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # errors="replace": a lone surrogate in a task's name must not lose the report
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as handle:
            handle.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_number(value: Any) -> bool:
    """A finite int or float (a bool is not a number here)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))
