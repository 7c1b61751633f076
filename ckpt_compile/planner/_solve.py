"""Solve: the cheapest choice per block under a byte budget, exactly. Knows no torch.

The problem (:class:`Table`) is a chain of blocks, each with a few options (saved bytes,
recompute cost). Total saved bytes are ``base`` plus every chosen option's bytes, minus
what two neighbouring choices both count: a block's output that the next block saves as
its input is one tensor, not two (``overlap[i][a][b]``: bytes that option ``a`` of block
``i`` and option ``b`` of block ``i + 1`` share). Costs are tuples compared
lexicographically (recompute FLOPs first, then a tie-breaker), added element-wise.

:func:`solve` is a dynamic programme over the chain whose state is (the previous block's
option, a Pareto frontier of (bytes, cost)): exact in bytes, no bucketing, so it returns a
cheapest plan among all plans within the budget (a multiple-choice knapsack with
neighbour interactions). Checked against brute force in ``tests/test_planner_solve.py``.

>>> table = Table(base=10, options=(((8, (0,)), (2, (5,))), ((8, (0,)), (2, (5,)))),
...               overlap=(((0, 0), (0, 0)),))
>>> solve(table, 20)          # 10 + 8 + 2 bytes: keep one block whole, recompute the other
Choice(options=(0, 1), nbytes=20, cost=(5,))
>>> smallest_budget(table)
14
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

__all__ = ["Table", "Choice", "Infeasible", "solve", "smallest_budget", "brute_force", "total"]

Cost = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Table:
    """``options[i][a] = (bytes, cost)``; ``overlap[i][a][b]`` bytes shared by option ``a``
    of block ``i`` and option ``b`` of block ``i + 1`` (``len(options) - 1`` matrices)."""

    base: int
    options: tuple[tuple[tuple[int, Cost], ...], ...]
    overlap: tuple[tuple[tuple[int, ...], ...], ...]

    def __post_init__(self) -> None:
        if len(self.overlap) != max(len(self.options) - 1, 0):
            raise ValueError(f"Table: {len(self.options)} blocks need {len(self.options) - 1} overlap matrices, got {len(self.overlap)}")
        for i, matrix in enumerate(self.overlap):
            if len(matrix) != len(self.options[i]) or any(len(row) != len(self.options[i + 1]) for row in matrix):
                raise ValueError(f"Table: overlap[{i}] must be {len(self.options[i])} x {len(self.options[i + 1])}")


@dataclasses.dataclass(frozen=True)
class Choice:
    """One option index per block, with the plan's total bytes and cost."""

    options: tuple[int, ...]
    nbytes: int
    cost: Cost


class Infeasible(ValueError):
    """No plan fits the budget; ``smallest`` is the smallest budget that has one."""

    def __init__(self, budget: int, smallest: int) -> None:
        super().__init__(f"no plan saves at most {budget} bytes; the smallest feasible budget is {smallest} bytes")
        self.budget = budget
        self.smallest = smallest


def total(table: Table, options: Sequence[int]) -> tuple[int, Cost]:
    """(bytes, cost) of one choice of options: the formula the solver optimises."""
    nbytes = table.base + sum(table.options[i][a][0] for i, a in enumerate(options))
    nbytes -= sum(table.overlap[i][a][b] for i, (a, b) in enumerate(zip(options, options[1:])))
    cost = _zero(table)
    for i, a in enumerate(options):
        cost = _add(cost, table.options[i][a][1])
    return nbytes, cost


def solve(table: Table, budget: int) -> Choice:
    """The cheapest choice whose total bytes are <= ``budget`` (fewest bytes among equally
    cheap ones, then the lexicographically smallest option indices). Raises
    :class:`Infeasible` when there is none."""
    if not table.options:
        if table.base > budget:
            raise Infeasible(budget, table.base)
        return Choice((), table.base, ())
    frontiers = _frontiers(table, budget - table.base)
    best = None
    for frontier in frontiers:
        for nbytes, cost, path in frontier:
            key = (cost, nbytes, path)
            if best is None or key < best:
                best = key
    if best is None:
        raise Infeasible(budget, smallest_budget(table))
    cost, nbytes, path = best
    return Choice(path, table.base + nbytes, cost)


def smallest_budget(table: Table) -> int:
    """The fewest bytes any choice saves."""
    if not table.options:
        return table.base
    # Minimising bytes alone: a frontier over bytes with every cost equal.
    flat = Table(table.base, tuple(tuple((b, ()) for b, _ in opts) for opts in table.options), table.overlap)
    return table.base + min(nbytes for frontier in _frontiers(flat, None) for nbytes, _, _ in frontier)


def brute_force(table: Table, budget: int) -> Choice | None:
    """Every choice tried (for tests on small tables); None when nothing fits."""
    best = None
    for options in itertools.product(*(range(len(opts)) for opts in table.options)):
        nbytes, cost = total(table, options)
        if nbytes <= budget and (best is None or (cost, nbytes, options) < best):
            best = (cost, nbytes, options)
    return None if best is None else Choice(best[2], best[1], best[0])


# ---------------------------------------------------------------- the dynamic programme


def _frontiers(table: Table, limit: int | None) -> list[list[tuple[int, Cost, tuple[int, ...]]]]:
    """Per option of the last block, the Pareto-optimal (bytes, cost, path) of the chain,
    bytes counted without ``base`` and kept <= ``limit`` (None: no limit).

    Bytes never decrease along the chain (an overlap is part of the later option's bytes),
    so dropping a partial plan over the limit loses nothing.
    """
    frontiers = []
    for a, (nbytes, cost) in enumerate(table.options[0]):
        frontiers.append(_pareto([(nbytes, cost, (a,))], limit))
    for i in range(1, len(table.options)):
        nxt = []
        for b, (nbytes, cost) in enumerate(table.options[i]):
            candidates = [
                (prev_bytes + nbytes - table.overlap[i - 1][a][b], _add(prev_cost, cost), path + (b,))
                for a, frontier in enumerate(frontiers)
                for prev_bytes, prev_cost, path in frontier
            ]
            nxt.append(_pareto(candidates, limit))
        frontiers = nxt
    return frontiers


def _pareto(points: list[tuple[int, Cost, tuple[int, ...]]], limit: int | None) -> list[tuple[int, Cost, tuple[int, ...]]]:
    """Points no other point beats on both bytes and cost (ties: smallest path kept)."""
    kept = []
    best_cost = None
    for point in sorted(points, key=lambda p: (p[0], p[1], p[2])):
        if limit is not None and point[0] > limit:
            break
        if best_cost is None or point[1] < best_cost:
            kept.append(point)
            best_cost = point[1]
    return kept


def _add(a: Cost, b: Cost) -> Cost:
    if not a:
        return tuple(b)
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _zero(table: Table) -> Cost:
    for opts in table.options:
        for _, cost in opts:
            return tuple(0 for _ in cost)
    return ()
