"""The picture: well-formed SVG/HTML, one box per node (or per collapsed run), the cut's
edges, bars proportional to the bytes, and the optional PNG extra failing late."""
from __future__ import annotations

import html
import html.parser
import importlib.util
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn

import ckpt_compile as cc
from ckpt_compile.diagnostics._picture import COLORS, render_svg, write_picture
from ckpt_compile.diagnostics._report import Report

SVG = "{http://www.w3.org/2000/svg}"


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = cc.checkpoint(lambda t: self.l2(self.l1(t).relu()).relu(), x, use_reentrant=False)
        return self.l3(h).sin().sum()


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    return cc.explain(Two(), torch.randn(32, 64), inner="eager")


def _boxes(root):
    return [g for g in root.iter(f"{SVG}g") if g.find(f"{SVG}title") is not None and g.find(f"{SVG}rect") is not None]


def test_svg_is_well_formed_with_one_box_per_node(report, tmp_path):
    path = write_picture(report, tmp_path / "cut.svg")
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    (graph,) = report.graphs
    boxes = _boxes(root)
    assert len(boxes) == report.forward_nodes + report.backward_nodes == len(graph["graph"]["nodes"])
    # Each box is filled with its node's colour; the statuses match the report's counts.
    fills = [b.findall(f"{SVG}rect")[0].get("fill") for b in boxes]
    assert fills.count(COLORS["recomputed"]) == report.recomputed_nodes
    assert fills.count(COLORS["saved"]) == report.saved_tensors
    # The cut: one red line per (saved value, backward reader) pair.
    cut = [e for e in root.iter(f"{SVG}line") if e.get("class") == "cut"]
    assert len(cut) == len({tuple(p) for p in graph["graph"]["cut"]}) > 0


def test_bars_are_proportional_to_bytes(report):
    root = ET.fromstring(render_svg(report))
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("height") == "10" and r.get("width") not in ("10",)]
    (row,) = [r for r in report.regions if r["region"] is not None]
    widths = {r.get("fill"): float(r.get("width")) for r in bars[:2]}
    ours, base = widths[COLORS["saved"]], widths[COLORS["forward"]]
    assert ours / base == pytest.approx(row["saved_bytes"] / row["baseline_saved_bytes"], rel=1e-2)


def _synthetic(n_nodes: int, n_regions: int) -> Report:
    """A forward chain of ``n_nodes`` ops in ``n_regions`` regions (gaps of 10 plain ops
    between them), every region output saved, and a backward of the same length."""
    nodes, edges, cut = [], [], []
    per_region = n_nodes // n_regions - 10
    for k in range(n_nodes):
        slot = k % (per_region + 10)
        region = k // (per_region + 10) if slot < per_region else None
        status = "saved" if slot == per_region - 1 else "forward"
        nodes.append([f"f{k}", "forward", status, region])
        if k:
            edges.append([k - 1, k])
    for k in range(n_nodes):
        nodes.append([f"b{k}", "backward", "recomputed" if k % 7 == 0 else "backward", None])
        if k:
            edges.append([n_nodes + k - 1, n_nodes + k])
        if nodes[k][2] == "saved":
            cut.append([k, n_nodes + k])
    figures = dict.fromkeys(("forward_nodes", "backward_nodes", "saved_tensors", "saved_bytes", "recomputed_nodes",
                             "recompute_flops", "forward_flops", "offloaded_nodes"), 0)
    graph = {**figures, "saved_bytes_expr": None, "regions": [], "baseline": None,
             "graph": {"nodes": nodes, "edges": edges, "cut": cut}}
    return Report.from_dict({"graphs": [graph]})


def test_big_graphs_collapse_each_region():
    report = _synthetic(10_000, 50)
    text = render_svg(report)
    root = ET.fromstring(text)
    # Forward: 50 regions and 50 gaps; backward: one box (no regions there).
    assert len(_boxes(root)) == 50 + 50 + 1
    assert len(text) < 200_000
    cut = [e for e in root.iter(f"{SVG}line") if e.get("class") == "cut"]
    assert len(cut) == 50  # one per region box, all into the single backward box


def test_small_graphs_are_not_collapsed():
    report = _synthetic(200, 4)
    assert len(_boxes(ET.fromstring(render_svg(report)))) == 400


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "rect", "line", "path"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("rect", "line", "path"):
            return
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_html_is_self_contained_and_balanced(report, tmp_path):
    path = write_picture(report, tmp_path / "cut.html")
    text = path.read_text()
    parser = _Tags()
    parser.feed(text)
    assert not parser.errors and not parser.stack
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert report.summary() in html.unescape(text)


def test_png_needs_an_extra_with_an_install_hint(report, tmp_path):
    if importlib.util.find_spec("cairosvg") is not None:
        pytest.skip("cairosvg is installed")
    with pytest.raises(ImportError, match="pip install cairosvg") as info:
        write_picture(report, tmp_path / "cut.png")
    assert isinstance(info.value.__cause__, ImportError)


def test_unknown_file_type_is_an_error(report, tmp_path):
    with pytest.raises(ValueError, match=r"unsupported file type .*cut.pdf.*use .svg, .html or .png"):
        write_picture(report, tmp_path / "cut.pdf")


def test_the_page_explains_its_boxes_and_each_box_says_what_it_holds(report):
    # Issue 22: the r0:6 / -:5 labels are explained on the page, the red lines are named as
    # what to look at first, and hovering a box shows its ops, bytes and source line.
    root = ET.fromstring(render_svg(report, max_nodes=10))
    captions = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "caption"]
    assert any(c.startswith("Look at the red lines first") for c in captions), captions
    assert any("\u201cr0:50\u201d is region 0 (checkpoint region), 50 nodes" in c for c in captions), captions
    labels = {t.text for t in root.iter(f"{SVG}text") if t.get("class") == "small"}
    hovers = {b.find(f"{SVG}title").text for b in _boxes(root)}
    (region0,) = [h for h in hovers if h.startswith("forward, region 0:")]
    n = int(region0.split(": ")[1].split(" ")[0])
    assert f"r0:{n}" in labels
    assert "ops: aten.t.default x2, aten.addmm.default x2, aten.relu.default x2" in region0
    assert "source: test_picture.py:27 in" in region0
    # The box holding the saved value says how many bytes it keeps for the backward.
    saved = report.saved_values[0]
    assert any(f"saved for backward: {saved['bytes'] / 1024:.2f} KiB" in h for h in hovers), hovers
    # Uncollapsed, one box per node: its op and output bytes.
    full = {b.find(f"{SVG}title").text for b in _boxes(ET.fromstring(render_svg(report)))}
    assert any("ops: aten.relu.default\noutput: 8.00 KiB" in h for h in full), full

