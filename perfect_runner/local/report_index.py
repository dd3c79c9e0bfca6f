"""``index.html`` in the reports folder: every run recorded there, newest first.

Rebuilt after each local run from the JSON records in the folder (not from
memory), so it also lists the runs of earlier invocations and of other runners
sharing the folder. A file that is not a run record (corrupt, foreign, too big)
is skipped and named on the page with the reason; nothing else is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..executor.records import shown_state, tally
from ..sdk.units import format_size
from .html_kit import badge, is_number, page, text, write_atomic
from .report_format import format_duration, format_time
from .report_html import INDEX_NAME, record_not_run, run_reason

MAX_RECORD_BYTES = 64 << 20  # a run record bigger than this is not read for the index


@dataclass
class Index:
    path: Path
    runs: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)


def write_index(reports_dir: str | Path) -> Index:
    """Rewrite ``<reports_dir>/index.html`` from every ``*.json`` run record there."""
    directory = Path(reports_dir)
    index = Index(directory / INDEX_NAME)
    entries = []
    for path in sorted(directory.glob("*.json")):
        record, why = _read_record(path)
        if record is None:
            index.skipped.append((path.name, why))
        else:
            entries.append((path, record))
    entries.sort(key=_newest_first)
    index.runs = len(entries)
    write_atomic(index.path, page("perfect_runner runs", _body(entries, index.skipped)))
    return index


def _read_record(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The run record in `path`, or None and why it is not one."""
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None, f"larger than {format_size(MAX_RECORD_BYTES)}"
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror or exc}"
    except (ValueError, RecursionError) as exc:
        return None, f"not valid JSON: {str(exc)[:100]}"
    if not isinstance(data, dict):
        return None, "not a run record (not a JSON object)"
    missing = [key for key, kind in (("run_id", str), ("flow_name", str), ("tasks", list))
               if not isinstance(data.get(key), kind)]
    if missing:
        return None, f"not a run record (no valid {', '.join(missing)})"
    return data, ""


def _newest_first(entry: tuple[Path, dict[str, Any]]) -> tuple[float, str]:
    path, record = entry
    started = record.get("started_at")
    return (-(started if is_number(started) else _mtime(path)), path.name)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _body(entries: list[tuple[Path, dict[str, Any]]], skipped: list[tuple[str, str]]) -> str:
    head = ("<tr><th>Started</th><th>Flow</th><th>State</th><th>Passed</th><th>Failed</th>"
            "<th class=\"nowrap\">Not run</th><th>Duration</th><th>Links</th></tr>")
    rows = "".join(_row(path, record) for path, record in entries)
    table = f"<table>{head}{rows}</table>" if entries else "<p>No runs recorded yet.</p>"
    return (f"<h1>Runs</h1><p class=\"muted\">{len(entries)} runs in this folder, newest "
            f"first.</p>{table}{_skipped_html(skipped)}")


def _row(path: Path, record: dict[str, Any]) -> str:
    tasks = [t for t in record["tasks"] if isinstance(t, dict)]
    not_run = record_not_run(record)
    counts = tally((shown_state(str(t.get("state", "")), str(t.get("note", "")))
                    for t in tasks), len(not_run))
    started, ended = record.get("started_at"), record.get("ended_at")
    duration = (ended - started) * 1000 if is_number(started) and is_number(ended) else None
    html = path.with_suffix(".html")
    flow = text(record["flow_name"])
    flow_cell = f'<a href="{text(html.name)}">{flow}</a>' if html.exists() else flow
    links = [f'<a href="{text(html.name)}">report</a>'] if html.exists() else []
    links.append(f'<a href="{text(path.name)}">record</a>')
    log_href = record.get("log_href")
    if isinstance(log_href, str) and log_href:
        links.append(f'<a href="{text(log_href)}">log</a>')
    return (
        f'<tr><td class="nowrap">{text(format_time(started).replace("T", " ")[:19])}</td>'
        f'<td>{flow_cell}<div class="muted"><code>{text(record["run_id"])}</code></div></td>'
        f"<td>{badge(record.get('state', ''))}{_reason_html(record)}</td>"
        f'<td class="num">{counts["passed"]}</td>'
        f'<td class="num{" bad" if counts["failed"] else ""}">{counts["failed"]}</td>'
        f'<td class="num">{counts["not run"]}</td>'
        f'<td class="num">{text(format_duration(duration))}</td>'
        f'<td class="nowrap">{" · ".join(links)}</td></tr>'
    )


def _reason_html(record: dict[str, Any]) -> str:
    reason = run_reason(record).splitlines()
    return f'<div class="muted note">{text(_clip(reason[0], 120))}</div>' if reason else ""


def _clip(line: str, limit: int) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _skipped_html(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    items = "".join(f"<li><code>{text(name)}</code>: {text(why)}</li>" for name, why in skipped)
    return (f"<h2>Skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''}</h2>"
            f'<p class="muted">JSON files in this folder that are not run records:</p>'
            f"<ul>{items}</ul>")

