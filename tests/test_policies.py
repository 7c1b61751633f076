"""ckpt_compile.policies and cc.checkpoint_name: saved bytes and recomputed ops per policy.

The block is an attention + MLP block sized so that bytes come out round: the input is
(4, 64, 64) float32 = 64 KiB, the qkv projection 192 KiB, scores, attention output and
projections 64 KiB each, the MLP hidden layer 256 KiB. Two blocks, each checkpointed with
the policy under test. References: PyTorch's own selective checkpointing
(``torch.utils.checkpoint``) driven by a hand-written policy that saves the same values by
operator, closed-form bytes, and no checkpointing for gradients. Compiled runs
(``backend="ckpt"``, inductor) must save the same bytes as eager where both keep the same
values (eager's cache also holds a saved output that the backward never reads, such as
the last linear layer's; a compiled partition drops it).
"""
from __future__ import annotations

import doctest
import functools
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as tuc
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy

import ckpt_compile as cc
from ckpt_compile import policies
from ckpt_compile.eager import _selective
from tests.eager_utils import OpCounter

aten = torch.ops.aten
D = 64
KiB = 1024
SAVE, RECOMPUTE = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.l1, self.l2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + self.proj(torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v)
        h = cc.checkpoint_name(self.l1(x), "fc1")
        return x + self.l2(cc.checkpoint_name(F.gelu(h), "act"))


class Model(nn.Module):
    def __init__(self, context_fn=None, checkpoint=cc.checkpoint):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.context_fn, self.checkpoint = context_fn, checkpoint

    def forward(self, x):
        for block in self.blocks:
            if self.context_fn is None:
                x = block(x)
            else:
                x = self.checkpoint(block, x, use_reentrant=False, context_fn=self.context_fn)
        return x


def _inputs():
    torch.manual_seed(1)
    return torch.randn(4, 64, D, requires_grad=True)


# ------------------------------------------------------------------ references
def _per_region(make):
    """A torch context_fn whose policy is built afresh for each region run (torchtitan's
    way of counting calls), recording its forward mode so its cache can be measured."""
    modes = []

    def context_fn():
        forward, recompute = tuc.create_selective_checkpoint_contexts(make())
        modes.append(forward)
        return forward, recompute

    context_fn.modes = modes
    return context_fn


def _nth_calls(op, keep):
    """Hand-written: save the calls of ``op`` whose per-region index is in ``keep``."""
    def make():
        seen = Counter()

        def policy(ctx, func, *args, **kwargs):
            if func is not op:
                return RECOMPUTE
            seen[func] += 1
            return SAVE if seen[func] - 1 in keep else RECOMPUTE
        return policy
    return make


def _save_listed(*ops):
    return lambda: (lambda ctx, func, *a, **k: SAVE if func in ops else RECOMPUTE)


def _all_but_names():
    # Everything, except the cheap copy that names a value already saved by its producer.
    return lambda: (lambda ctx, func, *a, **k: RECOMPUTE if func is policies.NAME_OP else SAVE)


# Saved by every case: the two blocks' inputs (64 KiB each) and the model output, which the
# loss's square saves.
BASE = 3 * 64
# id -> (our policy, torch reference, eager KiB, compiled KiB)
CASES = {
    "save_nothing": (policies.save_nothing, _save_listed(), BASE, BASE),
    "save_everything": (policies.save_everything, _all_but_names(), None, None),
    # qkv 192 + scores 64 + attention 64 + proj 64 + l1 256 + l2 64 per block, plus inputs;
    # compiled drops l2's output (its backward reads only l2's input).
    "save_matmuls": (policies.save_matmuls, _save_listed(aten.mm.default, aten.addmm.default, aten.bmm.default),
                     BASE + 2 * 704, BASE + 2 * 640),
    "save_matmuls_without_batch_dims": (
        policies.save_matmuls_without_batch_dims, _save_listed(aten.mm.default, aten.addmm.default),
        BASE + 2 * 576, BASE + 2 * 512),
    # A name is saved in its producer's place: l1 is the 3rd addmm of a block.
    "save_only_these_names": (policies.save_only_these_names("fc1"), _nth_calls(aten.addmm.default, {2}),
                              BASE + 2 * 256, BASE + 2 * 256),
    "save_any_names_but_these": (policies.save_any_names_but_these("fc1"), _save_listed(aten.gelu.default),
                                 BASE + 2 * 256, BASE + 2 * 256),
    # On CPU an offloaded value stays where it is: the same bytes as saving it.
    "offload_these_names": (policies.offload_these_names("act"), _save_listed(aten.gelu.default),
                            BASE + 2 * 256, BASE + 2 * 256),
    # addmm calls 0 and 2 of each block: qkv (192) and l1 (256), the count restarting per block.
    "save_ops_every_2": (policies.save_ops(aten.addmm.default, every=2), _nth_calls(aten.addmm.default, {0, 2}),
                         BASE + 2 * 448, BASE + 2 * 448),
    "save_from_both": (
        policies.save_from_both(policies.save_matmuls_without_batch_dims, policies.save_only_these_names("act")),
        _save_listed(aten.mm.default, aten.addmm.default, aten.gelu.default),
        BASE + 2 * 832, BASE + 2 * 768),
}


