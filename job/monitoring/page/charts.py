"""Line charts as inline SVG, drawn from the numbers of metrics.jsonl: one marker per epoch, so
that a reader (or a test) can count the epochs a chart holds."""

from __future__ import annotations

import math
from html import escape
from typing import Any

WIDTH, HEIGHT = 420, 220
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 14, 34
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def line_chart(title: str, records: list[dict[str, Any]], keys: tuple[str, ...], log_scale: bool = False) -> str:
    """An SVG of ``keys`` of each record against its epoch. Values that are not finite numbers
    (or not positive, on a log scale) are left out; a chart without any says so."""
    series = {
        key: [(r["epoch"], float(r[key])) for r in records if finite(r.get(key)) and (not log_scale or r[key] > 0)]
        for key in keys
    }
    points = [p for values in series.values() for p in values]
    label = escape(title)
    if not points:
        return f'<p class="empty">{label}: no values yet</p>'
    transform = math.log10 if log_scale else (lambda v: v)
    xs = [x for x, _ in points]
    ys = [transform(y) for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)

    def py(y: float) -> float:
        return HEIGHT - BOTTOM - (transform(y) - y0) / (y1 - y0) * (HEIGHT - TOP - BOTTOM)

    parts = [
        f'<svg class="chart" role="img" aria-label="{label}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" class="frame"/>',
        *_axis_labels(y0, y1, x0, x1, log_scale),
    ]
    for colour, (key, values) in zip(COLOURS * 2, series.items()):
        if not values:
            continue
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in values)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for x, y in values:
            parts.append(
                f'<circle class="point" data-series="{escape(key)}" data-epoch="{x}" cx="{px(x):.1f}" cy="{py(y):.1f}" '
                f'r="2.5" fill="{colour}"><title>{escape(key)}, epoch {x}: {y:.6g}</title></circle>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><i style="background:{colour}"></i>{escape(key)}</span>'
        for colour, key in zip(COLOURS * 2, keys) if series[key]
    )
    scale = " (log scale)" if log_scale else ""
    return f'<figure class="chart"><figcaption>{label}{scale} {legend}</figcaption>{"".join(parts)}</figure>'


def _axis_labels(y0: float, y1: float, x0: float, x1: float, log_scale: bool) -> list[str]:
    def shown(v: float) -> str:
        return f"{10 ** v:.3g}" if log_scale else f"{v:.3g}"

    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    return [
        f'<text x="{LEFT - 4}" y="{TOP + 10}" text-anchor="end">{shown(y1)}</text>',
        f'<text x="{LEFT - 4}" y="{bottom}" text-anchor="end">{shown(y0)}</text>',
        f'<text x="{LEFT}" y="{bottom + 16}">epoch {x0:g}</text>',
        f'<text x="{right}" y="{bottom + 16}" text-anchor="end">epoch {x1:g}</text>',
    ]
