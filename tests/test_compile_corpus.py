"""backend="ckpt" never saves more than stock torch.compile, and per-block checkpointing
never saves more than no checkpointing (issue 14); a lower memory_budget never saves or
retains more (issue 20).

Each corpus model (tests/compile_corpus.py: an mm stack, an MLP, a conv net, a pre-LN GPT
with SDPA and a mask buffer, Hugging Face GPT-2 and Llama built from configs, GPT-2 and
BERT with their default dropout 0.1, compared under fallback_random) is compiled
with both backends for the same regions; saved bytes are unique storages seen by a
saved_tensors_hooks pack hook (deterministic), gradients are compared with eager.
torch.utils.checkpoint and checkpoint_wrapper regions lower to the same graph as
ckpt_compile.checkpoint under compile: they are compiled with backend="ckpt" on three of
the models (test time) and must save exactly what ckpt_compile.checkpoint saves.
"""
from __future__ import annotations

import contextlib
import functools
import re

import pytest
import torch

import compile_corpus as corpus

SAME_GRAPH_WRAPS = ("torch_checkpoint", "checkpoint_wrapper")
SAME_GRAPH_MODELS = ("mm_stack", "mlp", "hf_gpt2")


def _needs(name):
    if name in corpus.HF_MODELS:
        pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _dynamo_limits():
    # Every corpus model of one class shares its forward's code object.
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        yield
    torch._dynamo.reset()


def _random_as_eager(name):
    """Dropout models run with inductor's fallback_random: compiled dropout draws eager's
    numbers (each step seeded alike), so gradients compare with eager's exactly."""
    if name in corpus.DROPOUT_MODELS:
        return torch._inductor.config.patch(fallback_random=True)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def measured(name, wrap, backend):
    """(saved bytes, loss, grads) of one compiled step, and the eager step's (loss, grads)."""
    model, x = corpus.build(name, wrap)
    with _random_as_eager(name):
        fn = torch.compile(model, backend=backend)
        got = corpus.step(model, fn, x)
        nbytes = corpus.saved_bytes(model, fn, x)
    want = corpus.step(model, model, x) if backend == "ckpt" else None
    return nbytes, got, want


def _cases(wraps):
    # The dropout models (two inductor compiles each, about 30 s) skip the selective
    # policy, which their dropout-free twins cover.
    return [(n, w) for n in corpus.MODELS for w in wraps if not (n in corpus.DROPOUT_MODELS and w == "selective")]


@pytest.mark.parametrize("name, wrap", _cases(["none", "ckpt_checkpoint", "selective"]))
def test_saves_no_more_than_torch_compile_and_grads_match_eager(name, wrap):
    _needs(name)
    ours, got, want = measured(name, wrap, "ckpt")
    theirs = measured(name, wrap, "inductor")[0]
    assert ours <= theirs, f"{name}/{wrap}: backend='ckpt' saves {ours} bytes, torch.compile {theirs}"
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, wrap", _cases(["ckpt_checkpoint", "selective"]))
def test_checkpointing_saves_no_more_than_no_checkpointing(name, wrap):
    _needs(name)
    assert measured(name, wrap, "ckpt")[0] <= measured(name, "none", "ckpt")[0]


@pytest.mark.parametrize("wrap", SAME_GRAPH_WRAPS)
@pytest.mark.parametrize("name", SAME_GRAPH_MODELS)
def test_torch_checkpoint_and_wrapper_save_what_ckpt_checkpoint_saves(name, wrap):
    _needs(name)
    ours, got, want = measured(name, wrap, "ckpt")
    assert ours == measured(name, "ckpt_checkpoint", "ckpt")[0]
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- why each value is saved


def test_explain_says_why_each_value_is_saved():
    from ckpt_compile.passes.saving import WHY

    import ckpt_compile as cc

    plain = cc.explain(*corpus.build("mm_stack", "ckpt_checkpoint"), inner="eager")
    selective = cc.explain(*corpus.build("mm_stack", "selective"), inner="eager")
    budget = cc.explain(*corpus.build("mm_stack", "none"), inner="eager", memory_budget=0.5)
    for report in (plain, selective, budget):
        assert {row["why"] for row in report.saved_values} <= set(WHY)
        assert sum(row["bytes"] for row in report.saved_values) == report.saved_bytes
        assert "why saved" in str(report)
    # Per-block regions: the three inputs of blocks 2-4 (block 1's is the model input).
    assert [row["why"] for row in plain.saved_values] == ["boundary"] * 3
    assert [row["region"] for row in plain.saved_values] == [0, 1, 2]
    # MUST_SAVE matmuls: the boundaries are rebuilt from them (x + tanh(mm)), not saved.
    assert {row["why"] for row in selective.saved_values} == {"policy"}
    assert budget.saved_by_reason["budget"]["bytes"] == budget.saved_bytes


def test_report_from_older_json_has_no_reasons():
    import ckpt_compile as cc

    report = cc.explain(*corpus.build("mm_stack", "ckpt_checkpoint"), inner="eager")
    document = report.to_dict()
    for graph in document["graphs"]:
        del graph["saved_values"]  # what a report written before reasons were recorded holds
    del document["saved_by_reason"]
    old = cc.Report.from_dict(document)
    assert old.saved_values == [] and old.saved_by_reason == {}
    assert old.saved_bytes == report.saved_bytes and "why saved" not in str(old)
    assert cc.Report.from_dict(report.to_dict()) == report


# ---------------------------------------------------------------- monotonic in the budget


def _floor(model, x):
    """The smallest feasible memory_budget of ``model`` (no regions), as the error names it."""
    torch._dynamo.reset()
    fn = torch.compile(model, backend="ckpt", options={"inner": "eager", "memory_budget": 1e-4})
    try:
        fn(x).backward()
    except Exception as err:
        found = re.search(r"(?:Use memory_budget >=|the smallest feasible budget is) ([0-9]+(?:\.[0-9]+)?)", str(err))
        assert found, f"an infeasible budget must name the smallest feasible one, got: {err}"
        return float(found.group(1))
    return 1e-4


@pytest.mark.parametrize("name", corpus.MODELS)
def test_a_lower_budget_never_saves_or_retains_more(name):
    """pytorch#197838: torch.compile's peak is not monotonic in activation_memory_budget.
    Ten budgets from 1.0 down to the smallest feasible one, no checkpoint regions (the
    budget decides everything); saved bytes (pack hook) and bytes retained after the
    forward (profiler memory timeline) never go up as the budget goes down."""
    _needs(name)
    model, x = corpus.build(name, "none")
    with _random_as_eager(name):
        floor = _floor(model, x)
        budgets = [1.0 - k * (1.0 - floor) / 9 for k in range(10)]
        rows = []
        for budget in budgets:
            torch._dynamo.reset()
            fn = torch.compile(model, backend="ckpt", options={"inner": "eager", "memory_budget": budget})
            saved = corpus.saved_bytes(model, fn, x)
            retained = corpus.retained_after_forward(lambda: fn(x))
            rows.append((round(budget, 4), saved, retained))
    for (b0, s0, r0), (b1, s1, r1) in zip(rows, rows[1:]):
        assert s1 <= s0 and r1 <= r0, f"{name}: budget {b0} -> {b1} saves {s0} -> {s1}, retains {r0} -> {r1}: {rows}"
    assert rows[-1][1] < rows[0][1], f"{name}: the budget changed nothing: {rows}"
