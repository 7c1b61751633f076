"""Plan for a step's peak: pose the peak of every moment of the chain, solve, verify, tighten.

Pose: the fixed parts of the step (parameters, gradients, optimizer state, the loss and the
head, each block's own working set) come from ``cc.estimate_memory`` runs of the whole step
on fake tensors: one with no checkpoint, and one or two more in which the blocks of each
kind try the other options (:func:`pose_peaks`: identical blocks measured once). Each point of a run's timeline belongs to a block (the module running, in
forward, in backward or in a checkpointed block's recomputation) or lies between blocks,
when a known prefix of the chain holds its saved bytes (blocks whose forward ran, in the
forward; blocks whose backward has not started, in the backward; none in the optimizer
step). Less that prefix's saved bytes (the measured storage sets of ``_measure``) it gives
``within[k][option]`` or ``after[j]`` of :class:`~._solve_peak.PeakTable`. The model is exact when blocks do not interact beyond what they save; where they
do (a storage two neighbours share, a temporary that outlives a block), the plan's
estimate says so and the solver is run again under a budget lowered by the excess
(``_TIGHTEN`` times at most), so that a returned plan is never over its budget as
``cc.estimate_memory`` estimates it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ._measure import Measurement, wrap
from ._solve import Table
from ._solve_peak import PeakChoice, PeakTable, prefixes, smallest_peak, solve_peak

__all__ = ["PeakResult", "plan_peak", "PeakInfeasible"]

_TIGHTEN = 6


@dataclasses.dataclass(frozen=True)
class PeakResult:
    options: tuple[int, ...]
    estimate: Any  # the StepMemory of the applied plan


class PeakInfeasible(ValueError):
    """No plan's step peak fits; ``smallest`` is the StepMemory of the lowest plan found."""

    def __init__(self, budget: int, smallest: Any, options: tuple[int, ...]) -> None:
        super().__init__(f"no plan peaks at most {budget} bytes; the smallest peak is {smallest.peak_bytes} bytes")
        self.budget = budget
        self.smallest = smallest
        self.options = options


@contextlib.contextmanager
def applied(model: nn.Module, measured: Measurement, options: Sequence[int]):
    """``model`` with block ``k`` run by option ``options[k]``, put back as it was afterwards."""
    swapped = []
    try:
        for block, a in zip(measured.blocks, options):
            option = block.options[a]
            if option.kind == "none":
                continue
            parent_name, _, child = block.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            setattr(parent, child, wrap(original, option))
            swapped.append((parent, child, original))
        yield model
    finally:
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)


def plan_peak(model: nn.Module, measured: Measurement, table: Table, budget: int,
              estimate: Callable[..., Any]) -> PeakResult:
    """The cheapest per-block choice whose estimated step peak is <= ``budget``.
    ``estimate(model, with_optimizer=True)`` is ``cc.estimate_memory`` of one step of
    ``model`` as it is (without its optimizer step when False)."""
    peaks = pose_peaks(model, measured, table, estimate)
    target = budget
    tried: dict[tuple[int, ...], Any] = {}
    for _ in range(_TIGHTEN):
        choice = solve_peak(peaks, target)
        if choice is None:
            break
        if choice.options not in tried:
            with applied(model, measured, choice.options):
                tried[choice.options] = estimate(model)
        step = tried[choice.options]
        if step.peak_bytes <= budget:
            return PeakResult(choice.options, step)
        target -= max(step.peak_bytes - budget, 1)
    raise _infeasible(model, measured, peaks, budget, estimate, tried)


def _infeasible(model, measured, peaks: PeakTable, budget: int, estimate, tried) -> PeakInfeasible:
    lowest: PeakChoice = smallest_peak(peaks)
    if lowest.options not in tried:
        with applied(model, measured, lowest.options):
            tried[lowest.options] = estimate(model)
    options, step = min(tried.items(), key=lambda item: (item[1].peak_bytes, item[0]))
    return PeakInfeasible(budget, step, options)


