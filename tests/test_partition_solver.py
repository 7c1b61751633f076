"""The min-cut solver on plain problems: hand-built plans, closed forms, brute force.

No torch here: the solver takes a Problem (plain data) and returns index sets.
"""
import itertools
import random

import pytest

from ckpt_compile.passes import budget
from ckpt_compile.passes.budget import budget_cut
from ckpt_compile.passes.mincut import BudgetTooSmall, Cut, InfeasibleCut, min_cut, plan_cost
from ckpt_compile.passes.problem import Problem


def make(n, edges, nbytes, needed, *, weight=None, cost=None, must=(), soft=()):
    return Problem(
        names=tuple(f"v{i}" for i in range(n)),
        edges=tuple(edges),
        nbytes=tuple(nbytes),
        save_weight=tuple(nbytes if weight is None else weight),
        recompute_cost=tuple([1] * n if cost is None else cost),
        must_save=frozenset(must),
        soft_banned=frozenset(soft),
        needed=frozenset(needed),
    )


# ---------------------------------------------------------------- hand-built plans

def test_diamond_saves_the_narrow_waist():
    # input(0) -> wide(1) -> narrow(2) -> {a(3), b(4)}; backward reads a and b.
    p = make(5, [(0, 1), (1, 2), (2, 3), (2, 4)], [64, 64, 8, 32, 32], {3, 4}, must={0})
    assert min_cut(p) == Cut(saved=(2,), recomputed=(3, 4))


def test_free_input_means_recompute_everything_cheap():
    # A graph input costs nothing to save: recompute the chain from it.
    p = make(3, [(0, 1), (1, 2)], [0, 16, 16], {2}, must={0}, weight=[0, 16, 16])
    assert min_cut(p) == Cut(saved=(0,), recomputed=(1, 2))


def test_banned_value_is_saved_not_recomputed():
    # node 1 (e.g. a matmul outside a region) may not be recomputed: save it, recompute 2.
    p = make(3, [(0, 1), (1, 2)], [0, 16, 32], {2}, must={0}, soft={1})
    assert min_cut(p) == Cut(saved=(1,), recomputed=(2,))


def test_view_is_never_saved_on_its_own():
    # node 2 is a view of 1 (weight None, 4 bytes if it were saved): save its base instead.
    p = make(3, [(0, 1), (1, 2)], [0, 16, 4], {2}, must={0, 1}, weight=[0, 16, None])
    assert min_cut(p) == Cut(saved=(1,), recomputed=(2,))


def test_ties_break_towards_less_recompute():
    # Saving 1 or 2 costs the same bytes; saving 2 recomputes nothing.
    p = make(3, [(0, 1), (1, 2)], [8, 8, 8], {2}, must={0})
    assert min_cut(p) == Cut(saved=(2,), recomputed=())


def test_infinite_path_is_reported():
    # must-save 0 -> never-saved 1 -> read by the backward, and 1 may not be recomputed.
    p = make(2, [(0, 1)], [8, 8], {1}, weight=[8, None], must={0, 1})
    with pytest.raises(InfeasibleCut) as info:
        min_cut(p)
    assert info.value.path == [1]


def test_budget_too_small_reports_the_least_bytes():
    p = make(3, [(0, 1), (1, 2)], [8, 8, 8], {1, 2}, must={0})
    with pytest.raises(BudgetTooSmall) as info:
        budget_cut(p, 7)
    assert info.value.min_bytes == 8


# ---------------------------------------------------------------- closed forms

@pytest.mark.parametrize("seed", range(10))
def test_chain_cut_is_the_smallest_link(seed):
    # Chain 0 -> 1 -> ... -> n-1, node 0 may not be recomputed, the backward reads the end:
    # the optimum saves the smallest value (the last one among equals: less recompute).
    rng = random.Random(seed)
    n = rng.randint(3, 30)
    sizes = [rng.choice([4, 8, 16, 32]) for _ in range(n)]
    p = make(n, [(i, i + 1) for i in range(n - 1)], sizes, {n - 1}, must={0})
    smallest = min(sizes)
    k = max(i for i, s in enumerate(sizes) if s == smallest)
    assert min_cut(p) == Cut(saved=(k,), recomputed=tuple(range(k + 1, n)))


@pytest.mark.parametrize("exact_limit", [0, 64], ids=["hull", "exact"])
@pytest.mark.parametrize("seed", range(10))
def test_chain_budget_keeps_the_costliest(seed, exact_limit):
    # Backward reads every value of a chain of equal sizes: under a budget of k values, the
    # optimum saves the k costliest (node 0 is forced) and recomputes the others. With equal
    # sizes every such plan is a hull vertex, so the hull walk is exact too.
    rng = random.Random(seed)
    n = rng.randint(4, 12)
    cost = [0] + rng.sample(range(1, 100), n - 1)
    p = make(n, [(i, i + 1) for i in range(n - 1)], [8] * n, set(range(n)), cost=cost, must={0})
    k = rng.randint(0, n - 1)
    keep = {0} | set(sorted(range(1, n), key=lambda i: -cost[i])[:k])
    cut = budget_cut(p, 8 * (k + 1), exact_limit=exact_limit)
    assert cut == Cut(saved=tuple(sorted(keep)), recomputed=tuple(i for i in range(n) if i not in keep))


# ---------------------------------------------------------------- brute force

