"""``measure_memory``: run a step for real and read its peak of live tensor bytes.

CPU: torch's profiler memory timeline (``profile_memory=True, record_shapes=True,
with_stack=True``; ``MemoryProfileTimeline`` categorises every storage from the recorded
graph), whose rows are live bytes per category over time, tensors alive before the call
included. CUDA: the caching allocator's peak statistics (``max_memory_allocated`` after
``reset_peak_memory_stats``), which cannot tell categories.

The profiler's categories map onto ours: parameter, optimizer state and gradient as named;
input and activation -> activations; temporary, autograd detail and uncategorised ->
temporary. The phase is read from the profiler's own events: the optimizer's
``Optimizer.step`` range, the autograd engine's backward nodes, the forward otherwise (the
loss is not told apart from the forward).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ckpt_compile.memory._step import CATEGORIES, StepMemory, TimelinePoint

__all__ = ["measure_memory"]


def measure_memory(fn: Callable[[], Any]) -> StepMemory:
    """Run ``fn()`` once for real; the peak of live tensor bytes on the device during it,
    everything alive counted (parameters, optimizer state, ... included).

    The device is CUDA when CUDA is available (allocator peak statistics), else the CPU
    (profiler memory timeline). Run one step before, so that the optimizer's state exists.

    >>> import torch, ckpt_compile as cc
    >>> w = torch.randn(512, 512, requires_grad=True)       # 1 MiB
    >>> m = cc.measure_memory(lambda: (w @ w).sum().backward())
    >>> m.peak_bytes >= 3 * 2**20                             # w, w @ w and w.grad
    True
    """
    if not callable(fn):
        raise TypeError(f"ckpt_compile.measure_memory: fn must be a callable taking no arguments, got {fn!r}")
    if torch.cuda.is_available():
        return _measure_cuda(fn, torch.device("cuda", torch.cuda.current_device()))
    return _measure_cpu(fn)


def _measure_cuda(fn, device) -> StepMemory:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    end = torch.cuda.memory_allocated(device)
    unknown = dict.fromkeys(CATEGORIES, 0)
    timeline = (TimelinePoint(0, None, None, (0, 0, 0, 0, start)), TimelinePoint(1, None, None, (0, 0, 0, 0, peak)),
                TimelinePoint(2, None, None, (0, 0, 0, 0, end)))
    return StepMemory(peak_bytes=peak, start_bytes=start, peak_phase=None, peak_module=None,
                      breakdown={**unknown, "temporary": peak}, timeline=timeline,
                      source="measured: CUDA allocator peak (no categories)", device=str(device), unit="op")


def _category_columns():
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category

    ours = {Category.PARAMETER: "parameters", Category.OPTIMIZER_STATE: "optimizer_state",
            Category.GRADIENT: "gradients", Category.INPUT: "activations", Category.ACTIVATION: "activations"}
    # _coalesce_timeline's row: column 0 unused, then one per category in _CATEGORY_TO_INDEX order.
    return {index + 1: CATEGORIES.index(ours.get(category, "temporary")) for category, index in _CATEGORY_TO_INDEX.items()}


def _measure_cpu(fn) -> StepMemory:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    times, rows = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    if not rows:
        return StepMemory(0, 0, None, None, dict.fromkeys(CATEGORIES, 0), (), "measured: CPU profiler memory timeline",
                          "cpu", "us")
    columns = _category_columns()
    phases = _phase_ranges(prof)
    t0 = next((t for t in times if t > 0), 0)
    timeline = []
    for t, row in zip(times, rows):
        values = [0] * len(CATEGORIES)
        for column, index in columns.items():
            values[index] += row[column]
        t = max(t, t0)
        timeline.append(TimelinePoint(t - t0, _phase_at(phases, t), None, tuple(values)))
    peak_point = max(timeline, key=lambda p: p.total)
    return StepMemory(
        peak_bytes=peak_point.total, start_bytes=timeline[0].total, peak_phase=peak_point.phase, peak_module=None,
        breakdown=dict(zip(CATEGORIES, peak_point.bytes)), timeline=tuple(timeline),
        source="measured: CPU profiler memory timeline", device="cpu", unit="us")


def _phase_ranges(prof) -> list[tuple[int, int, str]]:
    """(start us, end us, phase) of the optimizer steps and backward nodes the profiler saw."""
    # Events count microseconds from the trace's start; the memory timeline counts them
    # from the epoch.
    base = prof.profiler.kineto_results.trace_start_ns() / 1000
    ranges = []
    for event in prof.events():
        name = event.name
        if name.startswith("Optimizer.step#") or name.startswith("Optimizer.zero_grad#"):
            phase = "optimizer"
        elif name.startswith("autograd::engine::evaluate_function"):
            phase = "backward"
        else:
            continue
        ranges.append((int(base + event.time_range.start), int(base + event.time_range.end) + 1, phase))
    return ranges


def _phase_at(ranges, t: int) -> str:
    for start, end, phase in ranges:
        if start <= t <= end:
            return phase
    # Between two backward nodes the engine is still in backward: after the first backward
    # node and before the optimizer, call it backward.
    backward = [s for s, _, p in ranges if p == "backward"]
    optimizer = [s for s, _, p in ranges if p == "optimizer"]
    if backward and t >= min(backward) and (not optimizer or t < min(optimizer)):
        return "backward"
    if optimizer and t >= min(optimizer):
        return "optimizer"
    return "forward"
