"""The Report object (table, summary, JSON round trip) and the eager graph-size figures.

The table layout is pinned with expecttest on a tiny compiled model; eager figures are
compared with ``torch.utils.checkpoint`` on the same inputs and with closed forms.
"""
from __future__ import annotations

import doctest
import functools
import importlib
import json

import expecttest
import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as tuc

import ckpt_compile as cc
from ckpt_compile.diagnostics._graph_stats import autograd_nodes, saved_tensor_bytes
from ckpt_compile.diagnostics._report import Report

MIB = 2**20


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = cc.checkpoint(lambda t: self.l2(self.l1(t).relu()).relu(), x, use_reentrant=False)
        return (h * h).sum()


@pytest.fixture(scope="module")
def tiny_report():
    torch.manual_seed(0)
    return cc.explain(Tiny(), torch.randn(32, 64), inner="eager")


class TestTable(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _report(self, tiny_report):
        self.report = tiny_report

    def test_table_layout(self):
        self.assertExpectedInline(str(self.report), """\
backend="ckpt": 1 graph, 1 checkpoint region, memory_budget 1.0
                    ckpt  no checkpointing
forward nodes          8                 8
backward nodes        30                25
saved tensors          0                 2
saved bytes          0 B         16.00 KiB
recomputed nodes       6                 1
recompute FLOPs   528.4k                 0

region  saved    avoided  recomputed ops  recompute FLOPs  source
     0    0 B  16.00 KiB               6           528.4k  test_report.py:32 in forward: h = cc.checkpoint(lambda t:...
saved 16.00 KiB -> 0 B (-100%), +100% forward FLOPs recomputed""")

    def test_summary_is_the_last_line(self):
        self.assertEqual(str(self.report).splitlines()[-1], self.report.summary())


def test_json_round_trip(tiny_report):
    text = json.dumps(tiny_report.to_dict())
    again = Report.from_dict(json.loads(text))
    assert again == tiny_report and again.to_dict() == tiny_report.to_dict()
    assert str(again) == str(tiny_report)


def test_write_and_read(tiny_report, tmp_path):
    tiny_report.write(tmp_path / "r.json")
    assert Report.read(tmp_path / "r.json") == tiny_report


def test_totals_are_sums_over_graphs(tiny_report):
    two = Report.from_dict({**tiny_report.to_dict(), "graphs": tiny_report.to_dict()["graphs"] * 2})
    assert two.saved_bytes == 2 * tiny_report.saved_bytes
    assert two.baseline["forward_nodes"] == 2 * tiny_report.baseline["forward_nodes"]
    assert len(two.regions) == 2 * len(tiny_report.regions)
    assert str(two).startswith('backend="ckpt": 2 graphs, 2 checkpoint regions')


@pytest.mark.parametrize("document, message", [
    ([], "expected the dict of Report.to_dict"),
    ({"saved_bytes": 3}, r"with keys \['saved_bytes'\]"),
    ({"graphs": [{"saved_bytes": 3}]}, "graph 0 lacks the keys"),
])
def test_from_dict_rejects_other_data(document, message):
    with pytest.raises(ValueError, match=message):
        Report.from_dict(document)


def test_read_names_the_file(tmp_path):
    (tmp_path / "x.json").write_text("not json")
    with pytest.raises(ValueError, match=r"Report.read\('.*x.json'\): not a ckpt_compile report") as info:
        Report.read(tmp_path / "x.json")
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("name", ["ckpt_compile.diagnostics._report", "ckpt_compile.diagnostics._graph_stats",
                                  "ckpt_compile.diagnostics._picture", "ckpt_compile.compile._explain"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# ---------------------------------------------------------------- eager figures


def _chain(x, k=3):
    for _ in range(k):
        x = x.sin()
    return x


def test_autograd_nodes_closed_form_and_torch_parity():
    x = torch.randn(512, 512, requires_grad=True)
    assert autograd_nodes(_chain(x)) == 3 + 1  # three SinBackward, one AccumulateGrad
    assert autograd_nodes(x) == 0
    ours = cc.checkpoint(_chain, x, use_reentrant=False)
    theirs = tuc.checkpoint(_chain, x, use_reentrant=False)
    assert autograd_nodes(ours) == autograd_nodes(theirs)
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        autograd_nodes([ours])


def test_saved_bytes_closed_form_and_torch_parity():
    x = torch.randn(512, 512, requires_grad=True)  # 1 MiB
    assert saved_tensor_bytes(lambda: _chain(x)) == 3 * MIB  # each sin saves its input
    ours = saved_tensor_bytes(lambda: cc.checkpoint(_chain, x, use_reentrant=False))
    theirs = saved_tensor_bytes(lambda: tuc.checkpoint(_chain, x, use_reentrant=False))
    assert ours == theirs == MIB  # the region's input


def test_saved_bytes_count_the_selective_cache():
    # The policy saves the sins' outputs in the cache, out of autograd's sight: the hook
    # alone would see only the region's input.
    x = torch.randn(512, 512, requires_grad=True)
    context = functools.partial(cc.create_selective_checkpoint_contexts, [torch.ops.aten.sin.default])
    got = saved_tensor_bytes(lambda: cc.checkpoint(_chain, x, use_reentrant=False, context_fn=context))
    assert got == MIB + 3 * MIB
