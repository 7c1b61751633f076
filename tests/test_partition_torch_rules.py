"""Rules torch's own partitioner follows that ours must follow too (issue 10, points 5, 6c).

- An input whose in-place change AOTAutograd replays after the forward (torch 2.15 marks it
  ``meta["aot_runtime_epilogue_input_mutation"]``; older releases say it through the output
  descriptors) is never saved: saving it hands the backward the mutated tensor.
- Forward inputs carry ``meta["is_static_input"]`` (True for parameters) as torch stamps it.
- The backward takes the BackwardState (tensor hooks under compiled autograd) last, after
  the tangents, as torch's backward graphs do.

Hand-built joint graphs run on every torch; the compiled tests compare ``backend="ckpt"``
with stock ``torch.compile`` on the same function.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.fx.experimental.proxy_tensor import make_fx

import ckpt_compile as cc
from ckpt_compile.passes import partition
from ckpt_compile.passes.problem import replayed_input_mutations

aten = torch.ops.aten
N = 64


def mutation_joint(primals, tangents):
    """AOTAutograd's joint for ``b.add_(1); return (x * b).sin()`` with b requiring grad: the
    mutated input is cloned, its new value is the first forward output."""
    x, b = primals
    (t_b, t_out) = tangents
    new_b = aten.add.Tensor(aten.clone.default(b), 1)
    mul = aten.mul.Tensor(x, new_b)
    out = aten.sin.default(mul)
    g = aten.mul.Tensor(t_out, aten.cos.default(mul))
    return [new_b, out, aten.mul.Tensor(g, new_b), aten.add.Tensor(t_b, aten.mul.Tensor(g, x))]


def trace_mutation_joint():
    gm = make_fx(mutation_joint, tracing_mode="fake")(
        [torch.randn(N, N), torch.randn(N, N)], [torch.randn(N, N), torch.randn(N, N)]
    )
    for node in gm.graph.nodes:
        tangent = node.op == "placeholder" and "tangents" in node.name
        node.meta["partitioner_tag"] = "is_backward" if tangent or any(
            a.meta["partitioner_tag"] == "is_backward" for a in node.all_input_nodes) else "is_forward"
    return gm


def run_split(gm, fw, bw):
    """The split's gradients equal the joint graph's (pre-mutation b) on real inputs."""
    torch.manual_seed(0)
    primals = [torch.randn(N, N), torch.randn(N, N)]
    tangents = [torch.randn(N, N), torch.randn(N, N)]
    expected = gm(primals, tangents)
    fw_out = fw(*primals)
    grads = bw(*fw_out[2:], *tangents)
    for got, want in zip(list(fw_out[:2]) + list(grads), expected):
        torch.testing.assert_close(got, want)


def saved_names(fw):
    return [n.name for n in fw.graph.output_node().args[0][2:]]


def test_marked_input_is_never_saved():
    gm = trace_mutation_joint()
    fw, bw = partition(gm, None, num_fwd_outputs=2)
    # Unmarked, the input is the free choice (graph inputs cost nothing to save).
    assert "primals_2" in saved_names(fw)
    gm = trace_mutation_joint()
    gm.graph.find_nodes(op="placeholder")[1].meta["aot_runtime_epilogue_input_mutation"] = True
    fw, bw = partition(gm, None, num_fwd_outputs=2)
    assert "primals_2" not in saved_names(fw)
    assert "primals_2" not in [n.name for n in bw.graph.find_nodes(op="placeholder")]
    assert fw.meta["ckpt_partition"].saved_bytes == N * N * 4  # the clone's value (b + 1), once
    run_split(gm, fw, bw)
    # torch's partitioner saves the same values on this graph.
    gm = trace_mutation_joint()
    gm.graph.find_nodes(op="placeholder")[1].meta["aot_runtime_epilogue_input_mutation"] = True
    torch_fw, _ = min_cut_rematerialization_partition(gm, None, num_fwd_outputs=2)
    assert saved_names(fw) == saved_names(torch_fw) == ["primals_1", "add"]


def test_output_descriptors_mark_the_input_on_older_torch():
    desc = pytest.importorskip("torch._functorch._aot_autograd.descriptors")
    gm = trace_mutation_joint()
    x, b, t_b, t_out = gm.graph.find_nodes(op="placeholder")
    x.meta["desc"], b.meta["desc"] = desc.PlainAOTInput(0), desc.PlainAOTInput(1)
    out_descs = [desc.InputMutationAOTOutput(b.meta["desc"]), desc.PlainAOTOutput(0),
                 desc.GradAOTOutput(x.meta["desc"]), desc.GradAOTOutput(b.meta["desc"])]
    gm.graph.output_node().meta["desc"] = out_descs
    assert replayed_input_mutations(gm.graph) == {b}
    fw, bw = partition(gm, None, num_fwd_outputs=2)
    assert "primals_2" not in saved_names(fw)
    run_split(gm, fw, bw)
    # An input without a gradient is not marked (torch marks only inputs that require grad).
    gm.graph.output_node().meta["desc"] = out_descs[:3] + [None]
    assert replayed_input_mutations(gm.graph) == set()


@pytest.mark.parametrize("static", [[], [1], [0, 1]])
def test_forward_inputs_get_is_static_input_as_torch_sets_it(static):
    fw, bw = partition(trace_mutation_joint(), None, num_fwd_outputs=2, static_lifetime_input_indices=static)
    ours = {n.name: n.meta.get("is_static_input") for n in fw.graph.find_nodes(op="placeholder")}
    assert ours == {"primals_1": 0 in static, "primals_2": 1 in static}
    # The backward's copies of saved inputs carry the stamp too (inductor reads it there).
    for node in bw.graph.find_nodes(op="placeholder"):
        if node.name in ours:
            assert node.meta["is_static_input"] == ours[node.name]
    torch_fw, _ = min_cut_rematerialization_partition(
        trace_mutation_joint(), None, num_fwd_outputs=2, static_lifetime_input_indices=static)
    theirs = {n.name: n.meta.get("is_static_input") for n in torch_fw.graph.find_nodes(op="placeholder")}
    if any(v is not None for v in theirs.values()):  # torch >= 2.15 stamps it
        assert ours == theirs


# ---------------------------------------------------------------- compiled, against stock torch


class MutatingModel(nn.Module):
    """Mutates a graph input that requires grad and updates BatchNorm's running stats."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x, b):
        b.add_(1)
        h = cc.checkpoint(lambda t: torch.nn.functional.gelu(self.lin(t)), x * b, use_reentrant=False)
        return self.bn(h).sin().sum()


