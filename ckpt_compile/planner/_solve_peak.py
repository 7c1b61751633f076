"""Solve for a step's peak: the cheapest choice per block whose peak is under a budget, exactly.
Knows no torch.

The peak of a training step moves along a chain of blocks. At every moment of the step the
live bytes are a fixed part (parameters, gradients so far, optimizer state, the loss, the
block's own working set) plus the saved activations of the blocks whose backward has not
run yet, which are always a *prefix* of the chain: during block ``k``'s forward, or its
backward (the recomputation of a checkpointed block included), blocks ``0 .. k-1`` hold
what they saved. So the peak of a choice ``a`` is::

    max( max_j  after[j] + prefix_j(a),   max_k  within[k][a_k] + prefix_k(a) )

with ``prefix_j(a)`` the bytes saved by the first ``j`` blocks (neighbours' shared
storages counted once, as in :class:`~._solve.Table`), ``within[k][b]`` the highest live
bytes inside block ``k`` run with option ``b`` less that prefix, and ``after[j]`` the same
for the moments between blocks, when exactly ``j`` blocks hold their saved bytes (``0``:
before the forward and in the optimizer step; ``n``: the loss and the start of the
backward).

:func:`solve_peak` is a dynamic programme over the chain whose state is (the previous
block's option, a Pareto frontier of (prefix bytes, (cost, peak so far))). Pruning on that
pair is exact: the rest of the peak depends on the prefix bytes only and grows with them,
and a strictly cheaper partial plan beats a dearer one whatever their peaks. Checked
against brute force in ``tests/test_plan_peak.py``.

>>> from ckpt_compile.planner._solve import Table
>>> table = Table(base=0, options=(((8, (0,)), (2, (5,))), ((8, (0,)), (2, (5,)))),
...               overlap=(((0, 0), (0, 0)),))
>>> peaks = PeakTable(table, within=((4, 10), (4, 10)), after=(0, 0, 6))
>>> solve_peak(peaks, 30)          # 16 saved + 6 at the start of the backward
PeakChoice(options=(0, 0), peak=22, cost=(0,))
>>> solve_peak(peaks, 20)          # recompute the first: 2 saved + 8 + 6 at the start of the backward
PeakChoice(options=(1, 0), peak=16, cost=(5,))
>>> smallest_peak(peaks).peak
12
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from ._solve import Table, _add, _zero

__all__ = ["PeakTable", "PeakChoice", "solve_peak", "smallest_peak", "peak_of", "brute_force_peak", "prefixes"]

Cost = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PeakTable:
    """``table``: saved bytes, costs and overlaps per block option (``table.base`` is not
    used: bytes saved outside the blocks are part of ``within`` and ``after``);
    ``within[k][b]``, ``after[j]`` (``len(after) == n + 1``): see the module docstring."""

    table: Table
    within: tuple[tuple[int, ...], ...]
    after: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.table.options)
        if len(self.within) != n or any(len(w) != len(o) for w, o in zip(self.within, self.table.options)):
            raise ValueError("PeakTable: within must have one figure per block option")
        if len(self.after) != n + 1:
            raise ValueError(f"PeakTable: {n} blocks need {n + 1} after figures, got {len(self.after)}")


@dataclasses.dataclass(frozen=True)
class PeakChoice:
    """One option index per block, with the plan's peak (as the table predicts it) and cost."""

    options: tuple[int, ...]
    peak: int
    cost: Cost


def prefixes(table: Table, options: Sequence[int]) -> list[int]:
    """``prefix_j`` for ``j = 0 .. n``: bytes saved by the first ``j`` blocks."""
    out = [0]
    for i, a in enumerate(options):
        shared = table.overlap[i - 1][options[i - 1]][a] if i else 0
        out.append(out[-1] + table.options[i][a][0] - shared)
    return out


def peak_of(peaks: PeakTable, options: Sequence[int]) -> tuple[int, Cost]:
    """(peak, cost) of one choice: the formula the solver optimises."""
    prefix = prefixes(peaks.table, options)
    peak = max(peaks.after[j] + prefix[j] for j in range(len(prefix)))
    if options:
        peak = max(peak, max(peaks.within[k][a] + prefix[k] for k, a in enumerate(options)))
    cost = _zero(peaks.table)
    for i, a in enumerate(options):
        cost = _add(cost, peaks.table.options[i][a][1])
    return peak, cost


def solve_peak(peaks: PeakTable, budget: int) -> PeakChoice | None:
    """The cheapest choice whose peak is <= ``budget`` (the lower peak among equally cheap
    ones); None when there is none."""
    return _run(peaks, budget, by_cost=True)


def smallest_peak(peaks: PeakTable) -> PeakChoice:
    """The choice with the lowest peak (the cheapest among those)."""
    choice = _run(peaks, None, by_cost=False)
    assert choice is not None
    return choice


def brute_force_peak(peaks: PeakTable, budget: int) -> PeakChoice | None:
    """Every choice tried (for tests on small tables); None when nothing fits."""
    best = None
    for options in itertools.product(*(range(len(o)) for o in peaks.table.options)):
        peak, cost = peak_of(peaks, options)
        if peak <= budget and (best is None or (cost, peak, options) < best):
            best = (cost, peak, options)
    return None if best is None else PeakChoice(best[2], best[1], best[0])


# ---------------------------------------------------------------- the dynamic programme


def _run(peaks: PeakTable, budget: int | None, by_cost: bool) -> PeakChoice | None:
    table = peaks.table
    n = len(table.options)
    # A point: (prefix bytes, key, path, cost, peak); key orders what the solver minimises.
    start_peak = peaks.after[0]
    if budget is not None and start_peak > budget:
        return None
    if n == 0:
        return PeakChoice((), start_peak, ())

    def key(cost: Cost, peak: int) -> tuple:
        return (cost, peak) if by_cost else (peak, cost)

    frontiers: list[list[tuple]] = [[(0, key(_zero(table), start_peak), (), _zero(table), start_peak)]]
    previous_options = [None]
    for k in range(n):
        nxt = []
        for b, (nbytes, cost) in enumerate(table.options[k]):
            candidates = []
            for a, frontier in zip(previous_options, frontiers):
                shared = table.overlap[k - 1][a][b] if k else 0
                for prefix, _, path, so_far, peak in frontier:
                    grown = prefix + nbytes - shared
                    new_peak = max(peak, prefix + peaks.within[k][b], grown + peaks.after[k + 1])
                    if budget is not None and new_peak > budget:
                        continue
                    new_cost = _add(so_far, cost)
                    candidates.append((grown, key(new_cost, new_peak), path + (b,), new_cost, new_peak))
            nxt.append(_pareto(candidates))
        frontiers = nxt
        previous_options = list(range(len(table.options[k])))
    best = min((point for frontier in frontiers for point in frontier), key=lambda p: (p[1], p[2]), default=None)
    if best is None:
        return None
    return PeakChoice(best[2], best[4], best[3])


def _pareto(points: list[tuple]) -> list[tuple]:
    """Points no other point beats on both prefix bytes and key (ties: smallest path)."""
    kept = []
    best_key = None
    for point in sorted(points, key=lambda p: (p[0], p[1], p[2])):
        if best_key is None or point[1] < best_key:
            kept.append(point)
            best_key = point[1]
    return kept