# ------------------------------------------------------------------ measuring
def _step(model, fn, observe_caches):
    """(saved KiB without parameters, backward op counts, loss, grads) of one step."""
    x = _inputs()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with _selective._observe_caches() as modes, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x).square().mean()
    if observe_caches:
        for mode in modes:  # our selective cache: saved activations autograd never sees
            storages.update(_selective._cached_storages(mode))
    for mode in getattr(model.context_fn, "modes", ()):  # torch's selective cache
        for entries in mode.storage.values():
            for leaf in tree_leaves(list(entries.values())):
                value = getattr(leaf, "val", None)
                if isinstance(value, torch.Tensor):
                    storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    saved = sum(n for ptr, n in storages.items() if ptr not in params)
    counter = OpCounter()
    with counter:
        loss.backward()
    return saved // KiB, counter.counts, loss.detach(), [x.grad] + [p.grad for p in model.parameters()]


@functools.lru_cache(maxsize=None)
def _reference():
    model = Model()
    return _step(model, model, False)


def _eager(case):
    model = Model(functools.partial(cc.create_selective_checkpoint_contexts, CASES[case][0]))
    return _step(model, model, True)


def _assert_same_grads(got, want):
    torch.testing.assert_close(got[2], want[2])
    for g, w in zip(got[3], want[3], strict=True):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------ eager
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_policy_matches_torch_with_a_hand_written_policy(case):
    ours = _eager(case)
    model = Model(_per_region(CASES[case][1]), checkpoint=tuc.checkpoint)
    theirs = _step(model, model, False)
    assert len(model.context_fn.modes) == 2  # both blocks ran under torch's selective modes
    assert ours[0] == theirs[0], "saved KiB"
    recomputed = ("addmm", "bmm", "_softmax", "gelu", "mm")
    assert {k: ours[1][k] for k in recomputed} == {k: theirs[1][k] for k in recomputed}
    _assert_same_grads(ours, _reference())
    if CASES[case][2] is not None:
        assert ours[0] == CASES[case][2]


def test_saved_name_spares_its_producer():
    # save_only_these_names("fc1") keeps l1's output: of each block's 4 linear layers only
    # qkv and proj run again (l2's output is read by no backward and never recomputed).
    nothing, named = _eager("save_nothing")[1], _eager("save_only_these_names")[1]
    assert nothing["addmm"] == 2 * 3 and named["addmm"] == 2 * 2
    assert named["gelu"] == 2  # the value after the saved one is still recomputed


def test_mutated_named_producer_is_recomputed():
    # The producer's output is cached for the name; changed in place afterwards, it is
    # recomputed rather than handed back stale (the name's own copy was taken before).
    def f(x, w):
        h = x @ w
        n = cc.checkpoint_name(h, "h")
        h.mul_(2)
        return (n.sin() * h).sum()

    x, w = torch.randn(8, 8), torch.randn(8, 8, requires_grad=True)
    f(x, w).backward()
    want, w.grad = w.grad, None
    ctx = functools.partial(cc.create_selective_checkpoint_contexts, policies.save_only_these_names("h"))
    cc.checkpoint(f, x, w, use_reentrant=False, context_fn=ctx).backward()
    torch.testing.assert_close(w.grad, want)


