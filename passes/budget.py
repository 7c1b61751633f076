"""The budget solver: the fewest recompute FLOPs among plans that save at most a byte limit.

Built on :mod:`.mincut` (every cut it takes is a networkx min cut there); this module
knows neither torch nor networkx. Exact enumeration for small problems; above that a
Lagrangian hull walk, then two local searches in the knapsack gap between hull vertices:
a greedy fill of the budget left over and a swap search (save one costly value, recompute
cheaper ones instead).

Example: a chain ``a -> b -> c`` (``a`` an input, free to keep) where the backward reads
``b`` and ``c``. Saving both costs 12 bytes and no recompute; under a 9-byte limit the
best plan keeps ``c`` and recomputes ``b`` from ``a`` (4 bytes, 1 FLOP)::

    >>> from ckpt_compile.passes.problem import Problem
    >>> chain = Problem(names=("a", "b", "c"), edges=((0, 1), (1, 2)), nbytes=(0, 8, 4),
    ...     save_weight=(0, 8, 4), recompute_cost=(0, 1, 1), must_save=frozenset({0}),
    ...     soft_banned=frozenset(), needed=frozenset({1, 2}))
    >>> cut = budget_cut(chain, 9)
    >>> cut.saved, cut.recomputed
    ((0, 2), (1,))
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, NamedTuple

from .mincut import BudgetTooSmall, Cut, min_cut, plan_cost, saved_of, segment_walk

__all__ = ["budget_cut", "EXACT_LIMIT"]

# Above this many recomputable values the budget solver walks the Lagrangian hull instead
# of enumerating (2**16 plans take ~0.5 s in Python; the hull walk is a few max-flows).
EXACT_LIMIT = 16


def budget_cut(problem: Any, max_bytes: int, *, exact_limit: int = EXACT_LIMIT) -> Cut:
    """Fewest recompute FLOPs among plans saving at most ``max_bytes`` (ties: fewer bytes).

    Only ``must_save`` bans hold here (``soft_banned`` values may be recomputed). Exact by
    enumeration up to ``exact_limit`` recomputable values. Above it, an approximation:
    the two vertices of the lower convex hull of (bytes, FLOPs) around the budget, found by
    a Lagrangian search (Eisner-Severance) with integer prices, one min cut per step; then
    a walk along the hull edge between them (:func:`.mincut.segment_walk`), a greedy fill of
    what is left of the budget (:func:`_fill`), then a swap search (:func:`_swap_search`).
    Hull plans are optimal at their own bytes; between vertices the plan may recompute
    more than the optimum (a knapsack). The walk keeps saved bytes monotone in
    ``max_bytes``; fill and swaps only spend budget left over (monotonicity is checked on
    random problems and real joint graphs by the tests).
    Raises :class:`BudgetTooSmall` when even recomputing everything allowed saves more.
    """
    hard = problem.must_save
    total_bytes = sum(problem.nbytes) + 1
    total_flops = sum(problem.recompute_cost) + 1
    low = _point(problem, min_cut(problem, byte_scale=total_flops, flop_price=1, weighted=False, banned=hard))
    if low[0] > max_bytes:
        raise BudgetTooSmall(max_bytes, low[0])
    free = [i for i in range(len(problem)) if i not in hard]
    if len(free) <= exact_limit:
        return _enumerate(problem, free, max_bytes)
    high = _point(problem, min_cut(problem, byte_scale=1, flop_price=total_bytes, weighted=False, banned=hard))
    if high[0] <= max_bytes or low[1] <= high[1]:
        return high[2] if high[0] <= max_bytes else low[2]
    for _ in range(64):  # one new hull vertex per step; 64 is far more than ever seen
        scale, price = low[1] - high[1], high[0] - low[0]
        mid = _point(problem, min_cut(problem, byte_scale=scale, flop_price=price, weighted=False, banned=hard))
        on_segment = mid[0] * scale + mid[1] * price == low[0] * scale + low[1] * price
        if on_segment:
            walked = segment_walk(problem, scale, price, max_bytes, hard)
            candidates = [p for p in (low, mid, walked and _point(problem, walked)) if p and p[0] <= max_bytes]
            return _swap_search(problem, _fill(problem, min(candidates, key=lambda p: (p[1], p[0]))[2], max_bytes), max_bytes)
        if mid[0] <= max_bytes:
            low = mid
        else:
            high = mid
    return _swap_search(problem, _fill(problem, low[2], max_bytes), max_bytes)


def _fill(problem: Any, cut: Cut, max_bytes: int, *, rounds: int = 8, width: int = 16) -> Cut:
    """Spend what the hull walk left of the budget: save instead of recomputing the
    costliest recomputed values, one at a time, while the bytes fit (each step can also
    drop the recompute of values only that one needed). A hull walk stops at a hull edge;
    a plan inside the gap can recompute less (it is a knapsack), and torch's knapsack
    finds some of them. ``width`` candidates per round keep this cheap on big graphs."""
    preds: dict[int, list[int]] = {}
    for u, v in problem.edges:
        preds.setdefault(v, []).append(u)
    recomputed = set(cut.recomputed)
    saved_bytes, flops = plan_cost(problem, recomputed)
    for _ in range(rounds):
        if saved_bytes >= max_bytes:
            break
        costly = sorted((v for v in recomputed if problem.recompute_cost[v] and problem.save_weight[v] is not None),
                        key=lambda v: (-problem.recompute_cost[v], v))[:width]
        best = None
        for v in costly:
            trial = _still_needed(problem, preds, recomputed - {v})
            trial_bytes, trial_flops = plan_cost(problem, trial)
            if trial_bytes <= max_bytes and trial_flops < flops and (best is None or (trial_flops, trial_bytes) < best[:2]):
                best = (trial_flops, trial_bytes, trial)
        if best is None:
            break
        flops, saved_bytes, recomputed = best
    return Cut(tuple(sorted(saved_of(problem, recomputed))), tuple(sorted(recomputed)))


def _swap_search(problem: Any, cut: Cut, max_bytes: int, *, width: int = 64, rounds: int = 200, depth: int = 4, deeps: int = 3) -> Cut:
    """Local search after :func:`_fill`: the gap between hull vertices is a knapsack, and
    the fill only ever saves more. A move here saves one of the ``width`` costliest
    recomputed values (dropping recomputes only it needed) and, if that overshoots the
    budget, recomputes up to ``depth`` saved values instead, each with the never-saved
    inputs it forces and up to ``deeps - 1`` levels of its other inputs (recomputing the
    attention projection together with the residual add it feeds, say). Each step takes
    the move with the fewest FLOPs (then bytes) that fits; it stops when none lowers the
    FLOPs. Deterministic (sorted candidates, ties by index). Moves are tried on one
    :class:`_Search` state, changed and undone in place."""
    search = _Search(problem, cut.recomputed)
    for _ in range(rounds):
        move = _best_move(search, max_bytes, width=width, depth=depth, deeps=deeps)
        if move is None:
            break
        search.commit(move)
    return search.cut()


class _Move(NamedTuple):
    """Save ``value`` instead of recomputing it, then recompute each ``(saved value,
    levels of its inputs)`` of ``additions``: the plan's FLOPs and bytes after it.
    Compared as a tuple: fewest FLOPs, then bytes, then the lowest indices."""

    flops: int
    saved_bytes: int
    value: int
    additions: tuple[tuple[int, int], ...]


class _Removal(NamedTuple):
    """Values leaving the recompute set, and per input how many recomputed readers it loses."""

    removed: frozenset[int]
    released: dict[int, int]
    bytes_delta: int
    flops_delta: int


class _Addition(NamedTuple):
    """Values joining the recompute set."""

    added: frozenset[int]
    bytes_delta: int
    flops_delta: int


class _Search:
    """A recompute set, its saved bytes and FLOPs, and per value how many recomputed
    values read it (a value is saved when the backward or a recomputed value reads it)."""

    def __init__(self, problem: Any, recomputed: Iterable[int]) -> None:
        n = len(problem)
        inputs: list[set[int]] = [set() for _ in range(n)]
        for u, v in problem.edges:
            inputs[v].add(u)
        self.problem = problem
        self.inputs = [sorted(p) for p in inputs]
        self.free = [i for i in range(n) if i not in problem.must_save]
        self.recomputed = set(recomputed)
        self.readers = [0] * n
        for v in self.recomputed:
            for u in self.inputs[v]:
                self.readers[u] += 1
        self.saved_bytes = sum(problem.nbytes[u] for u in range(n) if self.is_saved(u))
        self.flops = sum(problem.recompute_cost[v] for v in self.recomputed)

    def is_saved(self, u: int) -> bool:
        return u not in self.recomputed and (u in self.problem.needed or self.readers[u] > 0)

    def costliest_recomputed(self, width: int) -> list[int]:
        cost = self.problem.recompute_cost
        return sorted((v for v in self.recomputed if cost[v]), key=lambda v: (-cost[v], v))[:width]

    def removal(self, v: int) -> _Removal | None:
        """Save ``v``: it and the recomputed values only it read leave the recompute set.
        None when one of them would have to be saved and never may be."""
        problem, readers = self.problem, self.readers
        removed, released, stack = {v}, {}, [v]
        while stack:
            for u in self.inputs[stack.pop()]:
                released[u] = released.get(u, 0) + 1
                if u in self.recomputed and u not in removed and u not in problem.needed and readers[u] == released[u]:
                    removed.add(u)
                    stack.append(u)
        bytes_delta = 0
        for x in removed:  # still read by the backward or another recompute: now saved
            if x in problem.needed or readers[x] > released.get(x, 0):
                if problem.save_weight[x] is None:
                    return None
                bytes_delta += problem.nbytes[x]
        for u, count in released.items():  # read by nothing any more: no longer saved
            if u not in self.recomputed and u not in problem.needed and readers[u] == count:
                bytes_delta -= problem.nbytes[u]
        return _Removal(frozenset(removed), released, bytes_delta, -sum(problem.recompute_cost[x] for x in removed))

    def addition(self, w: int, deep: int) -> _Addition | None:
        """Recompute the saved value ``w``, with the never-saved inputs it forces and up to
        ``deep`` levels of its other inputs. None when that reaches a ``must_save`` value
        that may not be saved either."""
        problem = self.problem
        added, newly, stack = set(), set(), [(w, 0)]
        while stack:
            x, level = stack.pop()
            if x in added:
                continue
            added.add(x)
            for u in self.inputs[x]:
                if u in self.recomputed or u in added or u in problem.needed or self.readers[u] > 0:
                    continue
                if problem.save_weight[u] is None or (level < deep and u not in problem.must_save):
                    if u in problem.must_save:
                        return None
                    stack.append((u, level + 1))
                else:
                    newly.add(u)
        bytes_delta = sum(problem.nbytes[u] for u in newly - added) - sum(problem.nbytes[x] for x in added if self.is_saved(x))
        return _Addition(frozenset(added), bytes_delta, sum(problem.recompute_cost[x] for x in added))

    def apply_removal(self, removal: _Removal) -> None:
        for u, count in removal.released.items():
            self.readers[u] -= count
        self.recomputed.difference_update(removal.removed)
        self.saved_bytes += removal.bytes_delta
        self.flops += removal.flops_delta

    def undo_removal(self, removal: _Removal) -> None:
        for u, count in removal.released.items():
            self.readers[u] += count
        self.recomputed.update(removal.removed)
        self.saved_bytes -= removal.bytes_delta
        self.flops -= removal.flops_delta

    def apply_addition(self, addition: _Addition) -> None:
        self.recomputed.update(addition.added)
        for w in addition.added:
            for u in self.inputs[w]:
                self.readers[u] += 1
        self.saved_bytes += addition.bytes_delta
        self.flops += addition.flops_delta

    def undo_addition(self, addition: _Addition) -> None:
        self.recomputed.difference_update(addition.added)
        for w in addition.added:
            for u in self.inputs[w]:
                self.readers[u] -= 1
        self.saved_bytes -= addition.bytes_delta
        self.flops -= addition.flops_delta

    def commit(self, move: _Move) -> None:
        self.apply_removal(self.removal(move.value))
        for w, deep in move.additions:
            self.apply_addition(self.addition(w, deep))

    def cut(self) -> Cut:
        return Cut(tuple(sorted(saved_of(self.problem, self.recomputed))), tuple(sorted(self.recomputed)))


def _best_move(search: _Search, max_bytes: int, *, width: int, depth: int, deeps: int) -> _Move | None:
    """The move with the fewest FLOPs (then bytes) that fits and lowers the FLOPs."""
    best = None
    for v in search.costliest_recomputed(width):
        removal = search.removal(v)
        if removal is None:
            continue
        if search.saved_bytes + removal.bytes_delta <= max_bytes:
            move = _Move(search.flops + removal.flops_delta, search.saved_bytes + removal.bytes_delta, v, ())
        else:
            move = _best_swap(search, v, removal, max_bytes, depth=depth, deeps=deeps)
        if move is not None and move.flops < search.flops and (best is None or move < best):
            best = move
    return best


def _best_swap(search: _Search, v: int, removal: _Removal, max_bytes: int, *, depth: int, deeps: int) -> _Move | None:
    """Saving ``v`` overshoots the budget: recompute up to ``depth`` saved values instead,
    greedily (fewest FLOPs per byte freed first); the best prefix that fits, or None.
    ``search`` is left as it was found."""
    ceiling = search.flops  # a swap must end below the FLOPs of the plan before the move
    search.apply_removal(removal)
    best, chosen, applied = None, [], []
    for _ in range(depth):
        options = _additions(search, removal.removed, ceiling, deeps)
        fits = [
            (search.flops + a.flops_delta, search.saved_bytes + a.bytes_delta, key)
            for a, key in options if search.saved_bytes + a.bytes_delta <= max_bytes
        ]
        if fits:
            flops, saved_bytes, key = min(fits)
            move = _Move(flops, saved_bytes, v, tuple(chosen) + (key,))
            if best is None or move < best:
                best = move
        if not options:
            break
        addition, key = min(options, key=lambda o: (o[0].flops_delta / -o[0].bytes_delta, o[1]))
        chosen.append(key)
        applied.append(addition)
        search.apply_addition(addition)
    for addition in reversed(applied):
        search.undo_addition(addition)
    search.undo_removal(removal)
    return best


def _additions(search: _Search, removed: frozenset[int], ceiling: int, deeps: int) -> list[tuple[_Addition, tuple[int, int]]]:
    """Each saved value that can be recomputed (with 0 to ``deeps - 1`` levels of inputs)
    so that bytes go down and FLOPs stay under ``ceiling``, keyed ``(value, levels)``."""
    cost = search.problem.recompute_cost
    options = []
    for w in search.free:
        if w in search.recomputed or w in removed or not search.is_saved(w) or search.flops + cost[w] >= ceiling:
            continue
        for deep in range(deeps):
            addition = search.addition(w, deep)
            if addition is None or addition.bytes_delta >= 0 or search.flops + addition.flops_delta >= ceiling:
                continue
            options.append((addition, (w, deep)))
    return options


def _still_needed(problem: Any, preds: dict[int, list[int]], recomputed: set[int]) -> set[int]:
    """The recomputed values something still reads: backward reads, then their inputs."""
    keep = {v for v in problem.needed if v in recomputed}
    stack = list(keep)
    while stack:
        for u in preds.get(stack.pop(), ()):
            if u in recomputed and u not in keep:
                keep.add(u)
                stack.append(u)
    return keep


def _point(problem: Any, cut: Cut) -> tuple[int, int, Cut]:
    saved_bytes, flops = plan_cost(problem, set(cut.recomputed))
    return saved_bytes, flops, cut


def _enumerate(problem: Any, free: list[int], max_bytes: int) -> Cut:
    """Exact search over every recompute set of the free values (bitmask arithmetic)."""
    pred_mask = [0] * len(problem)  # per value: its producers, as a mask over all values
    for u, v in problem.edges:
        pred_mask[v] |= 1 << u
    needed = sum(1 << i for i in problem.needed)
    never = sum(1 << i for i, w in enumerate(problem.save_weight) if w is None)
    best: tuple[int, int, int] | None = None
    for r in range(len(free) + 1):
        for combo in itertools.combinations(free, r):
            recomputed = 0
            reads = needed
            flops = 0
            for v in combo:
                recomputed |= 1 << v
                reads |= pred_mask[v]
                flops += problem.recompute_cost[v]
            saved = reads & ~recomputed
            if saved & never or (best is not None and flops > best[0]):
                continue
            saved_bytes = sum(problem.nbytes[i] for i in _bits(saved))
            if saved_bytes <= max_bytes and (best is None or (flops, saved_bytes) < best[:2]):
                best = (flops, saved_bytes, recomputed)
    # Never None: budget_cut checked that recomputing everything allowed (one of these
    # combinations) fits.
    recomputed_set = set(_bits(best[2]))
    return Cut(tuple(sorted(saved_of(problem, recomputed_set))), tuple(sorted(recomputed_set)))


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out
