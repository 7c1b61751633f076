"""cc.explain: figures checked against independent counts on the same model.

- saved bytes: a saved-tensors hook on the compiled model's forward (distinct storages,
  parameters and inputs excluded), with and without checkpoint regions;
- node counts: the forward and backward graphs AOTAutograd hands to its compilers,
  captured with our partitioner but without the backend or the report code;
- recompute FLOPs: the closed form of the recomputed matmul and pointwise ops.
Compiles are tiny and shared through module-scoped fixtures.
"""
from __future__ import annotations

import json
import logging

import pytest
import sympy
import torch
import torch.nn as nn
import torch.utils.checkpoint as tuc

import ckpt_compile as cc
from ckpt_compile.diagnostics._report import Report

N, D = 1024, 256  # a (1024, 256) float32 activation is exactly 1 MiB
MIB = 2**20


class Net(nn.Module):
    """Two regions (ours, then torch's) between plain ops; no multi-output ops."""

    def __init__(self, regions: bool = True):
        super().__init__()
        self.a1, self.a2, self.b1, self.b2 = (nn.Linear(D, D) for _ in range(4))
        self.regions = regions

    def block1(self, x):
        return self.a2(self.a1(x).relu()).relu()

    def block2(self, x):
        return self.b2(self.b1(x).tanh()).tanh()

    def forward(self, x):
        if self.regions:
            h = cc.checkpoint(self.block1, x, use_reentrant=False)
            h = tuc.checkpoint(self.block2, h, use_reentrant=False)
        else:
            h = self.block2(self.block1(x))
        return (h * h).sum()


def _x():
    return torch.randn(N, D, generator=torch.Generator().manual_seed(0))


def _measure(model):
    """(saved bytes by a hook, forward graph nodes, executed backward ops) of ``model``
    compiled with the backend's partitioner, its graphs captured by AOTAutograd's own
    compiler hooks rather than read from the report."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from ckpt_compile import passes

    graphs = {}

    def capture(kind):
        def compiler(gm, _inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def partition(joint, inputs, **kwargs):
        return passes.partition(passes.tag_recompute(joint), inputs, **kwargs)

    backend = aot_autograd(fw_compiler=capture("fw"), bw_compiler=capture("bw"), partition_fn=partition)
    fn = torch.compile(model, backend=backend, fullgraph=True)
    x = _x()
    fn(x)  # compile outside the counters
    keep = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in keep:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x)
    loss.backward()
    fw_nodes = sum(1 for n in graphs["fw"].graph.nodes if n.op == "call_function")
    bw_nodes = sum(1 for n in graphs["bw"].graph.nodes if n.op == "call_function")
    return sum(storages.values()), fw_nodes, bw_nodes


@pytest.fixture(scope="module")
def explained():
    torch.manual_seed(0)
    model = Net()
    report = cc.explain(model, _x(), inner="eager")
    return model, report


@pytest.fixture(scope="module")
def measured(explained):
    model, _ = explained
    plain = Net(regions=False)
    plain.load_state_dict(model.state_dict())
    return _measure(model), _measure(plain)


def test_saved_bytes_match_a_saved_tensors_hook(explained, measured):
    _, report = explained
    (ours, _, _), (plain, _, _) = measured
    assert report.saved_bytes == ours
    assert report.baseline["saved_bytes"] == plain
    # Closed form: with regions, block 1's output (1 MiB: block 2's input, a boundary); the
    # loss's h is recomputed with block 2, from that boundary, as torch.compile does. Without
    # regions, each block's output and inner relu/tanh (input of its 2nd matmul).
    assert (ours, plain) == (MIB, 4 * MIB)
    assert (report.saved_tensors, report.baseline["saved_tensors"]) == (1, 4)


def test_node_counts_match_the_graphs(explained, measured):
    _, report = explained
    (_, fwd, bwd), (_, base_fwd, base_bwd) = measured
    assert (report.forward_nodes, report.backward_nodes) == (fwd, bwd)
    assert (report.baseline["forward_nodes"], report.baseline["backward_nodes"]) == (base_fwd, base_bwd)


def test_recomputed_ops_and_flops_closed_form(explained):
    _, report = explained
    rows = [r for r in report.regions if r["region"] is not None]
    assert [r["region"] for r in rows] == [0, 1]
    # Region 0 recomputes t, addmm, relu, t (its output is saved): the first matmul,
    # 2*N*D*D FLOPs (bias included), and one FLOP per element of the activation. Region 1
    # (the last, read by the loss only) also recomputes its output: t, addmm, tanh twice.
    assert [r["recomputed_nodes"] for r in rows] == [4, 6]
    assert [r["recompute_flops"] for r in rows] == [2 * N * D * D + N * D, 2 * (2 * N * D * D + N * D)]
    assert report.recompute_flops == sum(r["recompute_flops"] for r in report.regions)
    assert report.recomputed_nodes == sum(r["recomputed_nodes"] for r in report.regions)


def test_region_rows_name_the_users_line_and_bytes(explained):
    _, report = explained
    rows = [r for r in report.regions if r["region"] is not None]
    assert rows[0]["source"].startswith("test_explain.py:") and "cc.checkpoint(self.block1" in rows[0]["source"]
    assert "tuc.checkpoint(self.block2" in rows[1]["source"]
    assert [(r["saved_bytes"], r["baseline_saved_bytes"], r["bytes_avoided"]) for r in rows] == [
        (MIB, 2 * MIB, MIB), (0, 2 * MIB, 2 * MIB)]
    assert sum(r["saved_bytes"] for r in report.regions) == report.saved_bytes
    assert sum(r["baseline_saved_bytes"] for r in report.regions) == report.baseline["saved_bytes"]


def test_to_dict_has_the_api_keys_and_is_json(explained):
    _, report = explained
    d = json.loads(json.dumps(report.to_dict()))
    keys = ("forward_nodes", "backward_nodes", "saved_tensors", "saved_bytes", "recomputed_nodes", "recompute_flops")
    for key in keys:
        assert isinstance(d[key], int) and isinstance(d["baseline"][key], int)
        for row in d["regions"]:
            assert isinstance(row[key], int)
    assert Report.from_dict(d) == report


def test_report_option_path_matches_explain(explained, tmp_path):
    model, report = explained
    path = tmp_path / "r.json"
    fn = torch.compile(model, backend="ckpt", options={"inner": "eager", "report": str(path)}, fullgraph=True)
    fn(_x())
    from_backend = Report.read(path)
    assert from_backend.to_dict() == report.to_dict()


def test_report_true_logs_the_table(explained, caplog):
    model, report = explained
    fn = torch.compile(model, backend="ckpt", options={"inner": "eager", "report": True}, fullgraph=True)
    with caplog.at_level(logging.INFO, logger="ckpt_compile"):
        fn(_x())
    messages = [r.getMessage() for r in caplog.records if r.name == "ckpt_compile"]
    assert str(report) in messages


def test_dynamic_sizes_print_as_expression_and_value():
    torch.manual_seed(0)
    model = Net()
    report = cc.explain(model, torch.randn(48, D), inner="eager", dynamic=True)
    expr = sympy.sympify(report.to_dict()["saved_bytes_expr"])
    (symbol,) = expr.free_symbols
    assert expr.subs(symbol, 48) == report.saved_bytes == 48 * D * 4
    assert f"= {report.saved_bytes} at the example inputs" in str(report)


def test_budget_option_saves_less_and_recomputes_more(explained):
    model, _ = explained
    plain = Net(regions=False)
    plain.load_state_dict(model.state_dict())
    full = cc.explain(plain, _x(), inner="eager")
    half = cc.explain(plain, _x(), inner="eager", memory_budget=0.5)
    assert half.saved_bytes <= full.saved_bytes // 2
    assert half.recompute_flops > full.recompute_flops
    assert half.to_dict()["options"]["memory_budget"] == 0.5


@pytest.mark.parametrize("options, message", [
    ({"memory_budget": 0.0}, "memory_budget"),
    ({"memory_budget": 1.5}, "memory_budget"),
    ({"budget": 0.5}, "unknown option 'budget'"),
])
def test_bad_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        cc.explain(Net(), _x(), **options)


def test_no_backward_is_a_clear_error():
    with pytest.raises(ValueError, match="no backward graph"):
        cc.explain(lambda x: x.sin().cos(), torch.randn(4), inner="eager")


def test_not_callable_is_a_type_error():
    with pytest.raises(TypeError, match="expected an nn.Module or a function, got int"):
        cc.explain(3, torch.randn(4))


# ---------------------------------------------------------------- report=path: append or replace

def _compile_into(path, **options):
    torch._dynamo.reset()  # every call compiles (Dynamo would reuse the code of the same lambda)
    w = torch.ones(64, 64, requires_grad=True)
    fn = torch.compile(lambda x: (x @ w).relu().sum(), backend="ckpt",
                       options={"inner": "eager", "report": str(path), **options}, fullgraph=True)
    fn(torch.ones(64, 64))
    return json.loads(path.read_text())


def test_report_path_appends_to_its_own_report_and_replaces_one_of_other_options(tmp_path):
    # The rule in backend()'s docstring: a report of the same options gains the new graphs
    # (a second compile, a second run); a report of other options is replaced.
    path = tmp_path / "r.json"
    first = _compile_into(path)
    assert len(first["graphs"]) == 1
    second = _compile_into(path)
    assert second["graphs"] == first["graphs"] * 2
    other = _compile_into(path, memory_budget=0.5)
    assert other["options"] == {"memory_budget": 0.5, "inner": "eager"} and len(other["graphs"]) == 1


def test_report_path_never_overwrites_a_file_it_did_not_write(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text('{"mine": true}\n')
    with pytest.raises(Exception, match="names an existing file that is not a report this backend wrote"):
        _compile_into(path)
    assert path.read_text() == '{"mine": true}\n'


def test_explain_report_path_replaces_the_file(explained, tmp_path):
    model, report = explained
    path = tmp_path / "r.json"
    _compile_into(path)
    _compile_into(path)
    assert cc.explain(model, _x(), inner="eager", report=str(path)).to_dict() == Report.read(path).to_dict()
    assert len(Report.read(path).graphs) == len(report.graphs)
