"""A picture of the cut: self-contained SVG (or HTML around it), no plotting library needed.

Top: the partitioned graph, forward lane above the dashed cut line, backward lane below.
Saved values (red) cross the cut; recomputed nodes (orange) sit in the backward lane;
banned nodes (may never be recomputed: purple) and plain nodes are shaded. Graphs with more
than ``max_nodes`` nodes collapse every checkpoint region, and every run of nodes between
regions, into one box whose stripes show its share of each kind. Bottom: a bar chart of the
bytes each region saves, ours against the no-checkpoint baseline.

>>> from ckpt_compile.diagnostics._report import Report
>>> report = Report.from_dict({"graphs": []})
>>> render_svg(report).startswith("<svg")
True
"""
from __future__ import annotations

import os
import pathlib
from typing import Any
from xml.sax.saxutils import escape


from ckpt_compile.diagnostics import _step_picture
from ckpt_compile.diagnostics._graph_stats import format_bytes

__all__ = ["render_svg", "render_html", "write_picture"]

COLORS = {
    "saved": "#d62728", "recomputed": "#ff7f0e", "banned": "#9467bd",
    "forward": "#aec7e8", "backward": "#c7e9c0",
}
_LEGEND = {
    "saved": "saved for backward (crosses the cut)", "recomputed": "recomputed in backward",
    "banned": "never recomputed (banned), not saved", "forward": "forward", "backward": "backward",
}
_NODE_W, _GROUP_W, _GAP, _BOX_H, _LANE_GAP, _MARGIN = 10, 64, 4, 28, 120, 20


# ---------------------------------------------------------------- data


# ---------------------------------------------------------------- layout


def _items(structure: dict[str, Any], collapse: bool) -> tuple[list[dict], list[int]]:
    """Boxes to draw per side (one per node, or one per run of a region), and the box of
    each node."""
    items: list[dict] = []
    box_of: list[int] = []
    current: dict[str, int] = {}  # side -> index of its open box
    for row in structure["nodes"]:
        side, status, region = row[1], row[2], row[3]
        if not collapse or side not in current or items[current[side]]["region"] != region:
            current[side] = len(items)
            items.append({"side": side, "region": region, "counts": {}, "names": [], "ops": {},
                          "bytes": 0, "source": ""})
        k = current[side]
        item = items[k]
        item["counts"][status] = item["counts"].get(status, 0) + 1
        if len(item["names"]) < 3:
            item["names"].append(row[0])
        if len(row) >= 7:  # op, output bytes, source line (reports written before issue 22 lack them)
            item["ops"][row[4]] = item["ops"].get(row[4], 0) + 1
            item["bytes"] += row[5] if status == "saved" or not collapse else 0
            item["source"] = item["source"] or row[6]
        box_of.append(k)
    return items, box_of


