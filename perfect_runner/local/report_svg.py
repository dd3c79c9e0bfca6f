"""The run as a picture: an inline SVG timeline with each task's peak memory.

One row per task call, in call order: a bar per attempt from its start to its
end on a common time axis (a retried task shows a bar per attempt, the failed
ones that were retried in amber, joined by a thin line across the retry delay),
coloured by how the attempt ended; on the right, the task's peak memory as a
bar scaled to the run's largest. Declared tasks that never ran get a row saying
so. Each label links to the task's section of the report; hovering a bar shows
its attempt, state, duration and note (an SVG <title>: no script needed).

Works from the JSON record alone, like the rest of the report; every string in
it is untrusted and goes through `html_kit.text`.
"""

from __future__ import annotations

from typing import Any

from ..sdk.result import TaskState
from .html_kit import RETRIED_COLOR, color, is_number, text
from .report_format import format_bytes, format_duration

MAX_ROWS = 300
WIDTH = 960
LABEL_W = 220
MEM_W = 190
CHART_X = LABEL_W
CHART_W = WIDTH - LABEL_W - MEM_W - 20
MEM_X = WIDTH - MEM_W + 10
MEM_BAR_W = 100
ROW_H = 22
BAR_H = 14
TOP = 44
LABEL_CHARS = 30
TICKS = 5


