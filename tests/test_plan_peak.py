"""``cc.plan(peak_memory=B)``: plans whose step peak, measured for real by
``cc.measure_memory``, is never over the budget, falls as the budget falls, and costs no
more recompute than full checkpointing of the first n blocks; the peak solver against brute
force; errors."""
from __future__ import annotations

import copy
import json
import functools
import itertools
import math
import random
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ckpt_compile as cc
import compile_corpus
from ckpt_compile.planner import _peak
from ckpt_compile.planner._solve import Table
from ckpt_compile.planner._solve_peak import (
    PeakTable, Span, _every_choice, brute_force_peak, peak_of, smallest_peak, solve_peak,
)
from memory_utils import measured

ADAMW = torch.optim.AdamW
# Small, but with activations a fair share of the step (a larger batch than the corpus's "test").
SIZES = {
    "gpt": dict(blocks=3, d=32, heads=4, seq=64, n=8),
    "mlp": dict(blocks=3, d=64, n=512),
    "hf_gpt2": dict(blocks=2, d=32, seq=64, n=8),
}


def _build(name: str):
    torch.manual_seed(0)
    model = compile_corpus._model(name, SIZES[name])
    return model, compile_corpus._input(name, SIZES[name]).detach()


def _smallest_peak(model, x, optimizer=ADAMW) -> int:
    with pytest.raises(ValueError, match="below the smallest feasible step peak") as info:
        cc.plan(model, x, peak_memory=2, optimizer=optimizer)
    return int(re.search(r"\((\d+) bytes, estimated", str(info.value)).group(1))