def test_save_ops_counts_per_region_run():
    policy = policies.save_ops(aten.addmm.default, every=2)
    model = Model(functools.partial(cc.create_selective_checkpoint_contexts, policy))
    first, second = _step(model, model, True), _step(model, model, True)
    assert first[0] == second[0] == CASES["save_ops_every_2"][2]
    assert first[1] == second[1]
    # Called directly (no dispatch mode), calls are counted on the policy object.
    decisions = [policy(None, aten.addmm.default) for _ in range(3)]
    assert decisions == [SAVE, RECOMPUTE, SAVE]


def test_save_ops_built_per_region_counts_the_same_with_torchs_contexts():
    # torch's contexts know no fresh copy (the count never looks at who calls): built per
    # region, as torchtitan does, the policy saves what it saves with ours.
    model = Model(_per_region(lambda: policies.save_ops(aten.addmm.default, every=2)), checkpoint=tuc.checkpoint)
    assert _step(model, model, False)[0] == _eager("save_ops_every_2")[0] == CASES["save_ops_every_2"][2]


def test_save_from_both_keeps_counting_per_region_run():
    both = policies.save_from_both(policies.save_nothing, policies.save_ops(aten.addmm.default, every=2))
    model = Model(functools.partial(cc.create_selective_checkpoint_contexts, both))
    assert _step(model, model, True)[0] == _step(model, model, True)[0] == CASES["save_ops_every_2"][2]


