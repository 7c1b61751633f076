"""Segments: one checkpoint over consecutive blocks that the parent's own loop calls one by
one (``ckpt_compile/eager/_segment.py``, what ``cc.plan`` applies). Gradients equal plain
autograd's exactly; a segment saves its input once (the other blocks' inputs are
recomputed) and runs each block's forward twice; a broken chain falls back to a plain
checkpoint, still exact. Leaks and faults: the "segment" variant of tests/test_leaks.py and
tests/test_faults.py."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ckpt_compile as cc
import compile_corpus
from ckpt_compile.planner._measure import wrap_segment

GPT = dict(blocks=4, d=32, heads=4, seq=16, n=2)


def _gpt():
    torch.manual_seed(0)
    return compile_corpus._model("gpt", GPT), compile_corpus._input("gpt", GPT)


def _segmented(model: nn.Module, *spans: tuple[int, int], full: tuple[int, ...] = ()) -> nn.Module:
    model = copy.deepcopy(model)
    for first, last in spans:
        for k, wrapped in zip(range(first, last + 1), wrap_segment([model.blocks[k] for k in range(first, last + 1)])):
            model.blocks[k] = wrapped
    for k in full:
        model.blocks[k] = cc.checkpoint_wrapper(model.blocks[k])
    return model


def _grads(model: nn.Module, x: torch.Tensor, loss=lambda out: out) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss(model(x)).backward()
    return [p.grad for p in model.parameters()]


def _forward_calls(model: nn.Module, x: torch.Tensor) -> list[int]:
    calls = [0] * len(model.blocks)
    inner = [getattr(b, "_checkpoint_wrapped_module", b) for b in model.blocks]
    handles = [m.register_forward_pre_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1)) for k, m in enumerate(inner)]
    try:
        model(x).backward()
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("spans, full", [(((0, 3),), ()), (((0, 1), (2, 3)), ()), (((1, 2),), (0, 3)), (((0, 2),), ())],
                         ids=["all", "two", "middle", "first3"])
def test_gradients_equal_plain_autograd_exactly(spans, full):
    model, x = _gpt()
    want = _grads(copy.deepcopy(model), x)
    segmented = _segmented(model, *spans, full=full)
    for _ in range(2):  # and again: nothing of the first step is left to confuse the second
        got = _grads(segmented, x)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    # Each block runs forward twice: once in the forward, once in its segment's recomputation.
    calls = _forward_calls(segmented, x)
    assert calls == [2 if any(f <= k <= last for f, last in spans) or k in full else 1 for k in range(4)]


def test_a_segment_saves_its_input_once():
    model, x = _gpt()
    block_input = x.shape[0] * GPT["seq"] * GPT["d"] * 4  # float32 (n, seq, d)
    full = cc.saved_tensor_bytes(lambda: _segmented(model, full=(0, 1, 2, 3))(x))
    one = cc.saved_tensor_bytes(lambda: _segmented(model, (0, 3))(x))
    two = cc.saved_tensor_bytes(lambda: _segmented(model, (0, 1), (2, 3))(x))
    # Full checkpointing of each block saves each block's input; a segment only the first's.
    assert full - one == 3 * block_input and full - two == 2 * block_input


def test_recomputation_holds_the_segment_and_the_estimate_agrees():
    """Its recomputation holds the whole segment's activations: a segment over all blocks
    peaks above full per-block checkpointing, below none; estimate and measure agree."""
    model, x = _gpt()
    peaks = {}
    for name, m in [("none", model), ("full", _segmented(model, full=(0, 1, 2, 3))), ("segment", _segmented(model, (0, 3)))]:
        measured = cc.measure_memory(lambda: m(x).backward()).peak_bytes
        estimated = cc.estimate_memory(m, x).peak_bytes
        assert estimated == measured, name
        peaks[name] = measured
    assert peaks["full"] < peaks["segment"] < peaks["none"]


class _Noisy(nn.Module):
    """A block with dropout: the recomputation must draw the forward's masks."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin, self.drop = nn.Linear(d, d), nn.Dropout(0.5)

    def forward(self, x, scale=1.0):
        return x + self.drop(torch.tanh(self.lin(x))) * scale


class _Loop(nn.Module):
    def __init__(self, blocks: int = 3, d: int = 16, between=None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Noisy(d) for _ in range(blocks))
        self.between = between

    def forward(self, x):
        for k, block in enumerate(self.blocks):
            x = block(x, scale=2.0)
            if self.between is not None and k == 0:
                x = self.between(x)
        return x.pow(2).sum()


@pytest.mark.parametrize("between", [None, "mul", "inplace"])
def test_dropout_keywords_and_broken_chains_stay_exact(between):
    """RNG replayed per block, keyword inputs kept; the parent changing the tensor between
    two blocks (a new tensor, or the same one modified in place) breaks the chain there:
    that block keeps its input like a plain checkpoint, and the gradients stay exact."""
    ops = {None: None, "mul": lambda t: t * 1.5, "inplace": lambda t: t.mul_(1.5)}
    torch.manual_seed(0)
    model = _Loop(between=ops[between])
    x = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(1)
    want = _grads(copy.deepcopy(model), x)
    segmented = _segmented(model, (0, 2))
    torch.manual_seed(1)
    got = _grads(segmented, x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    saved = cc.saved_tensor_bytes(lambda: segmented(x))
    full = cc.saved_tensor_bytes(lambda: _segmented(model, full=(0, 1, 2))(x))
    assert saved == (full - 2 * x.nbytes if between is None else full - x.nbytes)


def test_retain_graph_autograd_grad_and_no_grad():
    model, x = _gpt()
    segmented = _segmented(model, (0, 3))
    want = _grads(copy.deepcopy(model), x)
    out = segmented(x)
    params = list(segmented.parameters())
    first = torch.autograd.grad(out, params, retain_graph=True)
    second = torch.autograd.grad(out, params)  # a second backward recomputes again
    assert all(torch.equal(a, b) and torch.equal(b, c) for a, b, c in zip(first, second, want))
    with torch.no_grad():
        assert torch.equal(segmented(x), model(x))


def test_hugging_face_gpt2_chains_through_its_tuple_outputs():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    sizes = dict(blocks=3, d=32, seq=16, n=2)
    model, x = compile_corpus._model("hf_gpt2", sizes), compile_corpus._input("hf_gpt2", sizes)
    want = _grads(copy.deepcopy(model), x)
    segmented = copy.deepcopy(model)
    blocks = segmented.blocks
    for k, wrapped in enumerate(wrap_segment(list(blocks))):
        blocks[k] = wrapped
    got = _grads(segmented, x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    full = copy.deepcopy(model)
    for k in range(3):
        full.blocks[k] = cc.checkpoint_wrapper(full.blocks[k])
    hidden = sizes["n"] * sizes["seq"] * sizes["d"] * 4
    assert cc.saved_tensor_bytes(lambda: full(x)) - cc.saved_tensor_bytes(lambda: segmented(x)) == 2 * hidden


def test_compiled_a_segment_is_per_block_regions_and_gradients_match():
    """Under torch.compile each block of a segment is a plain checkpoint region (Dynamo
    traces the whole loop; the backend decides what to save): no graph break, gradients as
    eager's."""
    model, x = _gpt()
    want = _grads(copy.deepcopy(model), x)
    torch._dynamo.reset()
    compiled = torch.compile(_segmented(model, (0, 3)), backend="ckpt", options={"inner": "eager"}, fullgraph=True)
    got = _grads(compiled, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
