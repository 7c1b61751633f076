"""The partitioner on hand-built joint graphs: exact plans, rules, errors, numerics.

Sizes are 512x512 float32, so every activation is exactly 1 MiB (a bool mask 256 KiB).
Each split is also run for real and compared with the joint graph's own outputs.
"""
import expecttest
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.checkpoint import CheckpointPolicy as P
from torch.utils.flop_counter import FlopCounterMode

from ckpt_compile.passes import partition
from ckpt_compile.passes.problem import build_problem

aten = torch.ops.aten
MiB = 1 << 20
N = 512


def mlp_joint(primals, tangents):
    x, w = primals
    (t,) = tangents
    a = aten.mm.default(x, w)
    b = aten.relu.default(a)
    c = aten.sigmoid.default(b)
    gc = aten.sigmoid_backward.default(t, c)
    gb = aten.threshold_backward.default(gc, b, 0)
    return [c, aten.mm.default(gb, aten.t.default(w)), aten.mm.default(aten.t.default(x), gb)]


def dropout_joint(primals, tangents):
    (x,) = primals
    (t,) = tangents
    a = aten.mul.Tensor(x, 2)
    out, mask = aten.native_dropout.default(a, 0.5, True)
    return [out, aten.native_dropout_backward.default(t, mask, 2.0)]


def mlp_dropout_joint(primals, tangents):
    x, w = primals
    (t,) = tangents
    b = aten.relu.default(aten.mm.default(x, w))
    out, mask = aten.native_dropout.default(b, 0.5, True)
    gb = aten.threshold_backward.default(aten.native_dropout_backward.default(t, mask, 2.0), b, 0)
    return [out, aten.mm.default(gb, aten.t.default(w)), aten.mm.default(aten.t.default(x), gb)]


def trace(fn, n_primals, device="cpu"):
    args = [torch.randn(N, N, device=device) for _ in range(n_primals)], [torch.randn(N, N, device=device)]
    gm = make_fx(fn, tracing_mode="fake")(*args)
    for node in gm.graph.nodes:
        tangent = node.op == "placeholder" and "tangents" in node.name
        node.meta["partitioner_tag"] = "is_backward" if tangent or any(
            a.meta["partitioner_tag"] == "is_backward" for a in node.all_input_nodes) else "is_forward"
    return gm


def tag(gm, region=0, **policies):
    """Put nodes in a checkpoint region: name=policy; PREFER_RECOMPUTE for the rest listed."""
    for node in gm.graph.nodes:
        if node.name in policies:
            node.meta["recompute"] = policies[node.name]
            node.meta["ac_graph_id"] = region
    return gm


def check_numerics(gm, fw, bw, n_primals, seed=0, device="cpu"):
    """Forward + backward of the split equal the joint graph on the same real inputs."""
    torch.manual_seed(seed)
    primals = [torch.randn(N, N, device=device) for _ in range(n_primals)]
    tangents = [torch.randn(N, N, device=device)]
    torch.manual_seed(1)
    expected = gm(primals, tangents)
    torch.manual_seed(1)
    fw_out = fw(*primals)
    n_fwd = len(expected) - n_primals
    grads = bw(*fw_out[n_fwd:], *tangents)
    for got, want in zip(list(fw_out[:n_fwd]) + list(grads), expected):
        torch.testing.assert_close(got, want)


def plan_of(gm, **kwargs):
    fw, bw = partition(gm, None, num_fwd_outputs=1, **kwargs)
    assert fw.meta["ckpt_partition"] is bw.meta["ckpt_partition"]
    return fw, bw, fw.meta["ckpt_partition"]


def test_untagged_graph_saves_matmul_output_side_and_recomputes_pointwise():
    gm = trace(mlp_joint, 2)
    fw, bw, plan = plan_of(gm)
    # Backward reads relu and sigmoid (2 MiB if both saved); mm may not be recomputed
    # outside a region. Saving mm or relu costs 1 MiB either way: relu recomputes less.
    assert plan.saved == ("primals_1", "primals_2", "relu")
    assert plan.recomputed == ("sigmoid",)
    assert plan.saved_bytes == MiB
    assert plan.recompute_flops == N * N  # one per element of the sigmoid
    assert dict(plan.banned) == {"mm": "expensive op outside a checkpoint region"}
    check_numerics(gm, fw, bw, 2)


