"""The local run's reports: a self-contained HTML page and the JSON record.

`render_html` works from ``RunRecord.to_dict()`` alone, so a report can be
re-rendered later from a saved JSON record. The page, top to bottom: the flow,
its state and the run-level reason when it failed; pass / fail / not-run
counts; the failed tasks, each one click from its details; the timeline
picture (`report_svg`); the task table; one section per task call (state,
duration, peak memory, attempts, note, result table, traceback, last lines of
output) and one per declared task that never ran. Every task has an anchor
(``#task-N``, ``#not-run-N``). Everything a task provides is untrusted and
escaped (`html_kit`); the page carries its CSS inline and needs no JavaScript
and no network.

The formatting helpers (durations, sizes, cells) live in `report_format` and are
re-exported here for the terminal view and the log file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..executor.records import NOT_RUN, RunRecord, not_run_names, shown_state, tally
from ..jsonsafe import json_safe
from ..sdk.result import TaskState
from ..textsafe import safe_file_stem
from .html_kit import badge, block, color, is_number, page, text, write_atomic
from .report_format import (  # noqa: F401  (re-exported)
    cell_text,
    format_bytes,
    format_duration,
    format_time,
    table_columns,
)
from .report_svg import timeline_svg

MAX_HTML_TABLE_ROWS = 1000
MAX_FAILED_LISTED = 50
INDEX_NAME = "index.html"

_Row = tuple[str, dict[str, Any]]  # (anchor id, task dict)


def render_html(run: dict[str, Any], links: dict[str, str] | None = None) -> str:
    """The HTML report of one run, from ``RunRecord.to_dict()``. `links` may hold
    relative hrefs for "log", "json" and "index"."""
    links = links or {}
    calls = _call_rows(run)
    not_run = _not_run_rows(run)
    title = f"{run.get('flow_name', '')} - {run.get('state', '')}"
    body = [
        _header_html(run, links),
        _counts_html(calls, not_run),
        _failed_html(calls),
        "<h2>Timeline</h2>",
        timeline_svg(run, calls + not_run),
        "<h2>Tasks</h2>",
        _tasks_table_html(calls, not_run),
        *(_task_section_html(anchor, task, run) for anchor, task in calls),
        *(_not_run_section_html(anchor, task, run) for anchor, task in not_run),
    ]
    return page(title, "\n".join(body))


def write_reports(run: RunRecord, reports_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<Flow_Name>_<run_id>.html`` and ``.json`` into `reports_dir`."""
    directory = Path(reports_dir)
    directory.mkdir(parents=True, exist_ok=True)
    record = json_safe(run.to_dict())
    if run.log_path:
        # Relative to the reports folder, so the link survives moving both together.
        record["log_href"] = os.path.relpath(Path(run.log_path).resolve(), directory.resolve())
    stem = f"{safe_file_stem(run.flow_name)}_{safe_file_stem(run.run_id)}"
    html_path = directory / f"{stem}.html"
    json_path = directory / f"{stem}.json"
    links = {"json": json_path.name, "index": INDEX_NAME}
    if record.get("log_href"):
        links["log"] = record["log_href"]
    write_atomic(json_path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    write_atomic(html_path, render_html(record, links))
    return html_path, json_path


# --- rows --------------------------------------------------------------------------


def _call_rows(run: dict[str, Any]) -> list[_Row]:
    rows: list[_Row] = []
    seen: set[str] = set()
    for position, task in enumerate(t for t in run.get("tasks") or [] if isinstance(t, dict)):
        index = task.get("index")
        anchor = f"task-{index if isinstance(index, int) else position}"
        if anchor in seen:  # only a hand-edited record repeats an index
            anchor = f"task-{position}-{len(seen)}"
        seen.add(anchor)
        # Read as a person should: a task Ctrl-C stopped shows INTERRUPTED, not FAILED.
        state = shown_state(str(task.get("state", "")), str(task.get("note", "")))
        rows.append((anchor, {**task, "state": state}))
    return rows


def _not_run_rows(run: dict[str, Any]) -> list[_Row]:
    names = record_not_run(run)
    return [(f"not-run-{i}", {"name": name, "state": NOT_RUN}) for i, name in enumerate(names)]


def record_not_run(run: dict[str, Any]) -> list[str]:
    """The declared tasks a recorded run never called: the `not_run` list the executor
    writes when the run ends, else (a record of a run still going, or from before that
    list existed) worked out from `declared_tasks`."""
    listed = run.get("not_run")
    if isinstance(listed, list) and listed:
        return [str(name) for name in listed]
    declared = run.get("declared_tasks")
    declared = [str(name) for name in declared] if isinstance(declared, list) else []
    tasks = run.get("tasks")
    called = [t for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []
    return not_run_names(declared, (str(task.get("name", "")) for task in called))


# --- HTML pieces -------------------------------------------------------------------


def _header_html(run: dict[str, Any], links: dict[str, str]) -> str:
    tags = run.get("tags") or {}
    tags = tags if isinstance(tags, dict) else {}
    tag_html = "".join(f'<span class="tag">{text(k)}: {text(v)}</span>' for k, v in tags.items())
    started, ended = run.get("started_at"), run.get("ended_at")
    duration = _ms_between(started, ended)
    log = run.get("log_path")
    rows = [
        ("Run", f"<code>{text(run.get('run_id', ''))}</code>"),
        ("Started", text(format_time(started))),
        ("Ended", text(format_time(ended))),
        ("Duration", text(format_duration(duration))),
    ]
    if log:
        href = links.get("log")
        shown = f"<code>{text(log)}</code>"
        rows.append(("Log file", f'<a href="{text(href)}">{shown}</a>' if href else shown))
    if links.get("json"):
        rows.append(("Record", f'<a href="{text(links["json"])}">{text(links["json"])}</a>'))
    if links.get("index"):
        rows.append(("All runs", f'<a href="{text(links["index"])}">{text(links["index"])}</a>'))
    info = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    reason = run_reason(run)
    reason_html = (f'<div class="reason"><strong>Why:</strong> {block(reason)}</div>'
                   if reason else "")
    return (
        f"<h1>{text(run.get('flow_name', ''))} {badge(run.get('state', ''))}</h1>"
        f'<p class="muted">{text(run.get("description", ""))}</p>'
        f"{f'<p>{tag_html}</p>' if tag_html else ''}{reason_html}<table>{info}</table>"
    )


def run_reason(run: dict[str, Any]) -> str:
    """Why a run failed: its own note, else the first failed crucial task's."""
    if run.get("note"):
        return str(run["note"])
    if str(run.get("state", "")).upper() == TaskState.COMPLETED:
        return ""
    for task in run.get("tasks") or []:
        if isinstance(task, dict) and _is_failed(task) and task.get("crucial_pass", True):
            return (f"crucial task #{task.get('index', '')} {task.get('name', '')} failed: "
                    f"{task.get('note', '')}")
    return ""


def _counts_html(calls: list[_Row], not_run: list[_Row]) -> str:
    counts = tally((task.get("state", "") for _, task in calls), len(not_run))
    colors = {"passed": TaskState.COMPLETED, "failed": TaskState.FAILED, "not run": NOT_RUN}
    cards = "".join(
        f'<div class="count" style="--c:{color(colors.get(label, label))}">'
        f"<strong>{number}</strong>{text(label)}</div>"
        for label, number in counts.items()
    )
    return f'<div class="counts">{cards}</div>'


def _failed_html(calls: list[_Row]) -> str:
    failed = [(anchor, task) for anchor, task in calls if _is_failed(task)]
    if not failed:
        return ""
    items = "".join(
        f'<li><a href="#{text(anchor)}">#{text(task.get("index", ""))} '
        f'{text(task.get("name", ""))}</a>{_crucial_mark(task)}'
        f': <span class="note">{text(_first_line(task.get("note", "")))}</span></li>'
        for anchor, task in failed[:MAX_FAILED_LISTED]
    )
    more = len(failed) - MAX_FAILED_LISTED
    if more > 0:
        items += f"<li>... and {more:,} more (marked in the table below)</li>"
    return (f'<div class="failed-list"><strong>Failed tasks ({len(failed):,})</strong>'
            f"<ul>{items}</ul></div>")


def _tasks_table_html(calls: list[_Row], not_run: list[_Row]) -> str:
    head = ("<tr><th>#</th><th>Task</th><th>State</th><th>Duration</th>"
            "<th>Peak memory</th><th>Attempts</th><th>Crucial</th><th>Note</th></tr>")
    rows = [_task_row(anchor, task) for anchor, task in calls]
    rows += [
        f'<tr class="notrun"><td class="num">-</td><td><a href="#{text(anchor)}">'
        f'{text(task["name"])}</a></td><td>{badge(NOT_RUN)}</td><td class="num">-</td>'
        '<td class="num">-</td><td class="num">0</td><td></td><td></td></tr>'
        for anchor, task in not_run
    ]
    return f"<table>{head}{''.join(rows)}</table>"


def _task_row(anchor: str, task: dict[str, Any]) -> str:
    css = ' class="failed"' if _is_failed(task) else ""
    return (
        f"<tr{css}>"
        f'<td class="num">{text(task.get("index", ""))}</td>'
        f'<td><a href="#{text(anchor)}">{text(task.get("name", ""))}</a>'
        f'<div class="muted">{text(task.get("description", ""))}</div></td>'
        f"<td>{badge(task.get('state', ''))}</td>"
        f'<td class="num">{text(format_duration(task.get("duration_ms")))}</td>'
        f'<td class="num">{text(format_bytes(task.get("peak_rss")))}</td>'
        f'<td class="num">{text(task.get("attempts", ""))}</td>'
        f"<td>{'yes' if task.get('crucial_pass', True) else 'no'}</td>"
        f'<td class="note">{text(_first_line(task.get("note", "")))}</td>'
        "</tr>"
    )


def _task_section_html(anchor: str, task: dict[str, Any], run: dict[str, Any]) -> str:
    # Where a failed or interrupted task was is worth seeing without a click.
    failed = str(task.get("state", "")).upper() in {TaskState.FAILED, "INTERRUPTED"}
    facts = [
        ("Duration", text(format_duration(task.get("duration_ms")))),
        ("Peak memory", text(format_bytes(task.get("peak_rss")))),
        ("Crucial", "yes" if task.get("crucial_pass", True) else "no"),
    ]
    facts += _attempt_facts(task, run)
    parts = [
        f'<section class="task" id="{text(anchor)}" style="--c:{color(task.get("state"))}">',
        f"<h3>#{text(task.get('index', ''))} {text(task.get('name', ''))} "
        f"{badge(task.get('state', ''))}</h3>",
        f'<p class="muted">{text(task.get("description", ""))}</p>'
        if task.get("description") else "",
        '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>",
    ]
    if task.get("note"):
        parts.append(f'<pre class="note">{block(task["note"])}</pre>')
    if task.get("table"):
        parts.append(_result_table_html(task["table"]))
    if task.get("traceback"):
        parts.append(f"<details{' open' if failed else ''}><summary>Traceback</summary>"
                     f"<pre>{block(task['traceback'])}</pre></details>")
    parts.append(_output_html(task.get("output_tail") or [], failed))
    parts.append("</section>")
    return "".join(parts)


def _attempt_facts(task: dict[str, Any], run: dict[str, Any]) -> list[tuple[str, str]]:
    spans = [s for s in task.get("attempt_spans") or [] if isinstance(s, dict)]
    if len(spans) < 2:
        return [("Attempts", text(task.get("attempts", 0)))]
    start = run.get("started_at")
    items = []
    for span in spans:
        began, ended = span.get("started_at"), span.get("ended_at")
        offset = _ms_between(start, began)
        at = "-" if offset is None else f"+{format_duration(offset)}"
        took = _ms_between(began, ended)
        note = f": {text(_first_line(span.get('note', '')))}" if span.get("note") else ""
        items.append(f"<li>attempt {text(span.get('attempt', ''))} at {text(at)}, "
                     f"{text(str(span.get('state', '')).lower())} in "
                     f"{text(format_duration(took))}{note}</li>")
    return [("Attempts", f"{len(spans)}<ol>{''.join(items)}</ol>")]


def _output_html(tail: list[Any], open_it: bool) -> str:
    lines = [item for item in tail if isinstance(item, list | tuple) and len(item) == 2]
    if not lines:
        return ""
    css = {"stderr": "err", "runner": "muted"}
    body = "\n".join(
        f'<span class="{css[stream]}">{text(line)}</span>' if stream in css else text(line)
        for stream, line in lines
    )
    label = f"Last {len(lines)} lines of output" if len(lines) > 1 else "Last line of output"
    return (f"<details{' open' if open_it else ''}><summary>{label} "
            '<span class="muted">(stderr in red; all of it is in the log file)</span>'
            f"</summary><pre>{body}</pre></details>")


def _not_run_section_html(anchor: str, task: dict[str, Any], run: dict[str, Any]) -> str:
    why = ("the run failed before the flow body called it"
           if str(run.get("state", "")).upper() != TaskState.COMPLETED
           else "the flow body did not call it in this run")
    return (f'<section class="task" id="{text(anchor)}" style="--c:{color(NOT_RUN)}">'
            f"<h3>{text(task['name'])} {badge(NOT_RUN)}</h3>"
            f'<p class="muted">Declared in the flow but never ran: {why}.</p></section>')


def _result_table_html(rows: list[Any]) -> str:
    rows = [{str(k): v for k, v in row.items()} if isinstance(row, dict) else {"value": row}
            for row in rows]
    columns = table_columns(rows)
    shown = rows[:MAX_HTML_TABLE_ROWS]
    head = "".join(f"<th>{text(column)}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{text(cell_text(row.get(c, '')))}</td>" for c in columns) + "</tr>"
        for row in shown
    )
    more = len(rows) - len(shown)
    tail = f'<p class="muted">... {more:,} more rows in the JSON record</p>' if more else ""
    return f'<table class="result"><tr>{head}</tr>{body}</table>{tail}'


def _ms_between(start: Any, end: Any) -> float | None:
    return (end - start) * 1000 if is_number(start) and is_number(end) else None


def _is_failed(task: dict[str, Any]) -> bool:
    return str(task.get("state", "")).upper() == TaskState.FAILED


def _crucial_mark(task: dict[str, Any]) -> str:
    return "" if task.get("crucial_pass", True) else " (non-crucial)"


def _first_line(note: Any) -> str:
    lines = str(note).splitlines()
    return lines[0] + (" ..." if len(lines) > 1 else "") if lines else ""