def _graph_svg(structure: dict[str, Any], top: float, max_nodes: int) -> tuple[list[str], float, float]:
    collapse = len(structure["nodes"]) > max_nodes
    items, box_of = _items(structure, collapse)
    width = _GROUP_W if collapse else _NODE_W
    lanes = {"forward": top + 30, "backward": top + 30 + _BOX_H + _LANE_GAP}
    x = {"forward": _MARGIN + 60.0, "backward": _MARGIN + 60.0}
    parts = [f'<text x="{_MARGIN}" y="{lanes["forward"] + 18}" class="lane">fw</text>',
             f'<text x="{_MARGIN}" y="{lanes["backward"] + 18}" class="lane">bw</text>']
    centre, bands = [], []
    for item in items:
        x0, y0 = x[item["side"]], lanes[item["side"]]
        x[item["side"]] += width + _GAP
        centre.append((x0 + width / 2, y0))
        parts.extend(_box(item, x0, y0, width, collapse))
        # A band behind each run of one region's nodes, so regions show uncollapsed too.
        if not collapse and item["region"] is not None:
            if bands and bands[-1][:2] == [item["side"], item["region"]] and bands[-1][3] == x0 - width - _GAP:
                bands[-1][3] = x0
            else:
                bands.append([item["side"], item["region"], x0, x0])
    labelled = set()
    for side, region, first, last in bands:
        y0 = lanes[side]
        label = "" if (side, region) in labelled else \
            f'<text x="{first - 3:.1f}" y="{y0 - 7:.1f}" class="small">region {region}</text>'
        labelled.add((side, region))
        parts.insert(0, f'<rect x="{first - 3:.1f}" y="{y0 - 4:.1f}" width="{last - first + width + 6:.1f}" '
                        f'height="{_BOX_H + 8}" class="band"/>{label}')
    right = max(x.values()) + _MARGIN
    cut_y = lanes["forward"] + _BOX_H + _LANE_GAP / 2
    edge_parts = []
    for kind, pairs in (("edge", structure["edges"]), ("cut", structure["cut"])):
        seen = set()
        for a, b in pairs:
            pair = (box_of[a], box_of[b])
            if pair[0] == pair[1] or pair in seen:
                continue
            seen.add(pair)
            (xa, ya), (xb, yb) = centre[pair[0]], centre[pair[1]]
            if kind == "cut":
                edge_parts.append(f'<line x1="{xa:.1f}" y1="{ya + _BOX_H:.1f}" x2="{xb:.1f}" y2="{yb:.1f}" class="cut"/>')
            else:  # an arc above the forward lane, below the backward lane
                bend = -1 if yb == lanes["forward"] else 1
                y_edge = ya if bend < 0 else ya + _BOX_H
                lift = min(60.0, 8 + abs(xb - xa) / 6) * bend
                edge_parts.append(f'<path d="M{xa:.1f},{y_edge:.1f} Q{(xa + xb) / 2:.1f},{y_edge + lift:.1f} '
                                  f'{xb:.1f},{y_edge:.1f}" class="edge"/>')
    line = (f'<line x1="{_MARGIN}" y1="{cut_y:.1f}" x2="{right - _MARGIN:.1f}" y2="{cut_y:.1f}" class="cutline"/>'
            f'<text x="{right - _MARGIN:.1f}" y="{cut_y - 4:.1f}" text-anchor="end" class="small">the cut</text>')
    return edge_parts + [line] + parts, right, lanes["backward"] + _BOX_H + 70 - top


def _box(item: dict, x0: float, y0: float, width: float, collapse: bool) -> list[str]:
    total = sum(item["counts"].values())
    title = escape(_hover(item, collapse))
    parts, offset = [f"<g><title>{title}</title>"], 0.0
    for status in COLORS:  # stripes, in legend order
        count = item["counts"].get(status, 0)
        if count:
            w = max(width * count / total, min(2.0, width / 4))  # a few saved nodes stay visible
            parts.append(f'<rect x="{x0 + offset:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{_BOX_H}" fill="{COLORS[status]}"/>')
            offset += w
    parts.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{width:.1f}" height="{_BOX_H}" class="box"/>')
    if collapse:
        label = f"{'-' if item['region'] is None else 'r' + str(item['region'])}:{total}"
        parts.append(f'<text x="{x0 + width / 2:.1f}" y="{y0 + _BOX_H + 12:.1f}" text-anchor="middle" class="small">{label}</text>')
    parts.append("</g>")
    return parts


def _hover(item: dict, collapse: bool) -> str:
    """What hovering a box shows: where it is, its nodes, ops, bytes and source line."""
    total = sum(item["counts"].values())
    region = "outside checkpoint regions" if item["region"] is None else f"region {item['region']}"
    detail = ", ".join(f"{count} {status}" for status, count in item["counts"].items())
    lines = [f"{item['side']}, {region}: {total} node{'s' if total != 1 else ''} ({detail})",
             f"nodes: {', '.join(item['names'])}{', ...' if total > 3 else ''}"]
    if item["ops"]:
        ops = sorted(item["ops"].items(), key=lambda kv: -kv[1])
        lines.append("ops: " + ", ".join(f"{op} x{n}" if n > 1 else op for op, n in ops[:6])
                     + (", ..." if len(ops) > 6 else ""))
        what = "saved for backward" if collapse else "output"
        if item["bytes"] or not collapse:
            lines.append(f"{what}: {format_bytes(item['bytes'])}")
    if item["source"]:
        lines.append(f"source: {item['source']}")
    return "\n".join(lines)


def _caption(top: float) -> tuple[list[str], float]:
    """Two sentences on the page that say how to read the picture."""
    text = [
        "Look at the red lines first: each one is a value saved for backward, crossing the cut from the "
        "forward lane (fw) to the backward lane (bw); that is the memory kept until the backward.",
        "Each box is a node of the compiled graph; on large graphs a box is a run of nodes: \u201cr0:50\u201d "
        "is region 0 (checkpoint region), 50 nodes; \u201c-:17\u201d is 17 nodes outside any region. "
        "Hover a box for its ops, bytes and source line.",
    ]
    parts = [f'<text x="{_MARGIN}" y="{top + 12 + 16 * k}" class="caption">{escape(t)}</text>' for k, t in enumerate(text)]
    return parts, _MARGIN + 6.0 * max(len(t) for t in text)


def _bars_svg(regions: list[dict[str, Any]], top: float) -> tuple[list[str], float, float]:

    parts = [f'<text x="{_MARGIN}" y="{top + 16}" class="title">saved bytes per region: ckpt vs no checkpointing</text>']
    if not regions:
        parts.append(f'<text x="{_MARGIN}" y="{top + 40}" class="small">no checkpoint regions</text>')
        return parts, 500, 60
    largest = max(max(r["saved_bytes"], r["baseline_saved_bytes"] or 0) for r in regions) or 1
    y, label_w, bar_w = top + 30, 220, 360
    for k, row in enumerate(regions):
        name = "outside regions" if row["region"] is None else f"region {sum(1 for q in regions[:k] if q['region'] is not None)}"
        parts.append(f'<text x="{_MARGIN}" y="{y + 14}" class="small"><title>{escape(row["source"])}</title>{escape(name)}</text>')
        for status, value, dy in (("saved", row["saved_bytes"], 0), ("forward", row["baseline_saved_bytes"], 12)):
            if value is None:
                continue
            w = bar_w * value / largest
            parts.append(f'<rect x="{_MARGIN + label_w - 100}" y="{y + dy}" width="{w:.1f}" height="10" fill="{COLORS[status]}"/>')
            parts.append(f'<text x="{_MARGIN + label_w - 96 + w:.1f}" y="{y + dy + 9}" class="small">{format_bytes(value)}</text>')
        y += 30
    y += 4
    for status, text in (("saved", 'backend="ckpt"'), ("forward", "no checkpointing")):
        parts.append(f'<rect x="{_MARGIN}" y="{y}" width="10" height="10" fill="{COLORS[status]}"/>'
                     f'<text x="{_MARGIN + 14}" y="{y + 9}" class="small">{text}</text>')
        y += 14
    return parts, _MARGIN + label_w + bar_w + 40, y - top + 10


def _legend(top: float) -> tuple[list[str], float]:
    parts, x = [], float(_MARGIN)
    for status, text in _LEGEND.items():
        parts.append(f'<rect x="{x:.0f}" y="{top}" width="10" height="10" fill="{COLORS[status]}"/>'
                     f'<text x="{x + 14:.0f}" y="{top + 9}" class="small">{escape(text)}</text>')
        x += 24 + 6.2 * len(text)
    return parts, x


_STYLE = ("<style>text{font-family:sans-serif;font-size:13px}.small{font-size:10px}.title{font-weight:bold}"
          ".caption{font-size:12px;fill:#222}.lane{font-weight:bold;fill:#555}.box{fill:none;stroke:#333;stroke-width:0.5}"
          ".edge{fill:none;stroke:#999;stroke-width:0.6}.cut{stroke:#d62728;stroke-width:1.2}"
          ".cutline{stroke:#000;stroke-dasharray:6,4}.band{fill:#eeeeee;stroke:#999;stroke-width:0.5}</style>")