def pose_peaks(model: nn.Module, measured: Measurement, table: Table, estimate) -> PeakTable:
    """The :class:`PeakTable` of the module docstring.

    Identical blocks are measured once: a block's peak under an option is its peak with no
    checkpoint (one run of the whole step, which also gives every moment between blocks)
    plus what the option adds to its working set (in forward, and in backward with its
    recomputation), the same for every block of its kind. Those differences come from as
    few extra runs as the options of a kind outnumber its blocks (usually one): each run
    gives every block of a kind another option.
    """
    blocks = measured.blocks
    n = len(blocks)
    index = {b.name: k for k, b in enumerate(blocks)}
    kinds: dict[tuple, list[int]] = {}
    for k, b in enumerate(blocks):
        kinds.setdefault((b.cls, b.options, b.recompute_flops, b.forward_flops), []).append(k)
    runs = [tuple(0 for _ in blocks)]
    extra = max((-(-(len(b.options) - 1) // len(ks)) for ks in kinds.values() for b in [blocks[ks[0]]]), default=0)
    for r in range(extra):
        options = [0] * n
        for ks in kinds.values():
            q = len(blocks[ks[0]].options) - 1
            for t, k in enumerate(ks):
                options[k] = 1 + (r * len(ks) + t) % q if q else 0
        runs.append(tuple(options))
    after: list[int | None] = [None] * (n + 1)
    # (forward, backward) residual of each block in each run
    per_run: list[list[list[int | None]]] = []
    # The optimizer's step and state do not depend on the plan: only the first run takes
    # the step (about half of an estimate's time with AdamW); the others count its state,
    # alive from start to end, as the difference of the start bytes.
    state_bytes = 0
    for r, options in enumerate(runs):
        with applied(model, measured, options):
            step = estimate(model, with_optimizer=r == 0)
        if r == 0:
            first = step
        else:
            state_bytes = first.start_bytes - step.start_bytes
        prefix = prefixes(table, options)
        residual: list[list[int | None]] = [[None, None] for _ in blocks]
        for k, j, backward, total in _moments(step.timeline, index, n):
            total += state_bytes
            if k is not None:
                value = total - prefix[k]
                old = residual[k][backward]
                residual[k][backward] = value if old is None else max(old, value)
            else:
                value = total - prefix[j]
                after[j] = value if after[j] is None else max(after[j], value)
        per_run.append(residual)
    # A moment no run saw (a block whose backward runs no op of its own) holds nothing extra.
    floor = min((v for v in after if v is not None), default=0)
    base = [[floor if v is None else v for v in row] for row in per_run[0]]
    # What option b adds to a kind's forward and backward peaks, the most any block showed.
    added: dict[tuple[int, int], list[int]] = {}
    for options, residual in zip(runs[1:], per_run[1:]):
        for kind, ks in enumerate(kinds.values()):
            for k in ks:
                got = [floor if v is None else v for v in residual[k]]
                delta = [got[0] - base[k][0], got[1] - base[k][1]]
                key = (kind, options[k])
                added[key] = [max(a, d) for a, d in zip(added.get(key, delta), delta)]
    within = [None] * n
    for kind, ks in enumerate(kinds.values()):
        for k in ks:
            within[k] = tuple(
                max(base[k][0] + added.get((kind, b), (0, 0))[0], base[k][1] + added.get((kind, b), (0, 0))[1])
                for b in range(len(blocks[k].options)))
    return PeakTable(table, tuple(within), tuple(floor if v is None else v for v in after))


def _moments(timeline, index: dict[str, int], n: int):
    """(block index or None, blocks holding saved bytes, in backward, live bytes) per
    timeline point."""
    done_forward = 0      # blocks whose forward has finished
    first_backward = n    # the lowest block whose backward has started
    for point in timeline:
        k = _block_of(point.module, index)
        if point.phase == "optimizer":
            yield None, 0, 1, point.total
        elif point.phase in ("forward", "loss", None):
            if k is not None:
                done_forward = max(done_forward, k + 1)
                yield k, k, 0, point.total
            else:
                yield None, done_forward, 0, point.total
        else:  # backward
            if k is not None:
                first_backward = min(first_backward, k)
                yield k, k, 1, point.total
            else:
                yield None, first_backward, 1, point.total


def _block_of(module: str | None, index: dict[str, int]) -> int | None:
    while module:
        if module in index:
            return index[module]
        module = module.rpartition(".")[0]
    return None