def timeline_svg(run: dict[str, Any], rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The picture for `run`; `rows` are (anchor id, task dict) for the task calls
    followed by the not-run tasks (whose dicts have only a name and a state)."""
    shown = rows[:MAX_ROWS]
    t0, t1 = _time_range(run, [task for _, task in shown])
    peak = max((task.get("peak_rss") for _, task in shown if _positive(task.get("peak_rss"))),
               default=0)
    height = TOP + ROW_H * len(shown) + 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="12">',
        f"<title>Timeline of {text(run.get('flow_name', ''))}</title>",
        _axis(t0, t1, len(shown)),
        *(_row(i, anchor, task, t0, t1, peak) for i, (anchor, task) in enumerate(shown)),
        _legend(TOP + ROW_H * len(shown) + 18),
        "</svg>",
    ]
    more = len(rows) - len(shown)
    tail = (f'<p class="muted">... {more:,} more rows not drawn (all are in the table '
            "below)</p>") if more else ""
    return f'<div class="picture">{"".join(parts)}</div>{tail}'


def _time_range(run: dict[str, Any], tasks: list[dict[str, Any]]) -> tuple[float, float]:
    times = [t for task in tasks for span in _spans(task, None) for t in span[:2]
             if is_number(t)]
    starts = [run.get("started_at"), *times]
    ends = [run.get("ended_at"), *times]
    t0 = min((t for t in starts if is_number(t)), default=0.0)
    t1 = max((t for t in ends if is_number(t)), default=t0)
    return t0, max(t1, t0 + 0.001)


def _spans(task: dict[str, Any], run_end: float | None) -> list[tuple[Any, Any, str, str, int]]:
    """(start, end, state, note, attempt) per attempt; one span for a call that
    never got an attempt (its arguments could not be sent, the flow itself failed)."""
    spans = [s for s in task.get("attempt_spans") or [] if isinstance(s, dict)]
    if not spans and task.get("started_at") is not None:
        spans = [{"attempt": 1, "started_at": task.get("started_at"),
                  "ended_at": task.get("ended_at"), "state": task.get("state", ""),
                  "note": task.get("note", "")}]
    result = []
    for span in spans:
        end = span.get("ended_at")
        state = span.get("state", "")
        if not is_number(end):  # still running when the run ended (interrupted)
            end, state = run_end, task.get("state", state)
        result.append((span.get("started_at"), end, str(state), str(span.get("note") or ""),
                       span.get("attempt", 1)))
    return result


def _axis(t0: float, t1: float, rows: int) -> str:
    bottom = TOP + ROW_H * rows
    parts = [
        f'<text x="{CHART_X}" y="13" font-weight="bold">Time since the run started</text>',
        f'<text x="{MEM_X}" y="13" font-weight="bold">Peak memory</text>',
    ]
    for i in range(TICKS + 1):
        x = CHART_X + CHART_W * i / TICKS
        label = format_duration((t1 - t0) * 1000 * i / TICKS) if i else "0"
        anchor = "end" if i == TICKS else "start" if i == 0 else "middle"
        parts.append(f'<line x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{bottom}" '
                     'stroke="#d8dee4" stroke-width="1"/>')
        parts.append(f'<text x="{x:.1f}" y="{TOP - 10}" text-anchor="{anchor}" '
                     f'fill="#656d76" font-size="11">{text(label)}</text>')
    return "".join(parts)


def _row(i: int, anchor: str, task: dict[str, Any], t0: float, t1: float, peak: float) -> str:
    y = TOP + ROW_H * i
    mid = y + ROW_H / 2 + 4
    name = str(task.get("name", ""))
    index = task.get("index")
    label = (f"#{index} " if index is not None else "") + name
    short = label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"
    stripe = (f'<rect x="0" y="{y}" width="{WIDTH}" height="{ROW_H}" fill="#f6f8fa"/>'
              if i % 2 else "")
    parts = [
        stripe,
        f'<a href="#{text(anchor)}"><title>{text(label)}</title>'
        f'<text x="4" y="{mid:.1f}" fill="#0969da">{text(short)}</text></a>',
    ]
    spans = _spans(task, t1)
    if not spans:
        parts.append(f'<text x="{CHART_X + 4}" y="{mid:.1f}" fill="{color(task.get("state"))}" '
                     f'font-style="italic">{text(str(task.get("state", "")).lower())}</text>')
    else:
        parts.append(_bars(y, name, spans, t0, t1))
    parts.append(_memory(y, mid, task.get("peak_rss"), peak))
    return "".join(parts)


def _bars(y: float, name: str, spans: list[tuple[Any, Any, str, str, int]],
          t0: float, t1: float) -> str:
    def x_of(t: Any) -> float:
        t = t if is_number(t) else t0
        return CHART_X + CHART_W * min(max((t - t0) / (t1 - t0), 0.0), 1.0)

    top = y + (ROW_H - BAR_H) / 2
    parts = []
    if len(spans) > 1:
        x1, x2 = x_of(spans[0][0]), x_of(spans[-1][1])
        parts.append(f'<line x1="{x1:.1f}" y1="{y + ROW_H / 2:.1f}" x2="{x2:.1f}" '
                     f'y2="{y + ROW_H / 2:.1f}" stroke="#8c959f" stroke-dasharray="3 2"/>')
    for number, (start, end, state, note, attempt) in enumerate(spans, 1):
        retried = number < len(spans) and state.upper() == TaskState.FAILED
        fill = RETRIED_COLOR if retried else color(state)
        x = x_of(start)
        width = max(x_of(end) - x, 2.0)
        took = (end - start) * 1000 if is_number(start) and is_number(end) else None
        what = "failed, retried" if retried else state.lower()
        tip = f"{name}, attempt {attempt}: {what} in {format_duration(took)}"
        tip += f" - {note}" if note else ""
        parts.append(f'<rect class="attempt" x="{x:.1f}" y="{top:.1f}" width="{width:.1f}" '
                     f'height="{BAR_H}" rx="2" fill="{fill}"><title>{text(tip)}</title></rect>')
    return "".join(parts)


def _memory(y: float, mid: float, rss: Any, peak: float) -> str:
    if not _positive(rss) or not peak:
        return f'<text x="{MEM_X}" y="{mid:.1f}" fill="#8c959f">-</text>'
    width = max(MEM_BAR_W * rss / peak, 1.0)
    top = y + (ROW_H - BAR_H) / 2
    return (f'<rect x="{MEM_X}" y="{top:.1f}" width="{width:.1f}" height="{BAR_H}" rx="2" '
            f'fill="#54aeff"/><text x="{MEM_X + MEM_BAR_W + 6}" y="{mid:.1f}" '
            f'fill="#1f2328">{text(format_bytes(rss))}</text>')


def _legend(y: float) -> str:
    items = [("passed", color(TaskState.COMPLETED)), ("failed", color(TaskState.FAILED)),
             ("failed, retried", RETRIED_COLOR), ("interrupted", color("INTERRUPTED")),
             ("running", color(TaskState.RUNNING)), ("not run", color("NOT RUN")),
             ("peak memory", "#54aeff")]
    parts, x = [], 4
    for label, fill in items:
        parts.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" rx="2" fill="{fill}"/>'
                     f'<text x="{x + 16}" y="{y}" fill="#57606a">{label}</text>')
        x += 28 + 6 * len(label)
    return "".join(parts)


def _positive(value: Any) -> bool:
    return is_number(value) and value > 0
