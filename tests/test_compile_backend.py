"""backend="ckpt" end to end: gradients, op counts, saved bytes, dropout, dynamic shapes.

Every compile uses ``fullgraph=True``. Models are tiny (2 blocks, d_model 64) and compiled
models are shared through module-scoped caches: a cold inductor compile costs ~10 s here.
The reference is always PyTorch eager on the same parameters and inputs.
"""
from __future__ import annotations

import contextlib
import functools
import math
import json
import logging
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as tuc
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

import ckpt_compile as cc

aten = torch.ops.aten
D_MODEL = 64
MATMULS = ("mm", "addmm", "bmm")


# ---------------------------------------------------------------- models


class MLPBlock(nn.Module):
    def __init__(self, d=D_MODEL, p=0.0):
        super().__init__()
        self.ln, self.l1, self.l2, self.p = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d), p

    def forward(self, x):
        return x + self.l2(F.dropout(F.gelu(self.l1(self.ln(x))), self.p, training=self.training))


class TransformerBlock(nn.Module):
    # Attention written out (no SDPA): on CPU, SDPA counts as a random op for inductor.
    def __init__(self, d=D_MODEL, heads=4, p=0.0):
        super().__init__()
        self.heads, self.p = heads, p
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = MLPBlock(d, p)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        att = F.dropout(att, self.p, training=self.training)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, s, d))
        return self.mlp(x)


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op.overloadpacket.__name__ in MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def _offload_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_CPU_OFFLOAD if op.overloadpacket.__name__ in MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


# How each block is wrapped; module-level functions so Dynamo guards stay stable.
def _none(block, x):
    return block(x)


def _ours(block, x):
    return cc.checkpoint(block, x, use_reentrant=False)


def _torch(block, x):
    return tuc.checkpoint(block, x, use_reentrant=False)


def _ours_sel(block, x):
    ctx = functools.partial(cc.create_selective_checkpoint_contexts, _save_matmuls)
    return cc.checkpoint(block, x, use_reentrant=False, context_fn=ctx)


def _torch_sel(block, x):
    ctx = functools.partial(tuc.create_selective_checkpoint_contexts, _save_matmuls)
    return tuc.checkpoint(block, x, use_reentrant=False, context_fn=ctx)


def _ours_offload(block, x):
    ctx = functools.partial(cc.create_selective_checkpoint_contexts, _offload_matmuls)
    return cc.checkpoint(block, x, use_reentrant=False, context_fn=ctx)


def _annotated(block, x):
    with torch.fx.traceback.annotate({"ckpt_region": id(block) % 1000}):
        return block(x)


WRAPS = {
    "none": _none, "ours": _ours, "torch": _torch, "ours_sel": _ours_sel, "torch_sel": _torch_sel,
    "ours_offload": _ours_offload, "annotated": _annotated,
}


class Model(nn.Module):
    def __init__(self, block_cls, wrap, p=0.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([block_cls(p=p) for _ in range(2)])
        self.wrap = wrap

    def forward(self, x):
        for block in self.blocks:
            x = self.wrap(block, x)
        return x.pow(2).mean()


BLOCKS = {"mlp": MLPBlock, "transformer": TransformerBlock}


def _inputs(batch=2, seq=32, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, seq, D_MODEL, requires_grad=True)


# ---------------------------------------------------------------- measuring


class OpCounter(TorchDispatchMode):
    """Counts aten operators by overload packet name while active."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def matmuls(self):
        return sum(self.counts[name] for name in MATMULS)


class SavedActivations:
    """Bytes autograd saves for backward (unique storages), parameters and inputs excluded."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages = {}

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self):
        return sum(self.storages.values())


