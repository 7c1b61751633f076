"""The min-cut partitioner: ``partition(joint_module, joint_inputs, *, num_fwd_outputs)``.

Same contract as torch's partition functions, so it can be handed to AOTAutograd as
``partition_fn``. Three steps, each its own module: :mod:`.problem` turns the joint graph
into a small cut problem, :mod:`.mincut` solves it (networkx), :mod:`.split` builds the
forward and backward graphs from the resulting :class:`~.partition_result.Partition`,
which is attached to both modules as ``module.meta["ckpt_partition"]``.

What is saved at checkpoint region boundaries (the rule, and why):

1. A value computed in one region and read by the forward of another region (directly or
   through untagged code) is a *boundary*: the tagging pass makes it ``MUST_SAVE``, so no
   region's backward recomputes the regions before it. Eager checkpointing saves every
   region's inputs for the same reason: without the boundary, the min-cut (which prices
   bytes, not peak memory) would recompute the whole model from its inputs at the start
   of the backward, bringing back the memory checkpointing was asked to free.
2. A boundary is dropped from the saved set after the cut (:func:`.saving.rebuild_boundaries`)
   when the backward can rebuild it from values the plan saves anyway through cheap
   operators only: no matmul, convolution or attention, no random op, nothing a policy or
   mutation pins. That recomputes a few pointwise ops (``x + tanh(h)`` from a saved ``h``)
   and never a whole region early, so saved bytes go down at no peak-memory cost; it is
   how a ``MUST_SAVE``-matmul policy per block saves no more than no checkpointing at all.
3. Region values read only by untagged code that reaches no other region (final norm,
   head, loss) are not boundaries: the min-cut recomputes them with their region when
   that saves bytes, as torch's partitioner does.
4. A value a policy tags ``MUST_SAVE`` costs one quarter-byte less to save than an
   untagged value of the same size, so ties go to the value the user asked to keep (from
   which rule 2 can rebuild boundaries) rather than to an arbitrary pick of the solver.

Each saved value carries why it is saved (:data:`.saving.WHY`) in ``plan.why`` and in the
forward node's ``meta["ckpt_saved_why"]``, which ``explain()`` reports.

Example::

    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> def joint(primals, tangents):
    ...     y = torch.ops.aten.relu.default(torch.ops.aten.sin.default(primals))
    ...     g = torch.ops.aten.threshold_backward.default(tangents, y, 0)
    ...     return [y, torch.ops.aten.mul.Tensor(g, torch.ops.aten.cos.default(primals))]
    >>> gm = make_fx(joint)(torch.randn(512, 512), torch.randn(512, 512))
    >>> fw, bw = partition(gm, None, num_fwd_outputs=1)
    >>> fw.meta["ckpt_partition"].saved, fw.meta["ckpt_partition"].recomputed
    (('primals_1',), ('sin', 'relu'))
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch.fx as fx

from .budget import budget_cut
from .mincut import BudgetTooSmall, InfeasibleCut, Cut, min_cut, plan_cost
from .partition_result import Partition, RegionPartition
from .facts import NoRecompute, placeholder_kind
from .problem import JointInfo, build_problem
from .saving import rebuild_boundaries, why_saved
from .split import split, symbol_bindings

# Keywords AOTAutograd and inductor pass to every partition function, and why we ignore them.
IGNORED_KEYWORDS = {
    "compiler": "the plan does not depend on the compiler that runs the graphs",
}


def partition(
    joint_module: fx.GraphModule,
    joint_inputs: Any,
    *,
    num_fwd_outputs: int,
    memory_budget: float = 1.0,
    static_lifetime_input_indices: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split an AOTAutograd joint graph into forward and backward modules.

    ``memory_budget=b`` in (0, 1]: the saved activation bytes stay at or under ``b`` times
    those saved at ``b=1`` (a ``ValueError`` names the smallest feasible budget otherwise),
    with the fewest recompute FLOPs the solver finds. ``joint_inputs`` is not read (the
    graph's ``meta["val"]`` carries the shapes). ``static_lifetime_input_indices`` (the
    parameters, from AOTAutograd) does not change the plan (every graph input costs
    nothing to save): it marks the forward inputs ``meta["is_static_input"]`` as torch's
    partitioner does. AOTAutograd's other keywords (:data:`IGNORED_KEYWORDS`) are accepted
    and ignored; any other keyword is a TypeError.
    """
    unknown = sorted(set(kwargs) - set(IGNORED_KEYWORDS))
    if unknown:
        raise TypeError(
            f"partition() got unexpected keyword argument(s) {unknown}; accepted: num_fwd_outputs, "
            f"memory_budget, static_lifetime_input_indices, and AOTAutograd's {sorted(IGNORED_KEYWORDS)}"
        )
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not 0 < memory_budget <= 1:
        raise ValueError(f"partition(memory_budget=...) must be a number in (0, 1], got {memory_budget!r}")
    _mark_static_inputs(joint_module.graph, static_lifetime_input_indices or ())
    info = build_problem(joint_module, num_fwd_outputs=num_fwd_outputs)
    cut = _decide(info, float(memory_budget))
    plan = _make_plan(info, cut, joint_module.graph, float(memory_budget))
    fw_module, bw_module = split(
        joint_module, saved=plan.saved, recomputed=plan.recomputed + plan.deferred, offloaded=plan.offloaded,
        num_fwd_outputs=num_fwd_outputs,
    )
    fw_module.meta["ckpt_partition"] = bw_module.meta["ckpt_partition"] = plan
    return fw_module, bw_module


