"""What is saved at checkpoint region boundaries, and why each saved value is saved.

Two steps of the partitioner that read a solved :class:`~.mincut.Cut` together with its
:class:`~.problem.JointInfo`:

- :func:`rebuild_boundaries`: a region boundary the tagging pass forced into the saved
  set is recomputed instead when the backward can rebuild it from values the plan keeps
  anyway through cheap operators only (no matmul, convolution or attention, no random
  op, nothing a policy forbids recomputing). Saved bytes only go down, and no expensive
  operator is recomputed for it.
- :func:`why_saved`: one reason per saved value (:data:`WHY`), for ``explain()``.

Example (a boundary ``b = x + t`` where ``t = tanh(m)`` and ``m`` is kept by a policy)::

    >>> from ckpt_compile.passes.mincut import Cut
    >>> from ckpt_compile.passes.problem import Problem
    >>> p = Problem(names=("x", "m", "t", "b"), edges=((1, 2), (0, 3), (2, 3)),
    ...     nbytes=(0, 8, 8, 8), save_weight=(0, 32, 32, 32), recompute_cost=(0, 0, 8, 8),
    ...     must_save=frozenset({0, 1, 3}), soft_banned=frozenset(), needed=frozenset({1, 2, 3}))
    >>> cut = _rebuild(p, Cut(saved=(0, 1, 3), recomputed=(2,)), boundaries={3},
    ...                cheap=lambda i: i > 0, sources=frozenset({0}))
    >>> cut.saved, cut.recomputed
    ((0, 1), (2, 3))
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy

from .facts import EXPENSIVE, NoRecompute, TagReason, is_graph_input, mutates, random_recompute_differs
from .mincut import Cut
from .problem import JointInfo, Problem

__all__ = ["WHY", "rebuild_boundaries", "why_saved"]

# The reasons explain() gives for a saved value, most binding first.
WHY = {
    "boundary": "output of a checkpoint region read by another region (saved as eager checkpoint saves it)",
    "policy": "a selective policy or annotation asked to save it (MUST_SAVE / PREFER_SAVE / *_CPU_OFFLOAD)",
    "random": "random op (or its mask) whose recompute would draw new numbers",
    "rng state": "RNG state of a random op recomputed in the backward (replays the forward's numbers)",
    "not recomputable": "may not be recomputed (mutation, symbolic size, expensive op outside regions)",
    "budget": "kept under the memory budget: recomputing it costs more FLOPs than the bytes it frees",
    "needed by backward": "read by the backward; saving it is cheaper than recomputing it",
    "recompute input": "read by a recomputed value; saving it is cheaper than recomputing it",
}
_POLICY_SAVE = (
    CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE,
    CheckpointPolicy.MUST_CPU_OFFLOAD, CheckpointPolicy.PREFER_CPU_OFFLOAD,
)


def is_boundary(info: JointInfo, i: int) -> bool:
    node = info.nodes[i]
    return node.meta.get("ckpt_tag_reason") is TagReason.BOUNDARY or info.reasons.get(node.name) is NoRecompute.BOUNDARY


def rebuild_boundaries(info: JointInfo, cut: Cut) -> Cut:
    """``cut`` with every saved region boundary that the backward can rebuild cheaply
    from the rest of the saved set recomputed instead (see the module docstring)."""
    problem = info.problem
    boundaries = {i for i in cut.saved if is_boundary(info, i)}
    if not boundaries:
        return cut
    forced = problem.must_save | problem.soft_banned

    def cheap(i: int) -> bool:
        node = info.nodes[i]
        return (
            node.op == "call_function"
            and (i not in forced or i in boundaries)
            and getattr(node.target, "overloadpacket", None) not in EXPENSIVE
            and not random_recompute_differs(node)
            and not mutates(node)
            and node.meta.get("partitioner_tag") != "must_be_in_forward"
            and isinstance(node.meta.get("val"), torch.Tensor)
        )

    sources = frozenset(i for i, n in enumerate(info.nodes) if is_graph_input(n))
    return _rebuild(problem, cut, boundaries, cheap, sources)


def _rebuild(problem: Problem, cut: Cut, boundaries: set[int], cheap: Callable[[int], bool],
             sources: frozenset[int] = frozenset()) -> Cut:
    """``sources``: graph inputs (available to the backward at no cost)."""
    saved, recomputed = set(cut.saved), set(cut.recomputed)
    inputs: dict[int, list[int]] = {}
    for u, v in problem.edges:
        inputs.setdefault(v, []).append(u)
    # One pass in graph order: available[i] says the backward can have value i from the
    # saved set through cheap recomputes only.
    available = [False] * len(problem)
    for i in range(len(problem)):
        rebuildable = cheap(i) and all(available[j] for j in inputs.get(i, ()))
        if i in boundaries and rebuildable:
            saved.discard(i)
            _recompute_closure(i, inputs, saved | sources, recomputed)
        available[i] = i in saved or i in sources or rebuildable
    return Cut(tuple(sorted(saved)), tuple(sorted(recomputed)))


def _recompute_closure(i: int, inputs: dict[int, list[int]], kept: set[int], recomputed: set[int]) -> None:
    """Add ``i`` and the ancestors it needs that are not ``kept`` to ``recomputed``."""
    stack = [i]
    while stack:
        k = stack.pop()
        if k in recomputed or k in kept:
            continue
        recomputed.add(k)
        stack.extend(inputs.get(k, ()))


def why_saved(info: JointInfo, cut: Cut, memory_budget: float) -> dict[int, str]:
    """Problem index -> one key of :data:`WHY`, for every value in ``cut.saved``."""
    problem, out = info.problem, {}
    for i in cut.saved:
        node = info.nodes[i]
        tag_reason = node.meta.get("ckpt_tag_reason")
        if is_boundary(info, i):
            why = "boundary"
        elif tag_reason is TagReason.RANDOM or info.reasons.get(node.name) is NoRecompute.RANDOM:
            why = "random"
        elif info.reasons.get(node.name) is NoRecompute.RNG_STATE:
            why = "rng state"
        elif node.meta.get("recompute") in _POLICY_SAVE:
            why = "policy"
        elif i in problem.must_save or (memory_budget == 1.0 and i in problem.soft_banned):
            why = "not recomputable"
        elif memory_budget < 1.0:
            why = "budget"
        elif i in problem.needed:
            why = "needed by backward"
        else:
            why = "recompute input"
        out[i] = why
    return out