def _recompute_flops(model, x, baseline: int) -> int:
    """FLOPs of one real training step of ``model`` beyond ``baseline`` (counted by torch)."""
    with FlopCounterMode(display=False) as counter:
        model(x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() - baseline


def _ladder(model, x, n: int):
    """The model with full checkpointing of its first ``n`` blocks."""
    m = copy.deepcopy(model)
    for k in range(n):
        m.blocks[k] = cc.checkpoint_wrapper(m.blocks[k])
    return m


@pytest.mark.parametrize("name", list(SIZES))
def test_peak_sweep_never_over_monotonic_and_beats_the_ladder(name):
    model, x = _build(name)
    none_peak = cc.estimate_memory(model, x, optimizer=ADAMW).peak_bytes
    low = _smallest_peak(model, x)
    assert low < none_peak
    baseline_flops = _recompute_flops(copy.deepcopy(model), x, 0)
    ladder = []
    for n in range(len(model.blocks) + 1):
        m = _ladder(model, x, n)
        ladder.append((measured(m, x, ADAMW).peak_bytes, _recompute_flops(m, x, baseline_flops)))
    previous = None
    for i in range(8):
        budget = low + (none_peak - low) * i // 7
        plan = cc.plan(model, x, peak_memory=budget, optimizer=ADAMW)
        assert plan.predicted_peak_bytes <= budget == plan.peak_budget_bytes
        applied = plan.apply(copy.deepcopy(model))
        real = measured(applied, x, ADAMW).peak_bytes
        assert real <= budget, (name, budget, real, str(plan))
        if previous is not None:
            assert real >= previous, f"{name}: a higher budget measured a lower peak ({real} < {previous})"
        previous = real
        flops = _recompute_flops(applied, x, baseline_flops)
        for n, (ladder_peak, ladder_flops) in enumerate(ladder):
            if ladder_peak <= budget:
                assert flops <= ladder_flops, (name, budget, n, flops, ladder_flops)
    # The top of the sweep is the no-checkpoint peak: nothing recomputed.
    assert plan.predicted_recompute_flops == 0


def _without_segments(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(_peak, "_SEGMENTS", False)
        return fn()


def test_segments_never_cost_more_and_reach_below_every_other_plan(monkeypatch):
    """With segments available the plan at a budget never costs more recompute than the
    best plan without them (and measures under the budget, its FLOPs as predicted); on the
    corpus GPT a segment reaches a step peak no per-block choice reaches."""
    model, x = _build("gpt")
    none_peak = cc.estimate_memory(model, x, optimizer=ADAMW).peak_bytes
    low = _smallest_peak(model, x)
    low_without = _without_segments(monkeypatch, lambda: _smallest_peak(model, x))
    assert low < low_without  # by the input of one block (8 x 64 x 32 floats) here
    baseline_flops = _recompute_flops(copy.deepcopy(model), x, 0)
    for i in range(5):
        budget = low + (none_peak - low) * i // 8
        plan = cc.plan(model, x, peak_memory=budget, optimizer=ADAMW)
        applied = plan.apply(copy.deepcopy(model))
        assert measured(applied, x, ADAMW).peak_bytes <= budget
        assert _recompute_flops(applied, x, baseline_flops) == plan.predicted_recompute_flops
        if budget < low_without:
            with pytest.raises(ValueError, match="below the smallest feasible step peak"):
                _without_segments(monkeypatch, lambda: cc.plan(model, x, peak_memory=budget, optimizer=ADAMW))
            assert any(r.segment for r in plan.blocks), str(plan)
            assert "segment blocks.0-1" in str(plan) and plan.to_dict()["blocks"][0]["segment"] == ["blocks.0", "blocks.1"]
            continue
        without = _without_segments(monkeypatch, lambda: cc.plan(model, x, peak_memory=budget, optimizer=ADAMW))
        assert plan.predicted_recompute_flops <= without.predicted_recompute_flops, (str(plan), str(without))


@pytest.mark.parametrize("optimizer", [ADAMW, functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)],
                         ids=["adamw", "sgd"])
def test_a_plan_verified_without_the_optimizer_step_is_the_full_estimate(optimizer):
    """plan() verifies a plan with a step that skips the optimizer's (taken once, from its
    first estimate): the same peak, phase, module, breakdown and timeline as estimate_memory."""
    from ckpt_compile.planner._blocks import find_blocks
    from ckpt_compile.planner._measure import measure, options_for

    model, x = _build("gpt")
    found = measure(model, (x,), {}, find_blocks(model, None), lambda names: options_for(names, False))
    first = cc.estimate_memory(model, x, optimizer=optimizer)
    for options, segments in [((1, 2, 3), ()), ((1, 1, 0), ((0, 1),)), ((1, 1, 1), ((0, 2),))]:
        with _peak.applied(model, found, options, segments):
            want = cc.estimate_memory(model, x, optimizer=optimizer)
            got = _peak._with_optimizer_of(cc.estimate_memory(model, x), first)
        fields = ("peak_bytes", "start_bytes", "peak_phase", "peak_module", "breakdown")
        assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
        assert [p[1:] for p in got.timeline] == [p[1:] for p in want.timeline]


@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_the_peak_model_of_a_segment_is_the_estimate(name):
    """Every segment the table poses, beside full or no checkpointing of the other blocks:
    the solver's peak formula gives the estimate of the applied plan (exact on these)."""
    from ckpt_compile.planner._blocks import find_blocks
    from ckpt_compile.planner._measure import measure, options_for
    from ckpt_compile.planner._pose import pose

    model, x = _build(name)
    found = measure(model, (x,), {}, find_blocks(model, None), lambda names: options_for(names, False))
    table = pose(found.sizes, found.outside, [b.saved for b in found.blocks])
    peaks, _ = _peak.pose_peaks(model, found, table, lambda m, with_optimizer=True: cc.estimate_memory(
        m, x, optimizer=ADAMW if with_optimizer else None))
    assert {(s.first, s.last) for s in peaks.spans} == {(i, j) for i in range(3) for j in range(i + 1, 3)}
    for span, other in itertools.product(peaks.spans, (0, 1)):
        options = tuple(1 if span.first <= k <= span.last else other for k in range(3))
        with _peak.applied(model, found, options, ((span.first, span.last),)):
            estimated = cc.estimate_memory(model, x, optimizer=ADAMW).peak_bytes
        assert peak_of(peaks, options, ((span.first, span.last),))[0] == estimated, (span, other)


def test_plan_text_and_json_show_the_peak():
    model, x = _build("gpt")
    budget = _smallest_peak(model, x) + 2**16
    plan = cc.plan(model, x, peak_memory=budget, optimizer=ADAMW)
    text = str(plan)
    assert re.search(r"step peak [\d.]+ \w+ at the \w+", text), text
    assert "AdamW" not in text and "optimizer state" in text
    d = plan.to_dict()
    assert d["predicted_peak_bytes"] == plan.predicted_peak_bytes <= budget
    assert sum(d["peak_breakdown"].values()) == plan.predicted_peak_bytes
    assert d["peak_phase"] in cc.memory.PHASES
    assert cc.estimate_memory(plan.apply(model), x, optimizer=ADAMW).peak_bytes == plan.predicted_peak_bytes


def test_infeasible_names_the_smallest_peak_and_what_holds_it():
    model, x = _build("hf_gpt2")
    with pytest.raises(ValueError) as info:
        cc.plan(model, x, peak_memory="1MiB", optimizer=ADAMW)
    text = str(info.value)
    smallest = int(re.search(r"\((\d+) bytes, estimated", text).group(1))
    assert "peak_memory='1MiB'" in text and "parameters " in text and "which no checkpoint choice lowers" in text
    assert "AdamW state" in text and "smaller batch" in text and "chunked loss" in text and "sharding" in text
    # The figure is a real plan's peak: planning for exactly it succeeds.
    assert cc.plan(model, x, peak_memory=smallest, optimizer=ADAMW).predicted_peak_bytes == smallest


def test_sgd_and_no_optimizer_move_the_peak():
    model, x = _build("mlp")
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    assert _smallest_peak(model, x, None) < _smallest_peak(model, x, sgd) < _smallest_peak(model, x, ADAMW)


def test_meta_model_plans_the_same():
    model, x = _build("gpt")
    budget = (_smallest_peak(model, x) + cc.estimate_memory(model, x, optimizer=ADAMW).peak_bytes) // 2
    with torch.device("meta"):
        torch.manual_seed(0)
        meta = compile_corpus._model("gpt", SIZES["gpt"])
    on_meta = cc.plan(meta, x.to("meta"), peak_memory=budget, optimizer=ADAMW)
    assert on_meta.predicted_peak_bytes <= budget
    # On the CPU each checkpointed block also keeps the CPU RNG state (5056 bytes), which a
    # meta-device step does not hold: the meta plan applied to the CPU model is over by no more.
    rng = torch.get_rng_state().nbytes * sum(r.kind == "checkpoint" for r in on_meta.blocks)
    on_cpu = cc.estimate_memory(on_meta.apply(model), x, optimizer=ADAMW).peak_bytes
    assert on_cpu <= budget + rng


def test_budget_arguments():
    model, x = _build("mlp")
    with pytest.raises(TypeError, match="give exactly one, got neither"):
        cc.plan(model, x)
    with pytest.raises(TypeError, match="give exactly one, got both"):
        cc.plan(model, x, memory_budget=0.5, peak_memory="1GiB")
    with pytest.raises(ValueError, match=r"peak_memory=0\.5: a peak is a size, not a fraction"):
        cc.plan(model, x, peak_memory=0.5)
    with pytest.raises(ValueError, match="peak_memory='8 gigs' is not a size"):
        cc.plan(model, x, peak_memory="8 gigs")
    with pytest.raises(TypeError, match="memory_budget counts saved activations only"):
        cc.plan(model, x, memory_budget=0.5, optimizer=ADAMW)


# ---------------------------------------------------------------- the solver


def _random_peaks(rng: random.Random, n: int, spans_too: bool) -> PeakTable:
    options = tuple(tuple((rng.randint(0, 20), (rng.randint(0, 9), rng.randint(0, 3))) for _ in range(rng.randint(1, 3)))
                    for _ in range(n))
    overlap = tuple(tuple(tuple(min(rng.choice((0, 0, 2)), options[i][a][0], options[i + 1][b][0])
                                for b in range(len(options[i + 1]))) for a in range(len(options[i])))
                    for i in range(n - 1))
    within = tuple(tuple(rng.randint(0, 30) for _ in opts) for opts in options)
    # Segments: some runs of 2 or more blocks, saving little, peaking high, costing their blocks'.
    spans = tuple(
        Span(i, j, rng.randint(0, 8), (rng.randint(0, 20), rng.randint(0, 5)), rng.randint(0, 60),
             rng.randrange(len(options[i])),
             tuple(rng.choice((0, 0, 1)) for _ in options[j + 1]) if j + 1 < n else ())
        for i in range(n) for j in range(i + 1, n) if spans_too and rng.random() < 0.4)
    return PeakTable(Table(0, options, overlap), within, tuple(rng.randint(0, 30) for _ in range(n + 1)), spans)


@pytest.mark.parametrize("spans_too", [False, True], ids=["blocks", "segments"])
def test_peak_solver_matches_brute_force(spans_too):
    rng = random.Random(0)
    for _ in range(300):
        peaks = _random_peaks(rng, rng.randint(0, 5), spans_too)
        lowest = smallest_peak(peaks)
        every = [peak_of(peaks, o, sg)[0] for o, sg in _every_choice(peaks)]
        assert len(every) >= math.prod(len(o) for o in peaks.table.options)
        assert lowest.peak == min(every) == peak_of(peaks, lowest.options, lowest.segments)[0]
        for budget in range(lowest.peak - 2, max(every) + 2):
            got, want = solve_peak(peaks, budget), brute_force_peak(peaks, budget)
            if want is None:
                assert got is None, (peaks, budget)
                continue
            # Equal (cost, peak) may come from another choice: the figures must agree.
            assert (got.cost, got.peak) == (want.cost, want.peak), (peaks, budget)
            assert peak_of(peaks, got.options, got.segments) == (got.peak, got.cost)


# ---------------------------------------------------------------- the command line


def test_cli_plan_peak_memory(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "mymodels.py").write_text(
        "import torch, compile_corpus\n"
        f"SIZES = {SIZES['gpt']!r}\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return compile_corpus._model('gpt', SIZES), compile_corpus._input('gpt', SIZES)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(__file__)])}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ckpt_compile", "plan", "mymodels:make", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    done = run("--peak-memory", "8GiB", "--optimizer", "adamw", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    model, x = _build("gpt")
    want = cc.plan(model, x, peak_memory="8GiB", optimizer=ADAMW)
    assert got["predicted_peak_bytes"] == want.predicted_peak_bytes and got["peak_budget_bytes"] == 8 * 2**30
    low = run("--peak-memory", "1MiB", "--optimizer", "adamw")
    assert low.returncode == 2 and "peak_memory='1MiB' (1.00 MiB) is below the smallest feasible step peak" in low.stderr
    both = run("--peak-memory", "1GiB", "--memory-budget", "0.5")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    fraction = run("--peak-memory", "0.5")
    assert fraction.returncode == 2 and "--peak-memory='0.5': a peak is a size, not a fraction" in fraction.stderr


# ---------------------------------------------------------------- compiled


def test_compiled_plan_stays_under_the_peak_budget():
    """plan.apply + torch.compile(backend="ckpt"): the compiled step (inductor fuses the
    elementwise temporaries away) measures under the budget planned for the eager step."""
    torch.manual_seed(0)
    sizes = dict(SIZES["gpt"], blocks=2)
    model, x = compile_corpus._model("gpt", sizes), compile_corpus._input("gpt", sizes)
    eager_none = cc.estimate_memory(model, x, optimizer=ADAMW).peak_bytes
    budget = _smallest_peak(model, x)
    plan = cc.plan(model, x, peak_memory=budget, optimizer=ADAMW)
    assert any(r.kind == "checkpoint" for r in plan.blocks) and budget < eager_none
    compiled = torch.compile(plan.apply(copy.deepcopy(model)), backend="ckpt")
    assert measured(compiled, x, ADAMW).peak_bytes <= budget