def _train_step(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MutatingModel()
    x = torch.randn(4, 8, requires_grad=True)
    b_leaf = torch.randn(4, 8, requires_grad=True)
    b = b_leaf.clone()
    torch.compile(model, backend=backend, fullgraph=True)(x, b).backward()
    grads = [x.grad, b_leaf.grad] + [p.grad for p in model.parameters()]
    return grads, b.detach(), [model.bn.running_mean, model.bn.running_var]


def test_input_mutation_matches_stock_torch_compile():
    # Failed with "modified by an inplace operation": the input was saved, then mutated.
    want = _train_step("inductor")
    got = _train_step(cc.backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _hooked_step(backend):
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    calls = []
    lin.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(("module", grad_out[0].sum().item())))

    def f(x):
        y = lin(x)
        y.register_hook(lambda g: calls.append(("tensor", g.sum().item())) or g * 2)
        return y.relu().sum()

    x = torch.randn(4, 8, requires_grad=True)
    # The forward runs under compiled autograd too: only then does Dynamo hand the hook to
    # the backward through a BackwardState input (as torch's compiled-autograd tests do).
    with compiled_autograd._enable(torch.compile(backend="eager")):
        torch.compile(f, backend=backend)(x).backward()
    torch._dynamo.reset()
    return [x.grad, lin.weight.grad, lin.bias.grad], calls


def test_tensor_hook_under_compiled_autograd_matches_aot_eager():
    # Failed: the BackwardState came before the tangents in the backward's inputs.
    want_grads, want_calls = _hooked_step("aot_eager")
    got_grads, got_calls = _hooked_step(cc.backend)
    assert got_calls == want_calls and [kind for kind, _ in got_calls] == ["tensor", "module"]
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
