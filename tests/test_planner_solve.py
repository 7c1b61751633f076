"""The planner's solver and pose step (pure Python): exact against brute force; the
planner's doctests."""
from __future__ import annotations

import itertools
import random

import pytest

from ckpt_compile.planner._pose import pose, union_bytes
from ckpt_compile.planner._solve import Infeasible, Table, brute_force, smallest_budget, solve, total


def _random_table(rng: random.Random) -> Table:
    blocks = rng.randint(1, 5)
    options = []
    for _ in range(blocks):
        options.append(tuple((rng.randint(0, 40), (rng.randint(0, 9), rng.randint(0, 3))) for _ in range(rng.randint(1, 4))))
    overlap = []
    for i in range(blocks - 1):
        overlap.append(tuple(
            tuple(rng.randint(0, min(options[i][a][0], options[i + 1][b][0])) for b in range(len(options[i + 1])))
            for a in range(len(options[i]))
        ))
    return Table(rng.randint(0, 10), tuple(options), tuple(overlap))


@pytest.mark.parametrize("seed", range(300))
def test_solve_equals_brute_force_on_random_tables(seed):
    rng = random.Random(seed)
    table = _random_table(rng)
    all_bytes = [total(table, o)[0] for o in itertools.product(*(range(len(x)) for x in table.options))]
    assert smallest_budget(table) == min(all_bytes)
    for budget in {min(all_bytes) - 1, min(all_bytes), max(all_bytes), rng.randint(min(all_bytes), max(all_bytes))}:
        expected = brute_force(table, budget)
        if expected is None:
            with pytest.raises(Infeasible) as info:
                solve(table, budget)
            assert info.value.smallest == min(all_bytes)
            continue
        got = solve(table, budget)
        assert got == expected
        assert (got.nbytes, got.cost) == total(table, got.options)
        assert got.nbytes <= budget


@pytest.mark.parametrize("seed", range(200))
def test_pose_then_solve_is_exact_over_set_unions(seed):
    # Storages as keys: each block saves its own ones, maybe its input (the previous
    # block's output) and maybe its output; some keys are always saved (outside blocks).
    rng = random.Random(1000 + seed)
    blocks = rng.randint(1, 4)
    sizes = {}
    boundary = [("b", i) for i in range(blocks + 1)]
    for key in boundary:
        sizes[key] = rng.randint(1, 16)
    outside = {boundary[0], boundary[-1]} if rng.random() < 0.5 else {boundary[0]}
    saved, costs = [], []
    for i in range(blocks):
        per, cost = [], []
        for a in range(rng.randint(1, 4)):
            own = {("own", i, a, j) for j in range(rng.randint(0, 3))}
            for key in own:
                sizes[key] = rng.randint(1, 32)
            keys = set(own)
            if rng.random() < 0.6:
                keys.add(boundary[i])
            if rng.random() < 0.4:
                keys.add(boundary[i + 1])
            per.append(frozenset(keys))
            cost.append((rng.randint(0, 9),))
        saved.append(per)
        costs.append(cost)
    table = pose(sizes, outside, saved, costs)
    choices = list(itertools.product(*(range(len(p)) for p in saved)))
    exact = {c: union_bytes(sizes, outside, [saved[i][a] for i, a in enumerate(c)]) for c in choices}
    for c in choices:  # neighbour-only sharing: the table's formula is the exact union
        assert total(table, c)[0] == exact[c]
    budget = rng.randint(min(exact.values()), max(exact.values()))
    got = solve(table, budget)
    best = min(sum(costs[i][a][0] for i, a in enumerate(c)) for c in choices if exact[c] <= budget)
    assert got.cost == (best,) and exact[got.options] <= budget


def test_a_key_shared_by_distant_blocks_is_never_undercounted():
    # A mask every block saves under some option: counted in base, an upper bound.
    sizes = {"mask": 8, "a": 4, "b": 4}
    saved = [[{"mask", "a"}, set()], [{"b"}, set()], [{"mask"}, set()]]
    table = pose(sizes, set(), saved)
    for c in itertools.product(range(2), repeat=3):
        assert total(table, c)[0] >= union_bytes(sizes, set(), [saved[i][a] for i, a in enumerate(c)])


def test_ties_prefer_fewer_bytes():
    table = Table(0, (((4, (1,)), (2, (1,))),), ())
    assert solve(table, 10).options == (1,)


def test_table_shape_is_checked():
    with pytest.raises(ValueError, match="overlap"):
        Table(0, (((1, (0,)),), ((1, (0,)),)), ())


@pytest.mark.parametrize("name", ["ckpt_compile.planner._solve", "ckpt_compile.planner._pose", "ckpt_compile.planner._plan"])
def test_doctests(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed
