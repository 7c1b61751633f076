"""The partitioner as AOTAutograd's ``partition_fn``: gradients equal eager, and the
saved bytes never exceed torch's own min-cut partitioner on the same joint graph."""
import copy
import functools

import pytest
import torch
import torch._dynamo.backends.common
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

from ckpt_compile.passes import partition
from ckpt_compile.passes.problem import value_nbytes


class Block(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.qkv, self.fc1, self.fc2 = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.fc2(F.gelu(self.fc1(x)))


class Model(torch.nn.Module):
    def __init__(self, checkpointed):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.checkpointed = checkpointed

    def forward(self, x):
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x.square().mean()


def saved_bytes(fw, num_fwd_outputs):
    outs = fw.graph.output_node().args[0][num_fwd_outputs:]
    return sum(value_nbytes(n.meta.get("val")) for n in outs if n.op != "placeholder")


def compile_and_check(checkpointed, partition_fn, dynamic=False, batch=3):
    """Gradients through our partitioner equal eager's; returns the joint graphs seen."""
    torch.manual_seed(0)
    model = Model(checkpointed)
    x = torch.randn(2, batch, 16, requires_grad=True)
    model(x).backward()
    expected = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    seen = []

    def capturing(joint, joint_inputs, **kwargs):
        seen.append((copy.deepcopy(joint), joint_inputs, kwargs))
        return partition_fn(joint, joint_inputs, **kwargs)

    torch._dynamo.reset()
    nop = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731 - run the graphs as they are
    backend = torch._dynamo.backends.common.aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=capturing)
    loss = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=True)(x)
    loss.backward()
    got = [p.grad for p in model.parameters()] + [x.grad]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert seen, "the partitioner was never called"
    return seen


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_gradients_equal_eager_and_saved_bytes_at_most_torch(checkpointed):
    for joint, joint_inputs, kwargs in compile_and_check(checkpointed, partition):
        ours, _ = partition(copy.deepcopy(joint), joint_inputs, **kwargs)
        fake_mode = torch._guards.detect_fake_mode(torch.utils._pytree.tree_leaves(joint_inputs))
        with fake_mode:
            theirs, _ = min_cut_rematerialization_partition(copy.deepcopy(joint), joint_inputs, **kwargs)
        n = kwargs["num_fwd_outputs"]
        assert ours.meta["ckpt_partition"].saved_bytes == saved_bytes(ours, n)
        assert saved_bytes(ours, n) <= saved_bytes(theirs, n)


def test_memory_budget_as_partition_fn():
    seen = compile_and_check(False, functools.partial(partition, memory_budget=0.5))
    joint, joint_inputs, kwargs = seen[0]
    full = partition(copy.deepcopy(joint), joint_inputs, **kwargs)[0].meta["ckpt_partition"]
    half = partition(copy.deepcopy(joint), joint_inputs, memory_budget=0.5, **kwargs)[0].meta["ckpt_partition"]
    assert half.saved_bytes <= 0.5 * full.saved_bytes
    assert half.recompute_flops > full.recompute_flops


def test_budget_monotone_on_a_real_joint_graph():
    joint, joint_inputs, kwargs = compile_and_check(True, partition)[0]
    previous = -1
    for budget in (0.05, 0.25, 0.5, 0.75, 1.0):
        try:
            plan = partition(copy.deepcopy(joint), joint_inputs, memory_budget=budget, **kwargs)[0].meta["ckpt_partition"]
        except ValueError as e:
            assert "smallest feasible budget" in str(e)
            continue
        assert previous <= plan.saved_bytes
        previous = plan.saved_bytes


def test_dynamic_shapes_bind_their_symbols():
    # Symbolic sizes: the backward needs the batch size, passed as a saved SymInt.
    seen = compile_and_check(False, partition, dynamic=True, batch=5)
    joint, joint_inputs, kwargs = seen[0]
    fw, bw = partition(copy.deepcopy(joint), joint_inputs, **kwargs)
    placeholders = bw.graph.find_nodes(op="placeholder")
    assert any(isinstance(p.meta.get("val"), torch.SymInt) for p in placeholders)
    assert fw.meta["ckpt_partition"].saved_bytes > 0  # size hints stand in for the symbols
