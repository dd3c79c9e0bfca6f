"""The curve of item 13.3 as a small SVG, written by hand (no plotting dependency).

Four panels against --concurrency (evenly spaced categories): task start p50 and p99,
the control process's CPU per task call, task calls per second, and the heartbeat's
largest gap with its 3.5 s target. Each point is labelled with its value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

# (concurrency, start p50 ms, start p99 ms, CPU ms/call, threads, beat max s, calls/s)
Point = tuple[int, float, float, float, int, float, float]

PANEL_W, PANEL_H, PAD = 330, 200, 44
COLOURS = ("#1f77b4", "#d62728")


def _panel(x0: float, y0: float, title: str, xs: Sequence[int],
           series: Sequence[tuple[str, Sequence[float]]], unit: str,
           target: float | None = None) -> list[str]:
    values = [v for _, vs in series for v in vs if not math.isnan(v)] + \
        ([target] if target else [])
    top = max(values, default=1.0) * 1.15 or 1.0
    left, right = x0 + PAD, x0 + PANEL_W - 12
    bottom, high = y0 + PANEL_H - 30, y0 + 34

    def px(i: int) -> float:
        return left + (right - left) * (i + 0.5) / len(xs)

    def py(v: float) -> float:
        return bottom - (bottom - high) * v / top

    out = [f'<text x="{x0 + PANEL_W / 2}" y="{y0 + 18}" text-anchor="middle" '
           f'font-weight="bold">{escape(title)}</text>',
           f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#444"/>',
           f'<line x1="{left}" y1="{high}" x2="{left}" y2="{bottom}" stroke="#444"/>',
           f'<text x="{left - 4}" y="{high + 4}" text-anchor="end" font-size="10">'
           f'{_number(top)}</text>',
           f'<text x="{left - 4}" y="{bottom}" text-anchor="end" font-size="10">0</text>',
           f'<text x="{x0 + 10}" y="{(high + bottom) / 2}" font-size="10" '
           f'transform="rotate(-90 {x0 + 10} {(high + bottom) / 2})" '
           f'text-anchor="middle">{escape(unit)}</text>']
    for i, c in enumerate(xs):
        out.append(f'<text x="{px(i)}" y="{bottom + 14}" text-anchor="middle" '
                   f'font-size="10">{c}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{bottom + 27}" text-anchor="middle" '
               f'font-size="10">--concurrency</text>')
    if target:
        out.append(f'<line x1="{left}" y1="{py(target)}" x2="{right}" y2="{py(target)}" '
                   f'stroke="#999" stroke-dasharray="4 3"/>'
                   f'<text x="{right}" y="{py(target) - 3}" text-anchor="end" '
                   f'font-size="10" fill="#666">target {target:g}</text>')
    for (label, vs), colour in zip(series, COLOURS, strict=False):
        points = [(px(i), py(v), v) for i, v in enumerate(vs) if not math.isnan(v)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                   f'stroke-width="2"/>')
        for x, y, v in points:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>'
                       f'<text x="{x + 4:.1f}" y="{y - 5:.1f}" font-size="10" '
                       f'fill="{colour}">{_number(v)}</text>')
        if len(series) > 1:
            at = len([s for s in series if s[0] < label])
            out.append(f'<text x="{left + 8}" y="{high + 12 + 12 * at}" font-size="10" '
                       f'fill="{colour}">{escape(label)}</text>')
    return out


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def write_curve(path: Path, points: Sequence[Point], subtitle: str) -> None:
    """Write the four panels for `points` (one per concurrency) to `path`."""
    xs = [p[0] for p in points]
    panels = [
        ("task start (call -> first statement)", [("p50", [p[1] for p in points]),
                                                   ("p99", [p[2] for p in points])], "ms", None),
        ("control process CPU per task call", [("ms", [p[3] for p in points])], "ms", None),
        ("task calls per second", [("calls/s", [p[6] for p in points])], "calls/s", None),
        ("heartbeat largest gap", [("s", [p[5] for p in points])], "s", 3.5),
    ]
    width, height = 2 * PANEL_W, 2 * PANEL_H + 50
    body = [f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" '
            f'font-weight="bold">One worker, many runs at once ({escape(subtitle)})</text>',
            f'<text x="{width / 2}" y="36" text-anchor="middle" font-size="11">control '
            f'process threads: {", ".join(f"{p[4]} at {p[0]}" for p in points)}</text>']
    for n, (title, series, unit, target) in enumerate(panels):
        body += _panel((n % 2) * PANEL_W, 46 + (n // 2) * PANEL_H, title, xs, series, unit,
                       target)
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
                    f'height="{height}" font-family="sans-serif" font-size="12">\n'
                    + "\n".join(body) + "\n</svg>\n", encoding="utf-8")
