"""A picture of a training step's memory: live bytes over the step, stacked by category,
phases shaded, the peak marked. Self-contained SVG, drawn from ``StepMemory.to_dict()``
(plain data, so this part needs nothing from ``ckpt_compile.memory``).

>>> data = {"kind": "step_memory", "peak_bytes": 3, "unit": "op", "peak_phase": "forward",
...         "peak_module": None, "source": "example", "device": "cpu",
...         "categories": ["parameters", "activations"],
...         "timeline": [[0, "forward", None, [1, 0]], [1, "forward", None, [1, 2]]]}
>>> render_step_svg(data).startswith("<svg")
True
"""
from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

from ckpt_compile.diagnostics._graph_stats import format_bytes

__all__ = ["render_step_svg", "render_step_html", "is_step_memory"]

_COLORS = {"parameters": "#2ca02c", "gradients": "#1f77b4", "optimizer_state": "#bcbd22",
           "activations": "#d62728", "temporary": "#9467bd"}
_PHASES = {"forward": "#eef4fb", "loss": "#fdf3e7", "backward": "#eef8ee", "optimizer": "#f6f0f8"}
_W, _H, _LEFT, _TOP, _BOTTOM, _MAX_POINTS = 900, 360, 80, 40, 70, 600


def is_step_memory(obj: Any) -> bool:
    to_dict = getattr(obj, "to_dict", None)
    return callable(to_dict) and hasattr(obj, "peak_phase") and hasattr(obj, "timeline")


def _thin(rows: list) -> list:
    """At most ``_MAX_POINTS`` rows: of each run of rows, the one with the most bytes (the
    peak survives thinning)."""
    if len(rows) <= _MAX_POINTS:
        return rows
    step = len(rows) / _MAX_POINTS
    return [max(rows[int(k * step):max(int((k + 1) * step), int(k * step) + 1)], key=lambda r: sum(r[3]))
            for k in range(_MAX_POINTS)]


def render_step_svg(data: dict[str, Any]) -> str:
    rows = _thin(data["timeline"])
    categories = data["categories"]
    width, height = _W - _LEFT - 20, _H - _TOP - _BOTTOM
    top = max([sum(r[3]) for r in rows] + [1])
    n = max(len(rows) - 1, 1)

    def x(i: float) -> float:
        return _LEFT + width * i / n

    def y(b: float) -> float:
        return _TOP + height * (1 - b / top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-family="sans-serif" font-size="11">',
           f'<text x="{_LEFT}" y="16" font-size="13">{escape(_title(data))}</text>']
    # Phase bands.
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][1] != rows[start][1]:
            phase = rows[start][1]
            if phase in _PHASES:
                out.append(f'<rect x="{x(start):.1f}" y="{_TOP}" width="{max(x(i - 1) - x(start), 1):.1f}" '
                           f'height="{height}" fill="{_PHASES[phase]}"/>')
                out.append(f'<text x="{x(start) + 2:.1f}" y="{_TOP + 12}" fill="#555">{phase}</text>')
            start = i
    # Stacked areas, bottom category first.
    below = [0] * len(rows)
    for k, category in enumerate(categories):
        above = [b + r[3][k] for b, r in zip(below, rows)]
        if any(a != b for a, b in zip(above, below)):
            upper = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(above))
            lower = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in reversed(list(enumerate(below))))
            out.append(f'<polygon points="{upper} {lower}" fill="{_COLORS.get(category, "#999")}" fill-opacity="0.85">'
                       f'<title>{escape(category.replace("_", " "))}</title></polygon>')
        below = above
    # Axes and the peak.
    out.append(f'<line x1="{_LEFT}" y1="{_TOP + height}" x2="{_LEFT + width}" y2="{_TOP + height}" stroke="#333"/>')
    out.append(f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + height}" stroke="#333"/>')
    for frac in (0.0, 0.5, 1.0):
        out.append(f'<text x="{_LEFT - 6}" y="{y(top * frac) + 4:.1f}" text-anchor="end">{format_bytes(int(top * frac))}</text>')
    unit = "operators" if data.get("unit") == "op" else "time (us)"
    out.append(f'<text x="{_LEFT + width / 2}" y="{_TOP + height + 16}" text-anchor="middle">{unit} over the step</text>')
    peak = max(range(len(rows)), key=lambda i: sum(rows[i][3])) if rows else 0
    if rows:
        px, py = x(peak), y(sum(rows[peak][3]))
        out.append(f'<line x1="{px:.1f}" y1="{_TOP}" x2="{px:.1f}" y2="{_TOP + height}" stroke="#000" stroke-dasharray="4,3"/>')
        out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="#000"/>')
        anchor = "end" if px > _LEFT + width * 0.7 else "start"
        shift = -6 if anchor == "end" else 6
        out.append(f'<text x="{px + shift:.1f}" y="{py - 6:.1f}" text-anchor="{anchor}" font-weight="bold">'
                   f'peak {format_bytes(data["peak_bytes"])}</text>')
    # Legend.
    lx = _LEFT
    for category in categories:
        out.append(f'<rect x="{lx}" y="{_H - 24}" width="12" height="12" fill="{_COLORS.get(category, "#999")}"/>')
        label = category.replace("_", " ")
        out.append(f'<text x="{lx + 16}" y="{_H - 14}">{escape(label)}</text>')
        lx += 24 + 7 * len(label)
    out.append("</svg>")
    return "\n".join(out)


def render_step_html(step) -> str:
    """A self-contained HTML page: the step's table, then :func:`render_step_svg`."""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ckpt_compile step memory</title></head>"
            f"<body><pre>{escape(str(step))}</pre>\n{render_step_svg(step.to_dict())}</body></html>\n")


def _title(data: dict[str, Any]) -> str:
    where = f" in {data['peak_phase']}" if data.get("peak_phase") else ""
    where += f" at {data['peak_module']}" if data.get("peak_module") else ""
    return f"step peak {format_bytes(data['peak_bytes'])}{where} ({data['source']}, {data['device']})"