def test_the_engine_does_not_depend_on_policies_being_imported():
    # The name operator is the engine's own: whether policies was imported changes nothing.
    code = (
        "import sys, torch\n"
        "import ckpt_compile.eager._selective\n"
        "assert 'ckpt_compile.policies' not in sys.modules\n"
        "from ckpt_compile.eager._named_values import NAME_OP\n"
        "assert torch.ops.ckpt_compile.checkpoint_name.default is NAME_OP\n"
        "import ckpt_compile.policies as p\n"
        "assert p.NAME_OP is NAME_OP\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_save_ops_accepts_packets_and_all_calls_by_default():
    policy = policies.save_ops(aten.mm, aten.gelu.default)
    assert policy(None, aten.mm.default) == policy(None, aten.gelu.default) == SAVE
    assert policy(None, aten.addmm.default) == RECOMPUTE


@pytest.mark.parametrize("p, q, want", [
    (SAVE, RECOMPUTE, SAVE),
    (CheckpointPolicy.PREFER_SAVE, CheckpointPolicy.MUST_CPU_OFFLOAD, CheckpointPolicy.PREFER_SAVE),
    (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_CPU_OFFLOAD, CheckpointPolicy.PREFER_CPU_OFFLOAD),
    (CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.MUST_RECOMPUTE),
    (CheckpointPolicy.PREFER_SAVE, SAVE, SAVE),
    (True, RECOMPUTE, SAVE),
    (False, CheckpointPolicy.PREFER_SAVE, CheckpointPolicy.PREFER_SAVE),
])
def test_save_from_both_keeps_the_stronger_decision(p, q, want):
    both = policies.save_from_both(lambda *a, **k: p, lambda *a, **k: q)
    assert both(None, aten.mm.default) == want
    assert policies.save_from_both(lambda *a, **k: q, lambda *a, **k: p)(None, aten.mm.default) == want


def test_errors_name_the_api_and_what_was_received():
    with pytest.raises(TypeError, match=r"save_ops.*torch.ops.aten.mm.default.*'mm' \(str\)"):
        policies.save_ops("mm")
    with pytest.raises(ValueError, match=r"every must be an int >= 1, got 0"):
        policies.save_ops(aten.mm.default, every=0)
    with pytest.raises(TypeError, match=r"save_only_these_names.*names must be str, got \[3\]"):
        policies.save_only_these_names("a", 3)
    with pytest.raises(TypeError, match=r"save_from_both.*must be callable"):
        policies.save_from_both(policies.save_nothing, "save_matmuls")
    with pytest.raises(TypeError, match=r"returned 'yes'.*CheckpointPolicy member or a bool"):
        policies.save_from_both(policies.save_nothing, lambda *a, **k: "yes")(None, aten.mm.default)
    with pytest.raises(TypeError, match=r"checkpoint_name\(tensor, name\): name must be a str, got int 3"):
        cc.checkpoint_name(torch.ones(2), 3)
    with pytest.raises(TypeError, match=r"tensor must be a torch.Tensor, got list"):
        cc.checkpoint_name([1.0], "x")


def test_checkpoint_name_is_the_identity_with_a_pass_through_gradient():
    x = torch.randn(3, 5, requires_grad=True)
    y = cc.checkpoint_name(x, "x")
    assert torch.equal(y, x) and y.shape == x.shape and y.stride() == x.stride()
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    assert cc.checkpoint_name is policies.checkpoint_name and cc.policies is policies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloaded_name_lives_on_cpu_until_backward():
    model = Model(functools.partial(cc.create_selective_checkpoint_contexts, policies.offload_these_names("act")))
    model.cuda()
    x = _inputs().detach().cuda().requires_grad_()
    with _selective._observe_caches() as modes:
        loss = model(x).square().mean()
    cached = [leaf for mode in modes for entries in mode.storage.values() for entry in entries.values()
              for leaf in tree_leaves(entry) if isinstance(leaf, _selective._Cached)]
    assert len(cached) == 2 and all(c.value.device.type == "cpu" for c in cached)
    assert all(c.value.nbytes == 256 * KiB for c in cached)
    loss.backward()
    want = Model().cuda()
    want(x.detach().requires_grad_()).square().mean().backward()
    for p, q in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


# ------------------------------------------------------------------ compiled
@pytest.fixture(scope="module", autouse=True)
def _dynamo_limits():
    # Several policies compile the same Model.forward, under two backends.
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        yield
    torch._dynamo.reset()


COMPILED = {
    "ckpt": ["save_nothing", "save_only_these_names", "save_any_names_but_these", "offload_these_names",
             "save_ops_every_2", "save_from_both"],
    "inductor": ["save_only_these_names", "save_ops_every_2"],
}


@functools.lru_cache(maxsize=None)
def _compiled(case, backend):
    model = Model(functools.partial(cc.create_selective_checkpoint_contexts, CASES[case][0]))
    if backend == "ckpt":  # cc.backend is what backend="ckpt" names (entry point)
        backend = functools.partial(cc.backend, options={"inner": "eager"})
    return model, torch.compile(model, backend=backend, fullgraph=True)


@pytest.mark.parametrize("backend, case", [(b, c) for b, cases in COMPILED.items() for c in cases])
def test_compiled_saves_what_eager_saves(backend, case):
    model, fn = _compiled(case, backend)
    got = _step(model, fn, False)
    assert got[0] == CASES[case][3], "saved KiB"
    _assert_same_grads(got, _reference())
    eager = _eager(case)
    if CASES[case][2] == CASES[case][3]:
        assert got[0] == eager[0]
    # The same linear layers are recomputed (inductor runs matmuls as aten extern calls).
    assert got[1]["addmm"] == eager[1]["addmm"]


def test_checkpoint_name_traces_without_graph_break():
    def f(x):
        return cc.checkpoint_name(x.sin(), "s").cos()

    explained = torch._dynamo.explain(f)(torch.randn(4))
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    targets = [n.target for n in explained.graphs[0].graph.nodes if n.op == "call_function"]
    assert policies.NAME_OP in targets


def test_save_matmuls_saves_fused_attention():
    # SDPA runs as one fused aten op (flash attention on CPU): saved, it is not rerun.
    q = torch.randn(2, 4, 32, 16, requires_grad=True)

    def f(q):
        return F.scaled_dot_product_attention(q.sin(), q.cos(), q, is_causal=True).sum()

    counts = {}
    for name, policy in (("nothing", policies.save_nothing), ("matmuls", policies.save_matmuls)):
        ctx = functools.partial(cc.create_selective_checkpoint_contexts, policy)
        out = cc.checkpoint(f, q, use_reentrant=False, context_fn=ctx)
        with OpCounter() as counter:
            out.backward()
        counts[name] = {k: v for k, v in counter.counts.items() if k.startswith("_scaled_dot_product") and not k.endswith("backward")}
    assert sum(counts["nothing"].values()) == 1 and not counts["matmuls"]


def test_docstring_examples():
    result = doctest.testmod(policies, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
