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
from typing import Any

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
    FLOPs. Deterministic (sorted candidates, ties by index). Within a step, moves are
    scored with per-value counts of recomputed consumers, updated and undone in place."""
    n = len(problem)
    preds = [set() for _ in range(n)]
    for u, v in problem.edges:
        preds[v].add(u)
    preds = [sorted(p) for p in preds]
    needed = problem.needed
    must = problem.must_save
    nbytes, cost, weight = problem.nbytes, problem.recompute_cost, problem.save_weight
    free = [i for i in range(n) if i not in problem.must_save]
    recomputed = set(cut.recomputed)
    readers = [0] * n  # per value: how many recomputed values read it
    for v in recomputed:
        for u in preds[v]:
            readers[u] += 1

    def saved(u):
        return u not in recomputed and (u in needed or readers[u] > 0)

    total_bytes = sum(nbytes[u] for u in range(n) if saved(u))
    flops = sum(cost[v] for v in recomputed)

    def plan_remove(v):
        removed, dec, stack = {v}, {}, [v]
        while stack:
            x = stack.pop()
            for u in preds[x]:
                dec[u] = dec.get(u, 0) + 1
                if u in recomputed and u not in removed and u not in needed and readers[u] == dec[u]:
                    removed.add(u)
                    stack.append(u)
        db = 0
        for x in removed:
            if x in needed or readers[x] > dec.get(x, 0):
                if weight[x] is None:
                    return None
                db += nbytes[x]
        for u, d in dec.items():
            if u not in recomputed and u not in needed and readers[u] == d:
                db -= nbytes[u]
        return removed, dec, db, -sum(cost[x] for x in removed)

    def add_plan(w, deep=0):
        added, newly, stack = set(), set(), [(w, 0)]
        while stack:
            x, level = stack.pop()
            if x in added:
                continue
            added.add(x)
            for u in preds[x]:
                if u in recomputed or u in added or u in needed or readers[u] > 0:
                    continue
                if weight[u] is None or (level < deep and u not in must):
                    if u in must:
                        return None
                    stack.append((u, level + 1))
                else:
                    newly.add(u)
        db = sum(nbytes[u] for u in newly - added) - sum(nbytes[x] for x in added if saved(x))
        return added, db, sum(cost[x] for x in added)

    def do_add(added):
        recomputed.update(added)
        for w in added:
            for u in preds[w]:
                readers[u] += 1

    def undo_add(added):
        recomputed.difference_update(added)
        for w in added:
            for u in preds[w]:
                readers[u] -= 1

    def apply_remove(removed, dec):
        for u, d in dec.items():
            readers[u] -= d
        recomputed.difference_update(removed)

    def undo_remove(removed, dec):
        for u, d in dec.items():
            readers[u] += d
        recomputed.update(removed)

    for _ in range(rounds):
        best = None
        order = sorted((v for v in recomputed if cost[v]), key=lambda v: (-cost[v], v))[:width]
        for v in order:
            plan = plan_remove(v)
            if plan is None:
                continue
            removed, dec, db, df = plan
            if total_bytes + db <= max_bytes:
                cand = (flops + df, total_bytes + db, v, ())
            else:
                apply_remove(removed, dec)
                cand = None
                added, ws, tb, tf = [], [], total_bytes + db, flops + df
                for _ in range(depth):
                    options = []
                    for w in free:
                        if w in recomputed or w in removed or not saved(w) or tf + cost[w] >= flops:
                            continue
                        for deep in range(deeps):
                            d = add_plan(w, deep)
                            if d is None or d[1] >= 0 or tf + d[2] >= flops:
                                continue
                            options.append(((d[1], d[2], d[0]), (w, deep)))
                    fits = [(tf + d[1], tb + d[0], w) for d, w in options if tb + d[0] <= max_bytes]
                    if fits:
                        f, bb, w = min(fits)
                        c = (f, bb, v, tuple(ws) + (w,))
                        if cand is None or c < cand:
                            cand = c
                    if not options:
                        break
                    d, w = min(options, key=lambda o: (o[0][1] / -o[0][0], o[1]))
                    added.append(d[2])
                    ws.append(w)
                    do_add(d[2])
                    tb += d[0]
                    tf += d[1]
                for w in reversed(added):
                    undo_add(w)
                undo_remove(removed, dec)
            if cand and cand[0] < flops and (best is None or cand < best):
                best = cand
        if best is None:
            break
        _, _, v, additions = best
        removed, dec, db, df = plan_remove(v)
        apply_remove(removed, dec)
        total_bytes += db
        flops += df
        for w, deep in additions:
            added, db, df = add_plan(w, deep)
            do_add(added)
            total_bytes += db
            flops += df
    return Cut(tuple(sorted(saved_of(problem, recomputed))), tuple(sorted(recomputed)))


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
    if best is None:
        raise BudgetTooSmall(max_bytes, -1)
    recomputed_set = set(_bits(best[2]))
    return Cut(tuple(sorted(saved_of(problem, recomputed_set))), tuple(sorted(recomputed_set)))


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out