def random_problem(rng):
    n = rng.randint(3, 9)
    inputs = rng.randint(1, 2)
    edges = []
    for v in range(inputs, n):
        for u in rng.sample(range(v), k=min(v, rng.randint(1, 2))):
            edges.append((u, v))
    nbytes = [0] * inputs + [rng.choice([4, 8, 12, 16, 32]) for _ in range(n - inputs)]
    weight = [0] * inputs + [None if rng.random() < 0.15 else b * rng.choice([1, 4, 4, 16]) for b in nbytes[inputs:]]
    cost = [0] * inputs + [rng.randint(0, 9) for _ in range(n - inputs)]
    must = set(range(inputs)) | {v for v in range(inputs, n) if rng.random() < 0.1}
    soft = {v for v in range(inputs, n) if v not in must and rng.random() < 0.2}
    needed = set(rng.sample(range(n), k=rng.randint(1, max(1, n // 2))))
    return make(n, edges, nbytes, needed, weight=weight, cost=cost, must=must, soft=soft)


def brute_force(p, banned):
    """Every valid recompute set, with (weighted cost, saved bytes, flops)."""
    free = [i for i in range(len(p)) if i not in banned]
    plans = []
    for r in range(len(free) + 1):
        for combo in itertools.combinations(free, r):
            recomputed = set(combo)
            saved = {u for u in p.needed if u not in recomputed}
            saved |= {u for u, v in p.edges if v in recomputed and u not in recomputed}
            if any(p.save_weight[u] is None for u in saved):
                continue
            weighted = sum(p.save_weight[u] for u in saved)
            plans.append((weighted, sum(p.nbytes[u] for u in saved), sum(p.recompute_cost[v] for v in recomputed)))
    return plans


def test_200_random_dags_match_brute_force():
    rng = random.Random(2026)
    checked = infeasible = budgets = 0
    while checked + infeasible < 200:
        p = random_problem(rng)
        plans = brute_force(p, p.must_save | p.soft_banned)
        if not plans:
            with pytest.raises(InfeasibleCut):
                min_cut(p)
            infeasible += 1
            continue
        cut = min_cut(p)
        recomputed = set(cut.recomputed)
        best = min((w, f) for w, _, f in plans)
        weighted = sum(p.save_weight[u] for u in cut.saved)
        assert (weighted, plan_cost(p, recomputed)[1]) == best, (p, cut)
        checked += 1
        # Budget: fewest FLOPs within a byte limit (ties: fewer bytes), exact solver.
        relaxed = brute_force(p, p.must_save)
        lo, hi = min(b for _, b, _ in relaxed), max(b for _, b, _ in relaxed)
        for limit in sorted({lo, (lo + hi) // 2, hi}):
            expected = min((f, b) for _, b, f in relaxed if b <= limit)
            saved_bytes, flops = plan_cost(p, set(budget_cut(p, limit).recomputed))
            assert (flops, saved_bytes) == expected, (p, limit)
            budgets += 1
    assert checked >= 150 and budgets >= 300


@pytest.mark.parametrize("exact_limit", [0, 64], ids=["hull", "exact"])
def test_budget_is_monotone_and_feasible(exact_limit):
    rng = random.Random(7)
    for _ in range(60):
        p = random_problem(rng)
        relaxed = brute_force(p, p.must_save)
        if not relaxed:
            continue
        lo, hi = min(b for _, b, _ in relaxed), max(b for _, b, _ in relaxed)
        previous = (-1, None)
        for limit in range(lo, hi + 1):
            saved_bytes, flops = plan_cost(p, set(budget_cut(p, limit, exact_limit=exact_limit).recomputed))
            assert saved_bytes <= limit
            assert saved_bytes >= previous[0], "saved bytes must not shrink when the budget grows"
            # The hull walk may miss the optimum between hull vertices, never beat it.
            assert flops >= min(f for _, b, f in relaxed if b <= limit)
            previous = (saved_bytes, flops)


def test_swap_search_closes_a_gap_the_fill_left(monkeypatch):
    # input(0) -> a(1, 4 B, 6 FLOPs) -> b(2, 8 B, 3) -> c(3, 16 B, 9); the backward reads a
    # and c, c also reads a. Budget 16 B: the optimum (brute force) saves c and recomputes a
    # from the free input (6 FLOPs). The hull walk plus fill stops at recomputing c and b
    # (9 FLOPs, 12 B): only a swap (save c, recompute a instead) reaches the optimum.
    p = make(4, [(0, 1), (1, 2), (0, 2), (2, 3), (1, 3)], [0, 4, 8, 16], {1, 3}, cost=[0, 6, 3, 9], must={0}, soft={2})
    best = min((f, b) for _, b, f in brute_force(p, p.must_save) if b <= 16)
    assert best == (6, 16)
    improved = plan_cost(p, set(budget_cut(p, 16, exact_limit=0).recomputed))
    assert (improved[1], improved[0]) == best
    monkeypatch.setattr(budget, "_swap_search", lambda problem, cut, max_bytes: cut)
    fill_only = plan_cost(p, set(budget_cut(p, 16, exact_limit=0).recomputed))
    assert fill_only[1] > best[0]


def test_hull_search_matches_brute_force_on_most_budgets():
    # The approximation (exact_limit=0) against brute force on every budget of 150 random
    # problems: never better than the optimum (a bug), and optimal on all but a few
    # (measured: 680 of 683; without the swap search 669, which this threshold rejects).
    rng = random.Random(11)
    hits = total = 0
    for _ in range(150):
        p = random_problem(rng)
        relaxed = brute_force(p, p.must_save)
        if not relaxed:
            continue
        for limit in sorted({b for _, b, _ in relaxed}):
            best = min(f for _, b, f in relaxed if b <= limit)
            saved_bytes, flops = plan_cost(p, set(budget_cut(p, limit, exact_limit=0).recomputed))
            assert saved_bytes <= limit and flops >= best
            hits += flops == best
            total += 1
    assert total >= 500 and hits >= 0.99 * total, (hits, total)
