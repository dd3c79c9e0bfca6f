"""The local run's reports: a self-contained HTML page and the JSON record.

`render_html` works from ``RunRecord.to_dict()`` alone, so a report can be
re-rendered later from a saved JSON record. Everything a task provides (names,
notes, table keys and cells) is untrusted and HTML-escaped; the page carries
its CSS inline and needs no JavaScript.

The formatting helpers at the bottom (durations, byte sizes, table cells) are
shared with the terminal view so both show a run the same way.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from ..executor.records import RunRecord
from ..jsonsafe import json_safe
from ..textsafe import safe_file_stem

MAX_HTML_TABLE_ROWS = 1000

_STATE_COLORS = {
    "COMPLETED": "#1a7f37",
    "FAILED": "#cf222e",
    "RUNNING": "#0969da",
    "RETRYING": "#bf8700",
    "PENDING": "#6e7781",
}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2rem; color: #1f2328; background: #fff; }
h1 { margin-bottom: .2rem; }
.muted { color: #656d76; }
.tag { display: inline-block; background: #ddf4ff; color: #0550ae; border-radius: 1rem;
       padding: .1rem .6rem; margin: .1rem; font-size: .85rem; }
.state { font-weight: 600; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left;
         vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { white-space: pre-wrap; }
.result td, .result th { font-size: .85rem; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85rem; }
section.task { margin-top: 1.5rem; }
"""


def render_html(run: dict[str, Any]) -> str:
    """The HTML report of one run, from ``RunRecord.to_dict()``."""
    tasks = run.get("tasks") or []
    title = f"{run.get('flow_name', '')} - {run.get('state', '')}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        _header_html(run),
        "<h2>Tasks</h2>",
        _tasks_table_html(tasks),
        *(_task_section_html(task) for task in tasks if task.get("table")),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_reports(run: RunRecord, reports_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<Flow_Name>_<run_id>.html`` and ``.json`` into `reports_dir`."""
    directory = Path(reports_dir)
    directory.mkdir(parents=True, exist_ok=True)
    record = json_safe(run.to_dict())
    stem = f"{safe_file_stem(run.flow_name)}_{safe_file_stem(run.run_id)}"
    html_path = directory / f"{stem}.html"
    json_path = directory / f"{stem}.json"
    html_path.write_text(render_html(record), encoding="utf-8")
    json_path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                         encoding="utf-8")
    return html_path, json_path


# --- HTML pieces -------------------------------------------------------------------


def _header_html(run: dict[str, Any]) -> str:
    tags = run.get("tags") or {}
    tag_html = "".join(f'<span class="tag">{_e(k)}: {_e(v)}</span>' for k, v in tags.items())
    started, ended = run.get("started_at"), run.get("ended_at")
    duration = (ended - started) * 1000 if _is_number(started) and _is_number(ended) else None
    rows = [
        ("Run", f"<code>{_e(run.get('run_id', ''))}</code>"),
        ("State", _state_html(run.get("state", ""))),
        ("Started", _e(format_time(started))),
        ("Ended", _e(format_time(ended))),
        ("Duration", _e(format_duration(duration))),
        ("Tasks", _e(run.get("task_count", len(run.get("tasks") or [])))),
    ]
    if run.get("note"):
        rows.append(("Note", f'<span class="note">{_e(run["note"])}</span>'))
    if run.get("log_path"):
        rows.append(("Log file", f"<code>{_e(run['log_path'])}</code>"))
    info = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    return (
        f"<h1>{_e(run.get('flow_name', ''))}</h1>"
        f'<p class="muted">{_e(run.get("description", ""))}</p>'
        f"<p>{tag_html}</p><table>{info}</table>"
    )


def _tasks_table_html(tasks: list[dict[str, Any]]) -> str:
    head = ("<tr><th>#</th><th>Task</th><th>State</th><th>Duration</th>"
            "<th>Peak memory</th><th>Attempts</th><th>Crucial</th><th>Note</th></tr>")
    rows = [
        "<tr>"
        f'<td class="num">{_e(task.get("index", ""))}</td>'
        f'<td><a href="#task-{_e(task.get("index", ""))}">{_e(task.get("name", ""))}</a>'
        f'<div class="muted">{_e(task.get("description", ""))}</div></td>'
        f"<td>{_state_html(task.get('state', ''))}</td>"
        f'<td class="num">{_e(format_duration(task.get("duration_ms")))}</td>'
        f'<td class="num">{_e(format_bytes(task.get("peak_rss")))}</td>'
        f'<td class="num">{_e(task.get("attempts", ""))}</td>'
        f"<td>{'yes' if task.get('crucial_pass', True) else 'no'}</td>"
        f'<td class="note">{_e(task.get("note", ""))}</td>'
        "</tr>"
        for task in tasks
    ]
    return f"<table>{head}{''.join(rows)}</table>"


def _task_section_html(task: dict[str, Any]) -> str:
    return (
        f'<section class="task" id="task-{_e(task.get("index", ""))}">'
        f"<h3>#{_e(task.get('index', ''))} {_e(task.get('name', ''))} "
        f"{_state_html(task.get('state', ''))}</h3>"
        f"{_result_table_html(task.get('table') or [])}</section>"
    )


def _result_table_html(rows: list[Any]) -> str:
    rows = [{str(k): v for k, v in row.items()} if isinstance(row, dict) else {"value": row}
            for row in rows]
    columns = table_columns(rows)
    shown = rows[:MAX_HTML_TABLE_ROWS]
    head = "".join(f"<th>{_e(column)}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(cell_text(row.get(c, '')))}</td>" for c in columns) + "</tr>"
        for row in shown
    )
    more = len(rows) - len(shown)
    tail = f'<p class="muted">... {more:,} more rows in the JSON record</p>' if more else ""
    return f'<table class="result"><tr>{head}</tr>{body}</table>{tail}'


def _state_html(state: Any) -> str:
    color = _STATE_COLORS.get(str(state).upper(), "#1f2328")
    return f'<span class="state" style="color:{color}">{_e(state)}</span>'


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- formatting shared with the terminal view ---------------------------------------


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The union of the rows' keys, in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(str(key) for key in row))
    return list(columns)


def cell_text(value: Any) -> str:
    """A table cell as text: scalars as they are, nested values as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(json_safe(value), separators=(",", ":"), ensure_ascii=False)
    return str(value)


def format_duration(duration_ms: Any) -> str:
    """'850 ms', '12.3 s', '4 min 05 s', '2 h 03 min'; '-' when unknown."""
    if not _is_number(duration_ms) or not math.isfinite(duration_ms):
        return "-"
    if duration_ms < 1000:
        return f"{duration_ms:.0f} ms"
    seconds = duration_ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_bytes(size: Any) -> str:
    """'512 B', '1.5 KiB', '231.0 MiB'; '-' when unknown."""
    if not _is_number(size) or not math.isfinite(size) or size < 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_time(epoch: Any) -> str:
    """Local ISO-8601 time with seconds, or '-' when unknown."""
    if not _is_number(epoch) or not math.isfinite(epoch):
        return "-"
    try:
        return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return str(epoch)
