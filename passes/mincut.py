"""The solver: the only module that talks to networkx, and it knows no torch.

Input: a :class:`~ckpt_compile.passes.problem.Problem` (plain data). Output: a :class:`Cut`,
index sets of the values to save and the values to recompute in the backward.

Flow network (node keys are tuples ``(i, "in")`` / ``(i, "out")``): ``(i,"in") -> (i,"out")``
costs saving value ``i``; data edges ``(u,"out") -> (v,"in")`` and ``(i,"out") -> SINK`` for
values the backward reads are infinite; values that may not be recomputed hang off
``SOURCE -> (i,"in")`` with infinite capacity. The sink side is what the backward holds:
``(i,"in")`` there means recomputed, only ``(i,"out")`` there means saved. A price on
recompute is a finite ``SOURCE -> (i,"in")`` edge (paid when ``i`` is recomputed).

Budgeted plans (:mod:`.budget`) are built from these cuts: this module answers "the
cheapest cut at a price", that one "the fewest FLOPs under a byte limit".

Of all minimum cuts we take the one with the smallest sink side (the nodes that still reach
the sink in the residual network): it is contained in every other minimum cut's sink side,
so among the cheapest plans it recomputes the least.

Example::

    >>> from ckpt_compile.passes.problem import Problem
    >>> chain = Problem(names=("a", "b", "c"), edges=((0, 1), (1, 2)), nbytes=(0, 8, 4),
    ...     save_weight=(0, 8, 4), recompute_cost=(0, 1, 1), must_save=frozenset({0}),
    ...     soft_banned=frozenset(), needed=frozenset({1, 2}))
    >>> cut = min_cut(chain)
    >>> cut.saved, cut.recomputed
    ((0,), (1, 2))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
from networkx.algorithms.flow import boykov_kolmogorov

SOURCE = ("source", "")
SINK = ("sink", "")
# Measured with `benchmarks/partition.py --flow` on the b=1 cut of transformer joint graphs
# (64 blocks, 7.4k nodes, without / with per-block checkpointing): boykov_kolmogorov
# 0.30 / 0.31 s, preflow_push 1.08 / 1.35 s, shortest_augmenting_path 1.17 / 0.19 s,
# edmonds_karp 6.3 / 0.31 s, dinitz 12.6 / 0.69 s. Only boykov_kolmogorov is fast on both.
FLOW_FUNC = boykov_kolmogorov


@dataclass(frozen=True)
class Cut:
    """A plan as index sets (sorted): values saved, values recomputed in the backward."""

    saved: tuple[int, ...]
    recomputed: tuple[int, ...]


class InfeasibleCut(ValueError):
    """No finite cut: ``path`` is a chain of problem indices that can be neither saved nor
    recomputed (each link forced by a MUST_* tag, a ban, or a never-saved value)."""

    def __init__(self, path: list[int]):
        super().__init__(f"no finite cut; conflicting values (problem indices): {path}")
        self.path = path


class BudgetTooSmall(ValueError):
    """No plan saves at most ``max_bytes``; ``min_bytes`` is the least any plan saves."""

    def __init__(self, max_bytes: int, min_bytes: int):
        super().__init__(f"no plan saves at most {max_bytes} bytes; the least is {min_bytes}")
        self.max_bytes, self.min_bytes = max_bytes, min_bytes


def saved_of(problem: Any, recomputed: set[int]) -> set[int]:
    """The values a recompute set forces us to save: read by the backward or by a
    recomputed value, and not recomputed themselves."""
    saved = {u for u in problem.needed if u not in recomputed}
    saved.update(u for u, v in problem.edges if v in recomputed and u not in recomputed)
    return saved


def plan_cost(problem: Any, recomputed: set[int]) -> tuple[int, int]:
    """(saved bytes, recompute FLOPs) of a plan."""
    saved = saved_of(problem, recomputed)
    return sum(problem.nbytes[i] for i in saved), sum(problem.recompute_cost[i] for i in recomputed)


def min_cut(problem: Any, *, byte_scale: int = 1, flop_price: int = 0, weighted: bool = True, banned: frozenset[int] | None = None) -> Cut:
    """Minimum cut minimising ``byte_scale * saving cost + flop_price * recompute FLOPs``.

    ``weighted`` uses ``save_weight`` (PREFER_* factors, never-saved values) as the saving
    cost, else the plain ``nbytes`` (never-saved values stay infinite). ``banned``
    defaults to ``must_save | soft_banned``.
    """
    graph = _network(problem, byte_scale, flop_price, weighted, banned)
    if SOURCE not in graph or SINK not in graph:
        return Cut((), ())
    residual = _max_flow(graph, value_only=True)
    return _cut_of(problem, _reaching_sink(residual))


def _network(problem: Any, byte_scale: int, flop_price: int, weighted: bool, banned: frozenset[int] | None) -> nx.DiGraph:
    banned = problem.must_save | problem.soft_banned if banned is None else banned
    graph = nx.DiGraph()
    for i in range(len(problem)):
        weight = problem.save_weight[i]
        if weight is None:
            graph.add_edge((i, "in"), (i, "out"))  # no capacity attribute: infinite
        else:
            graph.add_edge((i, "in"), (i, "out"), capacity=byte_scale * (weight if weighted else problem.nbytes[i]))
        if i in banned:
            graph.add_edge(SOURCE, (i, "in"))
        elif flop_price and problem.recompute_cost[i]:
            graph.add_edge(SOURCE, (i, "in"), capacity=flop_price * problem.recompute_cost[i])
        if i in problem.needed:
            graph.add_edge((i, "out"), SINK)
    graph.add_edges_from(((u, "out"), (v, "in")) for u, v in problem.edges)
    return graph


def _max_flow(graph: nx.DiGraph, *, value_only: bool) -> nx.DiGraph:
    try:
        return FLOW_FUNC(graph, SOURCE, SINK, capacity="capacity", value_only=value_only)
    except nx.NetworkXUnbounded as e:
        raise InfeasibleCut(_infinite_path(graph)) from e


def _cut_of(problem: Any, sink_side: set[Any]) -> Cut:
    recomputed = {i for i in range(len(problem)) if (i, "in") in sink_side}
    saved = {i for i in range(len(problem)) if (i, "out") in sink_side and i not in recomputed}
    return Cut(tuple(sorted(saved)), tuple(sorted(recomputed)))


def _residual_edges(residual: nx.DiGraph) -> list[tuple[Any, Any]]:
    return [(u, v) for u, v, a in residual.edges(data=True) if a["capacity"] - a["flow"] > 0]


def segment_walk(problem: Any, scale: int, price: int, max_bytes: int, banned: frozenset[int]) -> Cut | None:
    """Every minimum cut at the breakpoint price lies on the hull edge between its two
    vertices. They are the closed sets of the residual network between the smallest and
    the largest sink side; growing the sink side one strongly connected component at a
    time (residual ancestors first) trades bytes for FLOPs at the constant edge slope. We
    stop at the first cut within the budget: the most bytes, hence fewest FLOPs, on this
    walk (not necessarily on the whole edge: picking the best closed set is a knapsack)."""
    graph = _network(problem, scale, price, False, banned)
    residual = _max_flow(graph, value_only=False)
    sink_side = _reaching_sink(residual)
    edges = _residual_edges(residual)
    reach = nx.DiGraph(edges)
    from_source = nx.descendants(reach, SOURCE) | {SOURCE} if SOURCE in reach else {SOURCE}
    middle = set(graph) - sink_side - from_source
    # Built in sorted order: component ids (the walk's tie-break) must not depend on the
    # hash seed of the string halves of the node keys.
    between = nx.DiGraph()
    between.add_nodes_from(sorted(middle))
    between.add_edges_from((u, v) for u, v in edges if u in middle and v in middle)
    dag = nx.condensation(between)
    saved_bytes = sum(problem.nbytes[i] for i in _cut_of(problem, sink_side).saved)
    # A set closed under residual ancestors is a minimum cut: grow the sink side by
    # components whose residual ancestors are all in already.
    waiting = {c: dag.in_degree(c) for c in dag}
    ready = [c for c, d in waiting.items() if d == 0]
    while ready and saved_bytes > max_bytes:
        # Every cut on the edge trades bytes for FLOPs at the same rate, so what matters is
        # overshooting the budget least: take the smallest step that frees bytes (if none
        # does, the step that costs fewest). The order does not depend on the budget, so a
        # larger budget stops earlier on the same walk: saved bytes stay monotone.
        gains = {c: _gain(problem, sink_side, dag.nodes[c]["members"]) for c in ready}
        positive = [c for c in ready if gains[c] > 0]
        pick = min(positive, key=lambda c: (gains[c], c)) if positive else max(ready, key=lambda c: (gains[c], -c))
        ready.remove(pick)
        sink_side.update(dag.nodes[pick]["members"])
        saved_bytes -= gains[pick]
        for c in dag.successors(pick):
            waiting[c] -= 1
            if waiting[c] == 0:
                ready.append(c)
    return _cut_of(problem, sink_side) if saved_bytes <= max_bytes else None


def _reaching_sink(residual: nx.DiGraph) -> set[Any]:
    """Nodes with a residual path to the sink: the smallest sink side of a minimum cut."""
    seen = {SINK}
    stack = [SINK]
    pred = residual.pred
    while stack:
        v = stack.pop()
        for u, attr in pred[v].items():
            if u not in seen and attr["capacity"] - attr["flow"] > 0:
                seen.add(u)
                stack.append(u)
    return seen


def _gain(problem: Any, sink_side: set[Any], members: set[Any]) -> int:
    """Bytes saved less if ``members`` join the sink side."""
    gain = 0
    for i, half in members:
        if half == "out" and (i, "in") not in sink_side and (i, "in") not in members:
            gain -= problem.nbytes[i]  # becomes saved
        elif half == "in" and ((i, "out") in sink_side):
            gain += problem.nbytes[i]  # was saved, now recomputed
    return gain


def _infinite_path(graph: nx.DiGraph) -> list[int]:
    """A source-to-sink path of infinite edges, as problem indices in order."""
    infinite = nx.DiGraph((u, v) for u, v, c in graph.edges(data="capacity") if c is None)
    path = nx.shortest_path(infinite, SOURCE, SINK)
    return list(dict.fromkeys(key[0] for key in path[1:-1]))
