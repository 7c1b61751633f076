"""The graph-size report of ``backend="ckpt"``: data, JSON, and an aligned table.

:func:`graph_report` describes one compiled partition as a plain dict (the backend calls it
for every graph it partitions); :class:`Report` gathers those dicts, sums them, and prints
them. ``to_dict()`` is JSON; :meth:`Report.from_dict` reads it back.

>>> report = Report.from_dict({"graphs": [{
...     "forward_nodes": 10, "backward_nodes": 20, "saved_tensors": 1, "saved_bytes": 2**20,
...     "saved_bytes_expr": None, "recomputed_nodes": 4, "recompute_flops": 500,
...     "forward_flops": 2000, "offloaded_nodes": 0, "regions": [], "graph": None,
...     "baseline": {"forward_nodes": 10, "backward_nodes": 16, "saved_tensors": 5,
...                  "saved_bytes": 5 * 2**20, "saved_bytes_expr": None,
...                  "recomputed_nodes": 0, "recompute_flops": 0, "forward_flops": 2000}}]})
>>> report.summary()
'saved 5.00 MiB -> 1.00 MiB (-80%), +25% forward FLOPs recomputed'
>>> Report.from_dict(report.to_dict()) == report
True
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable

import torch.fx as fx

from ckpt_compile.diagnostics import _graph_stats
from ckpt_compile.diagnostics._graph_stats import format_bytes

__all__ = ["Report", "graph_report"]

# The figures docs/api.md promises at the top level, in each region row and in the baseline.
FIGURES = ("forward_nodes", "backward_nodes", "saved_tensors", "saved_bytes",
           "recomputed_nodes", "recompute_flops")
# Extra figures summed like the others: the summary line's denominators.
_EXTRA = ("forward_flops", "offloaded_nodes")
_ROWS = ("regions", "graph", "baseline")


# ---------------------------------------------------------------- one graph


def graph_report(joint_module: fx.GraphModule, fw_module: fx.GraphModule, bw_module: fx.GraphModule,
                 *, num_fwd_outputs: int, baseline_fn: Callable | None = None) -> dict[str, Any]:
    """Figures of one partition of ``joint_module`` into ``fw_module`` / ``bw_module``.

    ``baseline_fn()``, if given, returns the (forward, backward) pair of the same joint graph
    partitioned with no checkpointing (see ``_graph_stats.baseline_partition``); its
    figures become ``"baseline"`` and the per-region bytes saved without checkpointing.
    """
    figures = _graph_stats.partition_figures(fw_module, bw_module, num_fwd_outputs)
    # Regions are numbered 0, 1, ... in program order: ac_graph_id is a process-wide
    # counter, different at every compile of the same model.
    ids = {n.name: n.meta["ac_graph_id"] for n in joint_module.graph.nodes
           if isinstance(n.meta.get("ac_graph_id"), int)}
    ordinal = {region: k for k, region in enumerate(sorted(set(ids.values())))}
    region_of = {name: ordinal[region] for name, region in ids.items()}
    base_fw = None
    if baseline_fn is not None:
        base_fw, base_bw = baseline_fn()
        figures["baseline"] = {k: v for k, v in _graph_stats.partition_figures(base_fw, base_bw, num_fwd_outputs).items()
                               if k != "offloaded_nodes"}
    else:
        figures["baseline"] = None
    figures["regions"] = _region_rows(joint_module, fw_module, bw_module, num_fwd_outputs, region_of,
                                      base_fw)

    figures["graph"] = _graph_stats.graph_structure(fw_module, bw_module, num_fwd_outputs, region_of)
    figures["saved_values"] = _saved_values(fw_module, num_fwd_outputs, region_of)
    return figures


def _saved_values(fw_module, num_fwd_outputs, region_of) -> list[dict[str, Any]]:
    """One row per saved activation: name, region (ordinal or None), bytes, and why the
    partitioner saved it (``ckpt_compile.passes.saving.WHY``; "-" for a partition that
    did not say, e.g. another partitioner's)."""
    return [
        {"name": n.name, "region": region_of.get(n.name), "bytes": _graph_stats.node_bytes(n)[0],
         "why": n.meta.get("ckpt_saved_why", "-")}
        for n in _graph_stats.saved_nodes(fw_module, num_fwd_outputs)
    ]


def _region_rows(joint_module, fw_module, bw_module, num_fwd_outputs, region_of, base_fw) -> list[dict]:
    from ckpt_compile.passes.problem import node_flops

    def by_region(nodes):
        groups: dict[Any, list[fx.Node]] = {}
        for n in nodes:
            groups.setdefault(region_of.get(n.name), []).append(n)
        return groups

    saved = by_region(_graph_stats.saved_nodes(fw_module, num_fwd_outputs))
    base_saved = by_region(_graph_stats.saved_nodes(base_fw, num_fwd_outputs)) if base_fw is not None else {}
    recomputed = by_region(_graph_stats.recomputed_nodes(fw_module, bw_module))
    forward = by_region(_graph_stats.calls(fw_module))
    backward = by_region(_graph_stats.calls(bw_module))
    joint = by_region(n for n in joint_module.graph.nodes if n.name in region_of)
    rows = []
    # Regions in program order (ac_graph_id is a process-wide counter), then the rest.
    for region in [*sorted(r for r in joint if r is not None), None]:
        saved_bytes = sum(_graph_stats.node_bytes(n)[0] for n in saved.get(region, ()))
        base_bytes = sum(_graph_stats.node_bytes(n)[0] for n in base_saved.get(region, ()))
        row = {
            "region": region,
            "source": _source(joint.get(region, ())) if region is not None else "(outside checkpoint regions)",
            "forward_nodes": len(forward.get(region, ())),
            "backward_nodes": len(backward.get(region, ())),
            "saved_tensors": len(saved.get(region, ())),
            "saved_bytes": saved_bytes,
            "recomputed_nodes": len(recomputed.get(region, ())),
            "recompute_flops": sum(node_flops(n) for n in recomputed.get(region, ())),
            "baseline_saved_bytes": base_bytes if base_fw is not None else None,
            "bytes_avoided": base_bytes - saved_bytes if base_fw is not None else None,
        }
        if region is None and not (row["saved_bytes"] or row["baseline_saved_bytes"] or row["recomputed_nodes"]):
            continue
        rows.append(row)
    return rows


def _source(nodes) -> str:
    """The user's line that entered a region, from the frames shared by the stack traces
    of all its nodes."""
    traces = [_frames(n.meta.get("stack_trace") or "") for n in nodes]
    traces = [t for t in traces if t]
    if not traces:
        return "(no source line recorded)"
    common = traces[0]
    for t in traces[1:]:
        k = 0
        while k < min(len(common), len(t)) and common[k] == t[k]:
            k += 1
        common = common[:k]
    common = common or traces[0][:1]
    # The checkpoint call: a shared user frame that names it, else the user frame right
    # before the first library frame (our checkpoint), else the innermost user frame (an
    # annotate() block).
    calls: dict[tuple[str, str], tuple] = {}
    for f in common:  # a lambda's frame repeats its caller's line: keep the caller's
        if not _is_library(f[0]) and "checkpoint" in f[3]:
            calls.setdefault(f[:2], f)
    calls = list(calls.values())
    chosen = calls[-1] if calls else next((common[k - 1] for k in range(1, len(common))
                                           if _is_library(common[k][0]) and not _is_library(common[k - 1][0])), None)
    if chosen is None:
        chosen = ([f for f in common if not _is_library(f[0])] or common)[-1]
    path, line, func, code = chosen
    return f"{os.path.basename(path)}:{line} in {func}: {code}"


def _frames(trace: str) -> list[tuple[str, str, str, str]]:
    lines = trace.splitlines()
    frames = []
    for k, line in enumerate(lines):
        text = line.strip()
        if not text.startswith('File "'):
            continue
        path, _, rest = text[len('File "'):].partition('", line ')
        number, _, func = rest.partition(", in ")
        code = lines[k + 1].strip() if k + 1 < len(lines) else ""
        frames.append((path, number, func, code))
    return frames


def _is_library(path: str) -> bool:
    # torch and this package's engine; the demo (ckpt_compile/cli/_demo.py) is user code.
    parts = pathlib.PurePath(path).parts
    return "torch" in parts or ("ckpt_compile" in parts and parts[-1] != "_demo.py")


# ---------------------------------------------------------------- the report


@dataclasses.dataclass(frozen=True)
class Report:
    """What ``backend="ckpt"`` did to a model: one dict per compiled graph (see
    :func:`graph_report`), summed. Totals read as attributes (``report.saved_bytes``);
    ``report.baseline`` holds the same figures for the model without checkpointing.

    ``cc.explain()`` returns one; ``Report.read(path)`` / ``Report.from_dict`` load the JSON
    that ``options={"report": path}`` or ``report.write(path)`` wrote.

    >>> import torch, ckpt_compile as cc
    >>> lin = torch.nn.Linear(512, 512)
    >>> region = lambda t: cc.checkpoint(lambda u: lin(u).relu().sin(), t, use_reentrant=False)
    >>> report = cc.explain(region, torch.randn(512, 512), inner="eager")
    >>> report.saved_bytes, report.baseline["saved_bytes"]   # relu's 1 MiB only without the region
    (0, 1048576)
    >>> cc.Report.from_dict(report.to_dict()) == report
    True
    """

    graphs: tuple[dict[str, Any], ...]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name in FIGURES or name in _EXTRA:
            return sum(g[name] for g in self.graphs)
        raise AttributeError(f"'Report' object has no attribute {name!r}")

    @property
    def baseline(self) -> dict[str, int] | None:
        """Totals of the no-checkpoint partition, or None if it was not computed."""
        if not self.graphs or any(g.get("baseline") is None for g in self.graphs):
            return None
        return {k: sum(g["baseline"][k] for g in self.graphs) for k in (*FIGURES, "forward_flops")}

    @property
    def regions(self) -> list[dict[str, Any]]:
        return [row for g in self.graphs for row in g["regions"]]

    @property
    def saved_values(self) -> list[dict[str, Any]]:
        """Every saved activation with why it is saved (``name``, ``region``, ``bytes``,
        ``why``); empty for a report written before this was recorded."""
        return [row for g in self.graphs for row in g.get("saved_values") or ()]

    @property
    def saved_by_reason(self) -> dict[str, dict[str, int]]:
        """``{why: {"values": n, "bytes": b}}`` over :attr:`saved_values`, largest first."""
        out: dict[str, dict[str, int]] = {}
        for row in self.saved_values:
            entry = out.setdefault(row["why"], {"values": 0, "bytes": 0})
            entry["values"] += 1
            entry["bytes"] += row["bytes"]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the totals of docs/api.md, ``regions``, ``baseline``, then per graph."""
        return {
            **{k: getattr(self, k) for k in (*FIGURES, *_EXTRA)},
            "saved_bytes_expr": _sum_exprs(g["saved_bytes_expr"] or str(g["saved_bytes"]) for g in self.graphs)
            if any(g["saved_bytes_expr"] for g in self.graphs) else None,
            "regions": self.regions,
            "saved_by_reason": self.saved_by_reason,
            "baseline": self.baseline,
            "options": dict(self.options),
            "graphs": [dict(g) for g in self.graphs],
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> "Report":
        """Read back ``to_dict()`` output (or the JSON the backend's ``report`` path holds)."""
        if not isinstance(document, dict) or not isinstance(document.get("graphs"), list):
            raise ValueError(
                "Report.from_dict: expected the dict of Report.to_dict() (with a 'graphs' list), "
                f"got {type(document).__name__}" + (f" with keys {sorted(document)}" if isinstance(document, dict) else "")
            )
        graphs = []
        for k, graph in enumerate(document["graphs"]):
            missing = [key for key in (*FIGURES, *_EXTRA, "saved_bytes_expr", *_ROWS) if key not in graph]
            if missing:
                raise ValueError(f"Report.from_dict: graph {k} lacks the keys {missing}")
            graphs.append(dict(graph))
        return cls(tuple(graphs), dict(document.get("options") or {}))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Report":
        """The report the backend wrote to ``options={"report": path}``."""
        try:
            return cls.from_dict(json.loads(pathlib.Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"Report.read({os.fspath(path)!r}): not a ckpt_compile report ({e})") from e

    def write(self, path: str | os.PathLike) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    def summary(self) -> str:
        """One line: saved bytes without -> with checkpointing, and the recompute cost."""
        base = self.baseline
        flops = self.forward_flops
        cost = f"+{self.recompute_flops / flops:.0%} forward FLOPs recomputed" if flops else \
            f"{self.recompute_flops} FLOPs recomputed"
        if base is None:
            return f"saved {format_bytes(self.saved_bytes)}, {cost}"
        change = f" ({(self.saved_bytes - base['saved_bytes']) / base['saved_bytes']:+.0%})" if base["saved_bytes"] else ""
        return f"saved {format_bytes(base['saved_bytes'])} -> {format_bytes(self.saved_bytes)}{change}, {cost}"

    def __str__(self) -> str:
        return "\n".join([*_figures_table(self), "", *_regions_table(self.regions), *_why_table(self),
                          self.summary()])


def _figures_table(report: Report) -> list[str]:
    base = report.baseline
    n_regions = sum(1 for r in report.regions if r["region"] is not None)
    graphs = len(report.graphs)
    head = (f'backend="ckpt": {graphs} graph{"s" * (graphs != 1)}, {n_regions} checkpoint '
            f'region{"s" * (n_regions != 1)}, memory_budget {report.options.get("memory_budget", 1.0)}')
    rows = [("", "ckpt", "no checkpointing")]
    for key in FIGURES:
        ours = getattr(report, key)
        theirs = base[key] if base is not None else None
        show = format_bytes if key == "saved_bytes" else _format_count
        rows.append((key.replace("_", " ").replace("flops", "FLOPs"), show(ours),
                     "-" if theirs is None else show(theirs)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head] + [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    expr = report.to_dict()["saved_bytes_expr"]
    if expr is not None:
        # dynamic=True: the bytes above are at the example inputs' sizes.
        lines.append(f"saved bytes as sizes vary: {expr} (= {report.saved_bytes} at the example inputs)")
    return lines


def _regions_table(regions: list[dict[str, Any]]) -> list[str]:
    if not regions:
        return ["no checkpoint regions"]
    rows = [("region", "saved", "avoided", "recomputed ops", "recompute FLOPs", "source")]
    for k, r in enumerate(regions):
        avoided = r["bytes_avoided"]
        rows.append((
            "-" if r["region"] is None else str(sum(1 for q in regions[:k] if q["region"] is not None)),
            format_bytes(r["saved_bytes"]), "-" if avoided is None else format_bytes(avoided),
            str(r["recomputed_nodes"]), _format_count(r["recompute_flops"]), _clip(r["source"], 60),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return [
        "  ".join(f"{cell:>{w}}" for cell, w in zip(row[:5], widths)) + "  " + row[5]
        for row in rows
    ]


def _why_table(report: Report) -> list[str]:
    """Saved bytes grouped by the reason each value is saved (absent from older reports)."""
    groups = report.saved_by_reason
    if not groups:
        return []
    rows = [("why saved", "values", "bytes")]
    rows += [(why, str(g["values"]), format_bytes(g["bytes"])) for why, g in groups.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [""] + [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _format_count(n: int) -> str:
    for unit, scale in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _sum_exprs(exprs) -> str:
    import sympy

    return str(sympy.Add(*(sympy.sympify(e) for e in exprs)))