def _mark_static_inputs(graph: fx.Graph, static_indices: Sequence[int]) -> None:
    """``meta["is_static_input"]`` on every forward input, True for the parameters, as
    torch's partitioner stamps it (2.15): inductor's backward compile reads it from the
    backward's placeholders (which copy the meta), so a saved user input is not taken for
    a fixed-address one (cudagraphs, alignment). Set on the joint graph before the split,
    while forward inputs still line up with the indices."""
    static = set(static_indices)
    inputs = [n for n in graph.find_nodes(op="placeholder") if _is_forward_input(n)]
    for i, node in enumerate(inputs):
        node.meta["is_static_input"] = i in static


def _is_forward_input(node: fx.Node) -> bool:
    return placeholder_kind(node).forward_input


def _decide(info: JointInfo, memory_budget: float) -> Cut:
    problem = info.problem
    try:
        cut = min_cut(problem)
    except InfeasibleCut as e:
        raise ValueError(_conflict_message(info, e.path)) from e
    # Budgets are fractions of the b=1 plan as it is saved, boundaries rebuilt.
    cut = rebuild_boundaries(info, cut)
    if memory_budget == 1.0:
        return cut
    full_bytes = plan_cost(problem, set(cut.recomputed))[0]
    try:
        return rebuild_boundaries(info, budget_cut(problem, math.floor(memory_budget * full_bytes)))
    except BudgetTooSmall as e:
        smallest = math.ceil(e.min_bytes / full_bytes * 1e4) / 1e4
        raise ValueError(
            f"partition(memory_budget={memory_budget}): infeasible; at budget 1 the plan saves "
            f"{full_bytes} bytes, and recomputing everything allowed still saves {e.min_bytes} "
            f"bytes, so the smallest feasible budget is {smallest}"
        ) from e


def _source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip().startswith("File ")]
    return lines[-1] if lines else "(no source line recorded)"


def _conflict_message(info: JointInfo, path: list[int]) -> str:
    rows = []
    for i in path:
        node = info.nodes[i]
        policy = node.meta.get("recompute")
        reason = info.reasons.get(node.name)
        why = reason.value if reason else f"tagged {policy.name}" if policy is not None else "never saved"
        rows.append(f"  {node.format_node()}  [{why}]\n    at {_source_line(node)}")
    return (
        "partition: no valid plan, the backward needs a value that can be neither saved nor "
        "recomputed along this chain (first: may not be recomputed, last: read by the backward):\n"
        + "\n".join(rows)
        + "\nFix: drop one of these MUST_SAVE / MUST_RECOMPUTE tags (or make the random op's "
        "recompute exact with the tagging pass)."
    )


def _make_plan(info: JointInfo, cut: Cut, graph: fx.Graph, memory_budget: float) -> Partition:
    problem, nodes = info.problem, info.nodes
    saved_nodes = [nodes[i] for i in cut.saved]
    saved_nodes += symbol_bindings(graph, saved_nodes, saved_nodes)
    order = {n: k for k, n in enumerate(graph.nodes)}
    saved_nodes.sort(key=order.__getitem__)
    recomputed = [i for i in cut.recomputed if nodes[i] in info.forward]
    why = why_saved(info, cut, memory_budget)
    for i, reason in why.items():
        # Travels with the node into the forward graph (split copies meta): the report reads it.
        nodes[i].meta["ckpt_saved_why"] = reason
    saved_bytes = sum(problem.nbytes[i] for i in cut.saved)
    flops = sum(problem.recompute_cost[i] for i in recomputed)
    regions: dict[int, dict[str, list[int]]] = {}
    for key, indices in (("saved", cut.saved), ("recomputed", recomputed)):
        for i in indices:
            region = info.regions.get(problem.names[i])
            if region is not None:
                regions.setdefault(region, {"saved": [], "recomputed": []})[key].append(i)
    return Partition(
        saved=tuple(n.name for n in saved_nodes),
        recomputed=tuple(problem.names[i] for i in recomputed),
        banned=tuple(
            (name, info.reasons[name].value)
            for i, name in enumerate(problem.names)
            if name in info.reasons and info.reasons[name] is not NoRecompute.GRAPH_INPUT
            and (memory_budget == 1.0 or i not in problem.soft_banned)  # lifted under a budget
        ),
        offloaded=tuple(problem.names[i] for i in cut.saved if problem.names[i] in info.offload),
        deferred=tuple(problem.names[i] for i in cut.recomputed if nodes[i] not in info.forward),
        saved_bytes=saved_bytes,
        recompute_flops=flops,
        memory_budget=memory_budget,
        regions={
            region: RegionPartition(
                saved=tuple(problem.names[i] for i in r["saved"]),
                recomputed=tuple(problem.names[i] for i in r["recomputed"]),
                saved_bytes=sum(problem.nbytes[i] for i in r["saved"]),
                recompute_flops=sum(problem.recompute_cost[i] for i in r["recomputed"]),
            )
            for region, r in sorted(regions.items())
        },
        why=tuple((problem.names[i], why[i]) for i in cut.saved if problem.nbytes[i]),
    )
