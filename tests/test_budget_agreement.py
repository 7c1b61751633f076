"""The planner's and the backend's saved bytes are what a real forward leaves allocated for
the backward: torch.profiler's memory timeline ("retained after forward", parameters and
inputs not counted, see ``compile_corpus.retained_after_forward``), on corpus models.

Tolerance: none (equal bytes) on our corpus models, for the planner (eager, after
``plan.apply``) and for the backend (``inner="eager"``: the partitioned graphs run as they
are, so each saved value is its own tensor; inductor may fold a saved view and its base
into one buffer, which the report counts twice). Hugging Face models: 2%. Under
fake tensors Hugging Face builds a 4D causal mask (batch x 1 x seq x seq floats) for each
layer's attention, which the real forward skips (SDPA's ``is_causal``); the planner counts
those masks, so it over-predicts by that much (16 KiB of 1 MiB on the GPT-2 here).
"""
from __future__ import annotations

import copy

import pytest
import torch

import ckpt_compile as cc
import compile_corpus as corpus
from compile_corpus import retained_after_forward


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            model, x = corpus.build(name, "none")
            cache[name] = (model, x, retained_after_forward(lambda: model(x)))
        return cache[name]

    return get


# (model, budget): budgets above each model's smallest feasible one (the conv net's stem
# and loss save half of its bytes outside the blocks).
CASES = [("mlp", 1.0), ("mlp", 0.5), ("gpt", 1.0), ("gpt", 0.5), ("gpt", 0.3), ("conv", 1.0), ("conv", 0.8)]


@pytest.mark.parametrize("name, budget", CASES)
def test_plan_predicts_the_retained_bytes_exactly(built, name, budget):
    model, x, no_checkpoint = built(name)
    plan = cc.plan(model, x, memory_budget=budget)
    assert plan.baseline_saved_bytes == no_checkpoint
    planned = plan.apply(copy.deepcopy(model))
    assert retained_after_forward(lambda: planned(x)) == plan.predicted_saved_bytes <= plan.budget_bytes


@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_half_the_budget_retains_at_most_half(built, name):
    # Issue 18: at 0.5 the plan retained more than half (GPT) and more than no checkpointing
    # at all (MLP), because parameters counted as saved bytes.
    model, x, no_checkpoint = built(name)
    planned = cc.plan(model, x, memory_budget=0.5).apply(copy.deepcopy(model))
    assert retained_after_forward(lambda: planned(x)) <= 0.5 * no_checkpoint


def test_plan_on_hugging_face_gpt2_within_two_percent():
    pytest.importorskip("transformers")
    model, x = corpus.build("hf_gpt2", "none")
    no_checkpoint = retained_after_forward(lambda: model(x))
    plan = cc.plan(model, x, memory_budget=0.5)
    assert abs(plan.baseline_saved_bytes - no_checkpoint) <= 0.02 * no_checkpoint
    planned = plan.apply(copy.deepcopy(model))
    measured = retained_after_forward(lambda: planned(x))
    assert abs(measured - plan.predicted_saved_bytes) <= 0.02 * plan.predicted_saved_bytes
    assert measured <= 0.5 * no_checkpoint


@pytest.mark.parametrize("name, wrap, budget", [("mlp", "none", 1.0), ("mlp", "none", 0.5),
                                                ("gpt", "none", 1.0), ("gpt", "torch_checkpoint", 1.0)])
def test_backend_report_is_the_retained_bytes(name, wrap, budget):
    model, x = corpus.build(name, wrap)
    torch._dynamo.reset()
    report = cc.explain(copy.deepcopy(model), x, inner="eager", memory_budget=budget)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ckpt", options={"inner": "eager", "memory_budget": budget})
    compiled(x)  # compile outside the profile
    assert retained_after_forward(lambda: compiled(x)) == report.saved_bytes
    if budget < 1:
        assert report.saved_bytes <= budget * report.baseline["saved_bytes"]