def render_svg(report, *, max_nodes: int = 400) -> str:
    """One SVG document: each compiled graph with its cut, then the per-region bar chart."""
    parts, width, y = [_STYLE], 600.0, 10.0
    legend, legend_w = _legend(y)
    caption, caption_w = _caption(y + 20)
    parts += legend + caption
    width, y = max(width, legend_w, caption_w), y + 24 + 40
    for k, graph in enumerate(report.graphs):
        structure = graph.get("graph")
        n = len(structure["nodes"]) if structure else 0
        parts.append(f'<text x="{_MARGIN}" y="{y + 14}" class="title">graph {k}: {n} nodes'
                     f'{", regions collapsed" if n > max_nodes else ""}</text>')
        if not structure:
            y += 30
            continue
        graph_parts, graph_w, graph_h = _graph_svg(structure, y + 10, max_nodes)
        parts += graph_parts
        width, y = max(width, graph_w), y + 10 + graph_h
    bar_parts, bar_w, bar_h = _bars_svg(report.regions, y)
    parts += bar_parts
    width, y = max(width, bar_w), y + bar_h
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{y:.0f}" '
            f'viewBox="0 0 {width:.0f} {y:.0f}">' + "".join(parts) + "</svg>\n")


def render_html(report, *, max_nodes: int = 400) -> str:
    """A self-contained HTML page: the report's table, then :func:`render_svg`."""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ckpt_compile report</title></head>"
            f"<body><pre>{escape(str(report))}</pre>\n<div style=\"overflow-x:auto\">"
            f"{render_svg(report, max_nodes=max_nodes)}</div></body></html>\n")


def _check_report(report: Any, path: Any) -> None:
    if (hasattr(report, "graphs") and hasattr(report, "regions")) or _step_picture.is_step_memory(report):
        return
    if isinstance(report, dict):
        fix = "it is a dict: pass Report.from_dict(that_dict)"
    elif isinstance(report, (str, os.PathLike)) and hasattr(path, "graphs"):
        fix = "the arguments are swapped: write_picture(report, path)"
    else:
        fix = "pass the Report that cc.explain(model, *inputs) returns (or Report.read(path) of a saved one)"
    raise TypeError(f"write_picture(report, path): report must be a ckpt_compile Report or StepMemory, got {type(report).__name__}; {fix}")


def write_picture(report, path: str | os.PathLike, *, max_nodes: int = 400) -> pathlib.Path:
    """Write the picture of ``report`` (a :class:`~ckpt_compile.Report`: the cut; or a
    :class:`~ckpt_compile.StepMemory`: memory over the step, stacked by category, the peak
    marked) to ``path``: ``.svg`` or ``.html`` (SVG inside, with the table); ``.png`` needs
    the optional ``cairosvg`` package (an ImportError says how to get it). Returns the path.

    >>> import pathlib, tempfile, torch, ckpt_compile as cc
    >>> lin = torch.nn.Linear(64, 64)
    >>> report = cc.explain(lambda t: cc.checkpoint(lambda u: lin(u).relu(), t, use_reentrant=False),
    ...                     torch.randn(8, 64), inner="eager")
    >>> path = cc.write_picture(report, pathlib.Path(tempfile.mkdtemp()) / "cut.html")
    >>> path.read_text().startswith("<!DOCTYPE html>")
    True
    """
    _check_report(report, path)
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if _step_picture.is_step_memory(report):
        def svg() -> str:
            return _step_picture.render_step_svg(report.to_dict())

        def html() -> str:
            return _step_picture.render_step_html(report)
    else:
        def svg() -> str:
            return render_svg(report, max_nodes=max_nodes)

        def html() -> str:
            return render_html(report, max_nodes=max_nodes)
    if suffix == ".svg":
        path.write_text(svg())
    elif suffix in (".html", ".htm"):
        path.write_text(html())
    elif suffix == ".png":
        try:
            import cairosvg  # optional extra: imported only when a PNG is asked for
        except ImportError as e:
            raise ImportError(
                f"write_picture({os.fspath(path)!r}): PNG output needs cairosvg; "
                "install it with `pip install cairosvg`, or write a .svg or .html file instead"
            ) from e
        cairosvg.svg2png(bytestring=svg().encode(), write_to=str(path))
    else:
        raise ValueError(f"write_picture: unsupported file type {os.fspath(path)!r}; use .svg, .html or .png")
    return path
