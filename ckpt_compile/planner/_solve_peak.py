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

A segment (one checkpoint over blocks ``i .. j``, :class:`Span`) is one item of the chain
in place of those blocks' options: it adds its saved bytes (its input) to the prefix, and
its own figure, ``peak``, covers every moment from its first forward to its last backward
above the bytes saved before it (its recomputation holds all its blocks' activations).

:func:`solve_peak` is a dynamic programme over the positions of the chain: the partial
plans that end at a position (after a block's option, or after a segment), grouped by what
the next block can share with their last item (its overlap row), each group a Pareto
frontier of (prefix bytes, (cost, peak so far)). Pruning on that pair is exact: the rest of
the peak depends on the prefix bytes and the row only and grows with the prefix, and a
strictly cheaper partial plan beats a dearer one whatever their peaks. Checked against
brute force, segments included, in ``tests/test_plan_peak.py``.

>>> from ckpt_compile.planner._solve import Table
>>> table = Table(base=0, options=(((8, (0,)), (2, (5,))), ((8, (0,)), (2, (5,)))),
...               overlap=(((0, 0), (0, 0)),))
>>> peaks = PeakTable(table, within=((4, 10), (4, 10)), after=(0, 0, 6))
>>> solve_peak(peaks, 30)          # 16 saved + 6 at the start of the backward
PeakChoice(options=(0, 0), peak=22, cost=(0,), segments=())
>>> solve_peak(peaks, 20)          # recompute the first: 2 saved + 8 + 6 at the start of the backward
PeakChoice(options=(1, 0), peak=16, cost=(5,), segments=())
>>> smallest_peak(peaks).peak
12
>>> # One checkpoint over both: 1 byte saved, its recomputation at 11 (both blocks' 8 + 3).
>>> both = PeakTable(table, peaks.within, peaks.after, spans=(Span(0, 1, 1, (10,), 11, head=1),))
>>> smallest_peak(both)
PeakChoice(options=(1, 1), peak=11, cost=(10,), segments=((0, 1),))
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from ._solve import Table, _add, _zero

__all__ = ["PeakTable", "PeakChoice", "Span", "solve_peak", "smallest_peak", "peak_of", "brute_force_peak", "prefixes"]

Cost = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Span:
    """One checkpoint over blocks ``first .. last`` (a segment, ``last > first``).

    ``nbytes``: what it saves (its input, table conventions); ``head``: the option of block
    ``first`` whose ``overlap`` with the block before it applies (the segment saves what
    that option saves there); ``next_overlap[b]``: bytes it shares with option ``b`` of
    block ``last + 1``; ``cost``: its recompute; ``peak``: its highest moment, less the
    bytes saved before it (its recomputation in the backward holds all its blocks'
    activations at once)."""

    first: int
    last: int
    nbytes: int
    cost: Cost
    peak: int
    head: int
    next_overlap: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class PeakTable:
    """``table``: saved bytes, costs and overlaps per block option (``table.base`` is not
    used: bytes saved outside the blocks are part of ``within`` and ``after``);
    ``within[k][b]``, ``after[j]`` (``len(after) == n + 1``): see the module docstring;
    ``spans``: the segments a plan may use instead of per-block options."""

    table: Table
    within: tuple[tuple[int, ...], ...]
    after: tuple[int, ...]
    spans: tuple[Span, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.table.options)
        if len(self.within) != n or any(len(w) != len(o) for w, o in zip(self.within, self.table.options)):
            raise ValueError("PeakTable: within must have one figure per block option")
        if len(self.after) != n + 1:
            raise ValueError(f"PeakTable: {n} blocks need {n + 1} after figures, got {len(self.after)}")
        for s in self.spans:
            width = len(self.table.options[s.last + 1]) if s.last + 1 < n else 0
            if not 0 <= s.first < s.last < n or len(s.next_overlap) != width:
                raise ValueError(f"PeakTable: bad span {s}")


@dataclasses.dataclass(frozen=True)
class PeakChoice:
    """One option index per block, with the plan's peak (as the table predicts it) and cost;
    ``segments``: the (first, last) blocks of each segment used (their blocks' entries in
    ``options`` are the spans' ``head`` options)."""

    options: tuple[int, ...]
    peak: int
    cost: Cost
    segments: tuple[tuple[int, int], ...] = ()


def prefixes(table: Table, options: Sequence[int]) -> list[int]:
    """``prefix_j`` for ``j = 0 .. n``: bytes saved by the first ``j`` blocks."""
    out = [0]
    for i, a in enumerate(options):
        shared = table.overlap[i - 1][options[i - 1]][a] if i else 0
        out.append(out[-1] + table.options[i][a][0] - shared)
    return out


def _items(peaks: PeakTable, options: Sequence[int], segments: Sequence[tuple[int, int]]):
    """(first, last, nbytes, cost, peak above the prefix, overlap row toward the next block,
    option of ``first`` for the overlap with the block before) of each item of a plan."""
    table = peaks.table
    spans = {(s.first, s.last): s for s in peaks.spans}
    starts = {first: (first, last) for first, last in segments}
    k, n = 0, len(options)
    while k < n:
        if k in starts:
            s = spans[starts[k]]
            yield s.first, s.last, s.nbytes, s.cost, s.peak, s.next_overlap, s.head
            k = s.last + 1
        else:
            a = options[k]
            row = table.overlap[k][a] if k + 1 < n else ()
            yield k, k, table.options[k][a][0], table.options[k][a][1], peaks.within[k][a], row, a
            k += 1


def peak_of(peaks: PeakTable, options: Sequence[int], segments: Sequence[tuple[int, int]] = ()) -> tuple[int, Cost]:
    """(peak, cost) of one choice: the formula the solver optimises."""
    prefix, row = 0, None
    peak = peaks.after[0]
    cost = _zero(peaks.table)
    for first, last, nbytes, item_cost, item_peak, next_row, head in _items(peaks, options, segments):
        peak = max(peak, prefix + item_peak)
        prefix += nbytes - (row[head] if row else 0)
        peak = max(peak, prefix + peaks.after[last + 1])
        cost = _add(cost, item_cost)
        row = next_row
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
    """Every choice tried, segments included (for tests on small tables); None when
    nothing fits."""
    best = None
    for options, segments in _every_choice(peaks):
        peak, cost = peak_of(peaks, options, segments)
        if peak <= budget and (best is None or (cost, peak) < best[:2]):
            best = (cost, peak, options, segments)
    return None if best is None else PeakChoice(best[2], best[1], best[0], best[3])


def _every_choice(peaks: PeakTable):
    n = len(peaks.table.options)
    starting: dict[int, list[Span]] = {}
    for s in peaks.spans:
        starting.setdefault(s.first, []).append(s)

    def rest(k: int):
        if k == n:
            yield (), ()
            return
        for a in range(len(peaks.table.options[k])):
            for options, segments in rest(k + 1):
                yield (a, *options), segments
        for s in starting.get(k, ()):
            for options, segments in rest(s.last + 1):
                yield (s.head,) * (s.last - s.first + 1) + options, ((s.first, s.last), *segments)

    yield from rest(0)


# ---------------------------------------------------------------- the dynamic programme


def _run(peaks: PeakTable, budget: int | None, by_cost: bool) -> PeakChoice | None:
    """Positions 0 .. n of the chain; at each, the partial plans that end there, grouped by
    their overlap row toward the next block (the only thing later items need of the last
    one), each group a Pareto frontier of (prefix bytes, key). A path is a tuple of items:
    an option index (one block), or ``-1 - s`` for span ``s`` (several)."""
    table = peaks.table
    n = len(table.options)
    start_peak = peaks.after[0]
    if budget is not None and start_peak > budget:
        return None
    if n == 0:
        return PeakChoice((), start_peak, ())

    def key(cost: Cost, peak: int) -> tuple:
        return (cost, peak) if by_cost else (peak, cost)

    starting: list[list[int]] = [[] for _ in range(n)]
    for index, s in enumerate(peaks.spans):
        starting[s.first].append(index)
    zero = _zero(table)
    # arriving[k][row]: points (prefix, key, path, cost, peak) of plans covering blocks < k
    arriving: list[dict[tuple, list]] = [{} for _ in range(n + 1)]
    arriving[0][tuple(0 for _ in table.options[0])] = [(0, key(zero, start_peak), (), zero, start_peak)]
    for k in range(n):
        for row, points in arriving[k].items():
            points = _pareto(points)
            items = [(b, k, nbytes, cost, peaks.within[k][b], b, table.overlap[k][b] if k + 1 < n else ())
                     for b, (nbytes, cost) in enumerate(table.options[k])]
            items += [(-1 - i, s.last, s.nbytes, s.cost, s.peak, s.head, s.next_overlap)
                      for i in starting[k] for s in [peaks.spans[i]]]
            for item, last, nbytes, cost, item_peak, head, next_row in items:
                shared = row[head]
                after = peaks.after[last + 1]
                out = arriving[last + 1].setdefault(next_row, [])
                for prefix, _, path, so_far, peak in points:
                    grown = prefix + nbytes - shared
                    new_peak = max(peak, prefix + item_peak, grown + after)
                    if budget is not None and new_peak > budget:
                        continue
                    new_cost = _add(so_far, cost)
                    out.append((grown, key(new_cost, new_peak), path + (item,), new_cost, new_peak))
        arriving[k] = {}
    best = min((p for points in arriving[n].values() for p in points), key=lambda p: (p[1], p[2]), default=None)
    if best is None:
        return None
    options: list[int] = []
    segments = []
    for item in best[2]:
        if item >= 0:
            options.append(item)
        else:
            s = peaks.spans[-1 - item]
            options.extend([s.head] * (s.last - s.first + 1))
            segments.append((s.first, s.last))
    return PeakChoice(tuple(options), best[4], best[3], tuple(segments))


def _pareto(points: list[tuple]) -> list[tuple]:
    """Points no other point beats on both prefix bytes and key (ties: smallest path)."""
    kept = []
    best_key = None
    for point in sorted(points, key=lambda p: (p[0], p[1], p[2])):
        if best_key is None or point[1] < best_key:
            kept.append(point)
            best_key = point[1]
    return kept