def test_region_recomputes_matmul_and_flops_come_from_flop_counter():
    gm = tag(trace(mlp_joint, 2), mm=P.PREFER_RECOMPUTE, relu=P.PREFER_RECOMPUTE, sigmoid=P.PREFER_RECOMPUTE)
    fw, bw, plan = plan_of(gm)
    assert plan.saved == ("primals_1", "primals_2") and plan.saved_bytes == 0
    assert plan.recomputed == ("mm", "relu", "sigmoid")
    with FlopCounterMode(display=False) as counter:
        torch.mm(torch.randn(N, N), torch.randn(N, N))
    assert plan.recompute_flops == counter.get_total_flops() + 2 * N * N
    assert plan.regions[0].recomputed == plan.recomputed
    check_numerics(gm, fw, bw, 2)


def test_must_save_and_must_recompute_are_strict():
    gm = tag(trace(mlp_joint, 2), mm=P.PREFER_RECOMPUTE, relu=P.PREFER_RECOMPUTE, sigmoid=P.MUST_SAVE)
    fw, bw, plan = plan_of(gm)
    assert plan.saved == ("primals_1", "primals_2", "sigmoid") and plan.recomputed == ("mm", "relu")
    check_numerics(gm, fw, bw, 2)
    gm = tag(trace(mlp_joint, 2), relu=P.MUST_RECOMPUTE)  # mm outside the region: banned
    fw, bw, plan = plan_of(gm)
    assert plan.saved == ("primals_1", "primals_2", "mm") and plan.recomputed == ("relu", "sigmoid")
    check_numerics(gm, fw, bw, 2)


def test_prefer_tags_are_weights_must_tags_are_constraints():
    gm = tag(trace(mlp_joint, 2), mm=P.MUST_SAVE, relu=P.PREFER_RECOMPUTE, sigmoid=P.PREFER_SAVE)
    problem = build_problem(gm, num_fwd_outputs=1).problem
    weight = dict(zip(problem.names, problem.save_weight))
    # Weights in quarter-bytes: PREFER_SAVE 1x, untagged and MUST_SAVE 4x, PREFER_RECOMPUTE 16x
    # (a policy's MUST_SAVE one quarter-byte less: it wins ties against untagged values).
    assert (weight["sigmoid"], weight["mm"], weight["relu"]) == (MiB, 4 * MiB - 1, 16 * MiB)
    assert weight["primals_1"] == 0  # graph inputs cost nothing to save
    assert problem.names.index("mm") in problem.must_save


def test_random_op_is_saved_unless_recompute_is_exact():
    gm = tag(trace(dropout_joint, 1), mul=P.PREFER_RECOMPUTE, native_dropout=P.PREFER_RECOMPUTE,
             getitem=P.PREFER_RECOMPUTE, getitem_1=P.PREFER_RECOMPUTE)
    _, _, plan = plan_of(gm)
    assert plan.saved == ("getitem_1",) and plan.saved_bytes == N * N  # the bool mask
    assert dict(plan.banned)["native_dropout"] == "random op without exact recompute"
    gm.graph.find_nodes(op="call_function", target=aten.native_dropout.default)[0].meta["ckpt_rng_exact"] = True
    _, _, plan = plan_of(gm)
    assert plan.saved == ("primals_1",) and plan.recomputed == ("mul", "native_dropout")
    assert plan.deferred == ("getitem_1",)  # read only by the backward: computed there, once