def _step(model, fn, x, seed=5):
    """Loss, input grad and parameter grads of one step; counts backward ops and saved bytes."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    saved = SavedActivations([x, *model.parameters()])
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = fn(x)
    counter = OpCounter()
    with counter:
        loss.backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return loss.detach(), grads, counter, saved.total


def _assert_close(got, want, rtol=1e-5, atol=1e-6):
    loss, grads = got[0], got[1]
    torch.testing.assert_close(loss, want[0], rtol=rtol, atol=atol)
    assert len(grads) == len(want[1])
    for g, w in zip(grads, want[1]):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.fixture(scope="module", autouse=True)
def _dynamo_limits():
    # Many variants of the same Model.forward are compiled in this module.
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        yield
    torch._dynamo.reset()


class _Compiled:
    """One compiled model per (block, wrap, inner, p, dynamic), with its partition reports."""

    def __init__(self, block, wrap, inner, p=0.0, dynamic=False, budget=1.0):
        self.model = Model(BLOCKS[block], WRAPS[wrap], p=p)
        self.eager = Model(BLOCKS[block], WRAPS["none"] if wrap == "annotated" else WRAPS[wrap], p=p)
        self.eager.load_state_dict(self.model.state_dict())
        self.reports, self.compiles = [], 0
        options = {"inner": inner, "memory_budget": budget}

        def counted(gm, example_inputs):
            # backend="ckpt" itself, counting the graphs it compiled (a Dynamo restart of
            # the same analysis, e.g. TensorifyScalarRestartAnalysis, raises and retries).
            from ckpt_compile.compile import _backend

            partitioner_call = _backend._CkptPartitioner.__call__

            def spy(partitioner, *args, **kwargs):
                out = partitioner_call(partitioner, *args, **kwargs)
                self.reports.append(partitioner.reports[-1])
                return out

            with _patched(_backend._CkptPartitioner, "__call__", spy):
                out = cc.backend(gm, example_inputs, options=options)
            self.compiles += 1
            return out

        self.fn = torch.compile(self.model, backend=counted, fullgraph=True, dynamic=dynamic)


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@functools.lru_cache(maxsize=None)
def compiled(block, wrap, inner="eager", p=0.0, dynamic=False, budget=1.0):
    return _Compiled(block, wrap, inner, p, dynamic, budget)


@functools.lru_cache(maxsize=None)
def reference(block):
    """Eager, no checkpointing: the ground truth for loss and gradients."""
    c = compiled(block, "none")
    return _step(c.eager, c.eager, _inputs())


# ---------------------------------------------------------------- inner="eager"


@pytest.mark.parametrize("wrap", ["none", "ours", "torch", "ours_sel", "torch_sel", "annotated"])
@pytest.mark.parametrize("block", ["mlp", "transformer"])
def test_loss_and_grads_match_eager(block, wrap):
    c = compiled(block, wrap)
    got = _step(c.model, c.fn, _inputs())
    _assert_close(got, reference(block))
    assert c.compiles == 1 and len(c.reports) == 1


def test_backward_recomputes_only_what_the_policy_allows():
    # Op counts of the compiled backward (inner="eager" runs the aten graph as is).
    none = _step(compiled("mlp", "none").model, compiled("mlp", "none").fn, _inputs())[2]
    plain = _step(compiled("mlp", "ours").model, compiled("mlp", "ours").fn, _inputs())[2]
    sel = _step(compiled("mlp", "ours_sel").model, compiled("mlp", "ours_sel").fn, _inputs())[2]
    torch_sel = _step(compiled("mlp", "torch_sel").model, compiled("mlp", "torch_sel").fn, _inputs())[2]
    # No checkpoint: 2 linears x 2 blocks, each needing an input-grad and a weight-grad mm.
    assert none.matmuls() == 8
    # Plain checkpoint recomputes l1 of each block (its output feeds gelu's backward), and
    # l2 of the last block: its output, read only by the loss, is recomputed from the saved
    # boundary rather than saved (as torch.compile does; issue 14). Block 1's l2 output is
    # needed by nothing in the backward, so it is not recomputed.
    assert plain.matmuls() == none.matmuls() + 3
    # A policy saving matmuls leaves no matmul recomputed.
    assert sel.matmuls() == torch_sel.matmuls() == none.matmuls()
    # The recomputed matmuls are the forward's addmm (the backward itself only runs mm).
    assert plain.counts["addmm"] == 3 and sel.counts["addmm"] == none.counts["addmm"] == 0


def test_annotated_regions_recompute_like_checkpoint():
    annotated = compiled("mlp", "annotated")
    ours = compiled("mlp", "ours")
    a = _step(annotated.model, annotated.fn, _inputs())
    o = _step(ours.model, ours.fn, _inputs())
    assert a[2].counts == o[2].counts
    assert a[3] == o[3]


def test_saved_bytes_per_block_checkpoint_below_15_percent():
    none = compiled("transformer", "none")
    ours = compiled("transformer", "ours")
    saved_none = _step(none.model, none.fn, _inputs())[3]
    saved_ours = _step(ours.model, ours.fn, _inputs())[3]
    assert saved_ours < 0.15 * saved_none
    # The report counts the same bytes as autograd's saved-tensor hooks.
    assert ours.reports[0]["saved_bytes"] == saved_ours
    # Per-block checkpointing saves the input of block 1: one (2, 32, 64) float tensor.
    # Block 0's input is the graph input; the loss's derivative 2*y is recomputed with
    # block 1 from that boundary (as torch.compile does; issue 14).
    assert saved_ours == 2 * 32 * 64 * 4


def test_saved_bytes_not_above_torch_checkpoint():
    for block in BLOCKS:
        ours = _step(compiled(block, "ours").model, compiled(block, "ours").fn, _inputs())[3]
        theirs = _step(compiled(block, "torch").model, compiled(block, "torch").fn, _inputs())[3]
        assert ours <= theirs


@pytest.mark.parametrize("wrap", ["ours", "torch", "ours_sel", "torch_sel"])
def test_dropout_matches_eager_preserve_rng_state(wrap):
    # inner="eager" draws from the same generator as eager: with preserve_rng_state=True
    # the eager recompute replays the same masks, so the values must agree exactly.
    c = compiled("transformer", wrap, p=0.3)
    got = _step(c.model, c.fn, _inputs())
    want = _step(c.eager, c.eager, _inputs())
    _assert_close(got, want)
    # Each dropout the backward recomputes runs under the RNG state its forward saved (the
    # exact match above says so): the regions recompute all four, as eager does.
    assert got[2].counts.get("native_dropout", 0) == 4
    # and dropout was really active (the no-dropout loss differs).
    assert not torch.equal(got[0], reference("transformer")[0])


def test_dynamic_shapes_one_compile_for_three_batch_sizes():
    c = compiled("transformer", "ours", dynamic=True)
    for batch in (3, 5, 7):
        x = _inputs(batch=batch)
        _assert_close(_step(c.model, c.fn, x), _step(c.eager, c.eager, x))
    assert c.compiles == 1
    # Saved bytes of a symbolic graph are counted at the first call's size hints.
    assert c.reports[0]["saved_bytes"] == 3 * 32 * 64 * 4


def test_cpu_offload_policy_offloads_and_keeps_grads():
    c = compiled("mlp", "ours_offload")
    got = _step(c.model, c.fn, _inputs())
    _assert_close(got, reference("mlp"))
    assert c.reports[0]["offloaded_nodes"] > 0
    # Offloaded matmul outputs are saved, not recomputed.
    assert got[2].matmuls() == 8


def test_memory_budget_reaches_the_partitioner():
    full = compiled("mlp", "none")
    half = compiled("mlp", "none", budget=0.5)
    got = _step(half.model, half.fn, _inputs())
    _step(full.model, full.fn, _inputs())
    _assert_close(got, reference("mlp"))
    assert half.reports[0]["saved_bytes"] <= 0.5 * full.reports[0]["saved_bytes"]
    assert half.reports[0]["recompute_flops"] > full.reports[0]["recompute_flops"]


def test_untraceable_region_falls_back_to_our_eager_engine(monkeypatch):
    import ckpt_compile.eager._non_reentrant as engine

    calls = []
    real = engine._checkpoint_non_reentrant
    monkeypatch.setattr(engine, "_checkpoint_non_reentrant", lambda *a, **k: calls.append(1) or real(*a, **k))
    lin = nn.Linear(8, 8)

    def body(x):
        y = lin(x).relu()
        torch._dynamo.graph_break()
        return y.sin()

    def f(x):
        return cc.checkpoint(body, x.cos(), use_reentrant=False).sum()

    x = torch.randn(4, 8, requires_grad=True)
    torch.compile(f, backend="ckpt", options={"inner": "eager"})(x).backward()
    assert calls == [1]
    got = x.grad
    x.grad = None
    (body(x.cos())).sum().backward()
    torch.testing.assert_close(got, x.grad)


# ---------------------------------------------------------------- report option


def test_report_true_logs_sizes(caplog):
    model = Model(MLPBlock, _ours)
    fn = torch.compile(model, backend="ckpt", options={"inner": "eager", "report": True}, fullgraph=True)
    with caplog.at_level(logging.INFO, logger="ckpt_compile"):
        fn(_inputs()).backward()
    records = [r for r in caplog.records if r.name == "ckpt_compile" and "partition" in r.getMessage()]
    assert len(records) == 1
    report = json.loads(records[0].getMessage().split("partition: ", 1)[1])
    assert report["saved_bytes"] == 2 * 32 * 64 * 4
    assert report["forward_nodes"] > 0 and report["backward_nodes"] > report["forward_nodes"]


def test_report_path_writes_json(tmp_path):
    path = tmp_path / "report.json"
    model = Model(TransformerBlock, _torch)
    fn = torch.compile(model, backend="ckpt", options={"inner": "eager", "report": str(path)}, fullgraph=True)
    fn(_inputs()).backward()
    document = json.loads(path.read_text())
    assert document["options"] == {"memory_budget": 1.0, "inner": "eager"}
    (graph,) = document["graphs"]
    assert set(graph) >= {"forward_nodes", "backward_nodes", "saved_tensors", "saved_bytes",
                          "recomputed_nodes", "recompute_flops", "offloaded_nodes"}
    assert graph["saved_bytes"] == 2 * 32 * 64 * 4 and graph["saved_tensors"] == 1


# ---------------------------------------------------------------- inner="inductor"


@pytest.mark.parametrize("wrap", ["ours", "torch_sel"])
def test_inductor_matches_eager(wrap):
    c = compiled("transformer", wrap, inner="inductor")
    got = _step(c.model, c.fn, _inputs())
    _assert_close(got, reference("transformer"), rtol=1e-4, atol=1e-5)
    report = c.reports[0]
    if wrap == "ours":
        assert report["saved_bytes"] == 2 * 32 * 64 * 4 and report["recomputed_nodes"] > 0


def test_inductor_dropout_recompute_is_exact():
    # Inductor draws its own random numbers (seeded per op), so the reference is the same
    # model compiled without checkpointing: same seeds, same masks, same gradients.
    ckpt = compiled("mlp", "ours", inner="inductor", p=0.3)
    plain = compiled("mlp", "none", inner="inductor", p=0.3)
    for c in (ckpt, plain):
        _step(c.model, c.fn, _inputs())  # compile first: compiling may draw random numbers
    got = _step(ckpt.model, ckpt.fn, _inputs())
    want = _step(plain.model, plain.fn, _inputs())
    _assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got[0], reference("mlp")[0])


def test_inductor_dynamic_shapes_one_compile():
    c = compiled("mlp", "ours", inner="inductor", dynamic=True)
    for batch in (3, 5, 7):
        x = _inputs(batch=batch)
        _assert_close(_step(c.model, c.fn, x), _step(c.eager, c.eager, x), rtol=1e-4, atol=1e-5)
    assert c.compiles == 1 and len(c.reports) == 1


def test_memory_budget_is_a_fraction_of_the_no_checkpoint_bytes():
    # docs/api.md: with checkpoint regions the budget still counts against the bytes the model
    # would save with no checkpointing at all.
    plain, per_block = compiled("mlp", "none"), compiled("mlp", "ours")
    _step(plain.model, plain.fn, _inputs())
    _step(per_block.model, per_block.fn, _inputs())
    no_ckpt, ckpt = plain.reports[0]["saved_bytes"], per_block.reports[0]["saved_bytes"]
    assert ckpt < no_ckpt
    loose = compiled("mlp", "ours", budget=round(ckpt / no_ckpt + 0.01, 2))  # met by the regions alone
    _assert_close(_step(loose.model, loose.fn, _inputs()), reference("mlp"))
    assert loose.reports[0]["saved_bytes"] == ckpt
    # Here the regions save only their boundaries, which nothing can recompute: a tighter
    # budget is infeasible, and the error names the smallest one in the option's units.
    tight = compiled("mlp", "ours", budget=round(ckpt / no_ckpt / 2, 4))
    with pytest.raises(Exception, match=rf"Use memory_budget >= {math.ceil(ckpt / no_ckpt * 1e4) / 1e4}"):
        _step(tight.model, tight.fn, _inputs())