def test_cpu_offload_moves_saved_value_through_cpu():
    gm = tag(trace(mlp_joint, 2), mm=P.PREFER_RECOMPUTE, relu=P.MUST_CPU_OFFLOAD, sigmoid=P.PREFER_RECOMPUTE)
    fw, bw, plan = plan_of(gm)
    assert plan.offloaded == ("relu",) and "relu" in plan.saved
    fw_copy = fw.graph.output_node().args[0][1 + plan.saved.index("relu")]
    assert fw_copy.target is aten._to_copy.default and fw_copy.kwargs["device"] == torch.device("cpu")
    assert fw_copy.args[0].name == "relu"
    relu_input = bw.graph.find_nodes(op="placeholder")[plan.saved.index("relu")]
    assert relu_input.name == "relu" and [u.target for u in relu_input.users] == [aten._to_copy.default]
    check_numerics(gm, fw, bw, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading from a GPU needs CUDA")
def test_cpu_offload_from_cuda_is_non_blocking():
    gm = tag(trace(mlp_joint, 2, device="cuda"), mm=P.PREFER_RECOMPUTE, relu=P.MUST_CPU_OFFLOAD, sigmoid=P.PREFER_RECOMPUTE)
    fw, bw, plan = plan_of(gm)
    fw_copy = fw.graph.output_node().args[0][1 + plan.saved.index("relu")]
    assert fw_copy.kwargs == {"device": torch.device("cpu"), "non_blocking": True}
    assert fw_copy.meta["val"].device.type == "cpu"
    back = next(iter(bw.graph.find_nodes(op="placeholder")[plan.saved.index("relu")].users))
    assert back.kwargs["device"].type == "cuda" and back.kwargs["non_blocking"] is True
    check_numerics(gm, fw, bw, 2, device="cuda")


def test_meta_val_is_kept_on_every_node():
    gm = trace(mlp_joint, 2)
    fw, bw, _ = plan_of(gm)
    for module in (fw, bw):
        for node in module.graph.nodes:
            if node.op != "output":
                assert isinstance(node.meta.get("val"), torch.Tensor), node.format_node()


class ErrorMessages(expecttest.TestCase):
    def test_conflict_names_nodes_and_source_lines(self):
        gm = tag(trace(dropout_joint, 1), getitem_1=P.MUST_RECOMPUTE)
        for node in gm.graph.nodes:
            node.meta["stack_trace"] = f'  File "model.py", line {len(node.name)}, in forward\n    {node.name} = ...\n'
        with self.assertRaises(ValueError) as info:
            partition(gm, None, num_fwd_outputs=1)
        self.assertExpectedInline(str(info.exception), """\
partition: no valid plan, the backward needs a value that can be neither saved nor recomputed along this chain (first: may not be recomputed, last: read by the backward):
  %native_dropout : [num_users=2] = call_function[target=torch.ops.aten.native_dropout.default](args = (%mul, 0.5, True), kwargs = {})  [random op without exact recompute]
    at File "model.py", line 14, in forward
  %getitem_1 : [num_users=1] = call_function[target=operator.getitem](args = (%native_dropout, 1), kwargs = {})  [tagged MUST_RECOMPUTE]
    at File "model.py", line 9, in forward
Fix: drop one of these MUST_SAVE / MUST_RECOMPUTE tags (or make the random op's recompute exact with the tagging pass).""")

    def test_budget_too_small_names_the_smallest_feasible_budget(self):
        # At budget 1: relu (1 MiB, or mm) and the dropout mask (256 KiB). Recomputing
        # everything allowed still needs the mask (random): smallest budget 0.2.
        gm = trace(mlp_dropout_joint, 2)
        self.assertEqual(plan_of(gm)[2].saved_bytes, MiB + MiB // 4)
        self.assertEqual(plan_of(gm, memory_budget=0.2)[2].saved_bytes, MiB // 4)
        with self.assertRaises(ValueError) as info:
            partition(gm, None, num_fwd_outputs=1, memory_budget=0.1)
        self.assertExpectedInline(str(info.exception), """partition(memory_budget=0.1): infeasible; at budget 1 the plan saves 1310720 bytes, and recomputing everything allowed still saves 262144 bytes, so the smallest feasible budget is 0.2""")


def test_keywords():
    gm = trace(mlp_joint, 2)
    fw, _ = partition(gm, None, num_fwd_outputs=1, static_lifetime_input_indices=[1], compiler="inductor")
    assert fw.meta["ckpt_partition"].saved_bytes == MiB
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['budget'\].*memory_budget"):
        partition(gm, None, num_fwd_outputs=1, budget=0.5)
    for bad in (0, 1.5, -1, "0.5", True):
        with pytest.raises(ValueError, match=r"must be a number in \(0, 1\]"):
            partition(gm, None, num_fwd_outputs=1, memory_budget=bad)


def test_budget_recomputes_the_matmul():
    gm = trace(mlp_joint, 2)
    for budget, saved, recomputed in ((1.0, MiB, ("sigmoid",)), (0.5, 0, ("mm", "relu", "sigmoid"))):
        fw, bw, plan = plan_of(gm, memory_budget=budget)
        assert (plan.saved_bytes, plan.recomputed) == (saved, recomputed)
        check_numerics(gm, fw, bw, 2)
