"""Decide step of the partitioner: turn a joint graph into a small, torch-free cut problem.

:func:`build_problem` reads an AOTAutograd joint graph and returns a :class:`Problem`: the
forward values that could be saved for, or recomputed in, the backward, the data edges
between them, what saving each one costs in bytes, what recomputing it costs in FLOPs,
and which ones are forced either way. The solver in :mod:`ckpt_compile.passes.mincut`
sees only this plain data.

Example::

    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> def joint(primals, tangents):
    ...     y = torch.ops.aten.sin.default(primals)
    ...     g = torch.ops.aten.mul.Tensor(tangents, torch.ops.aten.cos.default(y))
    ...     return [y, g]
    >>> gm = make_fx(joint)(torch.randn(4), torch.randn(4))
    >>> problem = build_problem(gm, num_fwd_outputs=1).problem
    >>> problem.names, [problem.names[i] for i in sorted(problem.needed)]
    (('primals_1', 'sin', 'cos'), ['cos'])
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy
from torch.utils.flop_counter import flop_registry

from .facts import (
    EXPENSIVE, NoRecompute, TagReason, is_graph_input, mutates, placeholder_kind, random_recompute_differs,
    size_hint, tensors_of, value_nbytes,
)
from .rng_replay import is_rng_state, rng_state_of

aten = torch.ops.aten

# The CPU flash kernel has no flop formula of its own; its leading (q, k, v) arguments
# match the CUDA flash kernel's, so that formula applies.
_FLOP_ALIAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention
}
# Cost factors of saving a value at memory_budget=1, in quarters of its bytes: PREFER_* tags
# are honoured as weights, MUST_* tags as hard constraints (see _classify).
_SAVE_FACTOR = {CheckpointPolicy.PREFER_SAVE: 1, None: 4, CheckpointPolicy.PREFER_RECOMPUTE: 16}
_OFFLOAD = (CheckpointPolicy.MUST_CPU_OFFLOAD, CheckpointPolicy.PREFER_CPU_OFFLOAD)


@dataclass(frozen=True)
class Problem:
    """A cut problem over forward values, indices 0..n-1 in graph order.

    ``edges`` are data edges ``(producer, consumer)``. ``nbytes`` is what saving a value
    really costs; ``save_weight`` is the weighted cost the b=1 cut minimises (``None``:
    never saved). ``recompute_cost`` is in FLOPs. ``must_save`` values stay in the forward
    (never recomputed); ``soft_banned`` ones only at memory_budget=1. ``needed`` values are
    read by the backward directly.
    """

    names: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]
    nbytes: tuple[int, ...]
    save_weight: tuple[int | None, ...]
    recompute_cost: tuple[int, ...]
    must_save: frozenset[int]
    soft_banned: frozenset[int]
    needed: frozenset[int]

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class JointInfo:
    """A :class:`Problem` plus the graph facts the apply step needs (node-level, torch-side)."""

    problem: Problem
    nodes: tuple[fx.Node, ...]  # problem index -> joint node
    forward: frozenset[fx.Node]  # computed by the forward no matter what (feeds its outputs)
    backward: frozenset[fx.Node]  # depend on tangents (or must run in the backward)
    reasons: dict[str, NoRecompute]  # node name -> why it may not be recomputed
    offload: frozenset[str]  # *_CPU_OFFLOAD values
    regions: dict[str, int]  # node name -> ac_graph_id


def _packet(node: fx.Node) -> Any:
    return getattr(node.target, "overloadpacket", None)


def _is_view(node: fx.Node) -> bool:
    return bool(getattr(node.target, "is_view", False))


def node_flops(node: fx.Node) -> int:
    """Estimated FLOPs of one node: ``torch.utils.flop_counter`` formulas where one is
    registered, else one per output element (pointwise and reductions); views are free."""
    if node.op != "call_function" or node.target is operator.getitem or _is_view(node):
        return 0
    packet = _packet(node)
    formula = flop_registry.get(_FLOP_ALIAS.get(packet, packet))
    if formula is not None:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        try:
            return size_hint(formula(*args, out_val=node.meta.get("val"), **kwargs))
        except Exception:  # a formula that cannot read these shapes: fall back to numel
            pass
    return sum(math.prod(size_hint(s) for s in t.shape) for t in tensors_of(node.meta.get("val")))


def _classify(node: fx.Node, in_region: bool) -> tuple[NoRecompute | None, bool]:
    """(reason it may never be recomputed or None, whether the ban lifts below budget 1)."""
    policy = node.meta.get("recompute")
    if is_graph_input(node):
        return NoRecompute.GRAPH_INPUT, False
    if is_rng_state(node):
        return NoRecompute.RNG_STATE, False
    if node.meta.get("partitioner_tag") == "must_be_in_forward" or mutates(node):
        return NoRecompute.MUTATION, False
    if policy in (CheckpointPolicy.MUST_SAVE, *_OFFLOAD):
        return NoRecompute.tagged(policy), False
    if rng_state_of(node) is not None and "recompute" not in node.meta:
        # A replayed random op with its region's tags hidden (the no-checkpoint baseline of
        # diagnostics._graph_stats): as unreplayed, as the model compiled without regions.
        return NoRecompute.RANDOM, False
    if random_recompute_differs(node):
        # Random ops are not recomputed unless the tagging pass made their recompute exact.
        return NoRecompute.RANDOM, False
    val = node.meta.get("val")
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return NoRecompute.SYMBOLIC, False
    if not tensors_of(val) and not isinstance(val, (list, tuple)):
        return NoRecompute.NOT_A_TENSOR, False
    if _packet(node) in EXPENSIVE and not in_region:
        # Expensive ops are not recomputed outside checkpoint regions (at memory_budget=1).
        return NoRecompute.EXPENSIVE, True
    return None, False


def replayed_input_mutations(graph: fx.Graph) -> set[fx.Node]:
    """Graph inputs whose in-place change AOTAutograd's runtime epilogue applies after the
    forward returns (inputs that require grad, mutated out of the graph).

    Saving such an input would hand the backward the mutated tensor (autograd's version
    check then fails with "modified by an inplace operation"); the backward reads the
    clone AOTAutograd made before the mutation instead. torch 2.15 marks these inputs
    ``meta["aot_runtime_epilogue_input_mutation"]``; older releases do not, but say the
    same in the joint graph's output descriptors: the forward returns the input's new
    value (``InputMutationAOTOutput``) and the backward its gradient (``GradAOTOutput``).
    """
    marked = {n for n in graph.find_nodes(op="placeholder") if n.meta.get("aot_runtime_epilogue_input_mutation", False)}
    try:
        from torch._functorch._aot_autograd.descriptors import GradAOTOutput, InputMutationAOTOutput
    except ImportError:  # no descriptors: only the mark can tell
        return marked
    descs = list(graph.output_node().meta.get("desc") or ())
    mutated = {d.mutated_input for d in descs if isinstance(d, InputMutationAOTOutput)}
    with_grad = {d.grad_of for d in descs if isinstance(d, GradAOTOutput)}
    for node in graph.find_nodes(op="placeholder"):
        desc = node.meta.get("desc")
        if desc is not None and desc in mutated and desc in with_grad:
            marked.add(node)
    return marked


def _save_weight(node: fx.Node, nbytes: int, never_saved: set[fx.Node]) -> int | None:
    policy = node.meta.get("recompute")
    if node in never_saved:
        return None  # an input mutated after the forward returns (replayed_input_mutations)
    if is_graph_input(node) or isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return 0  # parameters, graph inputs and SymInts cost nothing to save
    if policy == CheckpointPolicy.MUST_RECOMPUTE:
        return None  # MUST_RECOMPUTE: never saved
    if policy in (CheckpointPolicy.MUST_SAVE, *_OFFLOAD):
        # A value the user's policy keeps wins a tie against an untagged value of the same
        # size (the backward can rebuild the other from it, and boundaries too: see
        # .saving), rather than both being an arbitrary pick of the solver.
        by_policy = node.meta.get("ckpt_tag_reason") not in (TagReason.BOUNDARY, TagReason.RANDOM, TagReason.RNG_STATE)
        return nbytes * 4 - (1 if by_policy and nbytes else 0)
    if is_rng_state(node):
        return nbytes * 4  # saved only when its random op is recomputed (see .rng_replay)
    if _is_view(node) or isinstance(node.meta.get("val"), (list, tuple)):
        return None  # views are never worth saving on their own (save the base); nor tuples
    return nbytes * _SAVE_FACTOR.get(policy, 4)


def build_problem(joint_module: fx.GraphModule, *, num_fwd_outputs: int) -> JointInfo:
    """Build the cut problem of a joint graph (see the module docstring)."""
    graph = joint_module.graph
    output = graph.output_node()
    flat_outputs = torch.utils._pytree.arg_tree_leaves(*output.args)
    fwd_outputs = [o for o in flat_outputs[:num_fwd_outputs] if isinstance(o, fx.Node)]
    bwd_outputs = [o for o in flat_outputs[num_fwd_outputs:] if isinstance(o, fx.Node)]

    backward: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "output":
            continue
        if (
            (node.op == "placeholder" and placeholder_kind(node).backward_input)
            or node.meta.get("partitioner_tag") == "must_be_in_backward"
            or (node.meta.get("partitioner_tag") == "is_backward" and mutates(node))
            or any(a in backward for a in node.all_input_nodes)
        ):
            backward.add(node)
    forward = _ancestors(fwd_outputs, stop=backward)

    # Values the backward reads directly, then only their forward ancestors matter.
    needed_nodes = {a for n in backward for a in n.all_input_nodes if a not in backward}
    needed_nodes.update(o for o in bwd_outputs if o not in backward)
    relevant = _ancestors(needed_nodes, stop=backward)
    # A replayed random op's value reads its RNG state when recomputed (an edge the graph
    # does not have: the state is its sibling, pair[0] beside pair[1]).
    states = {v: rng_state_of(v) for v in relevant}
    states = {v: s for v, s in states.items() if s is not None}
    relevant.update(states.values())
    nodes = tuple(n for n in graph.nodes if n in relevant)
    index = {n: i for i, n in enumerate(nodes)}
    never_saved = replayed_input_mutations(graph)

    edges, nbytes, weights, costs = [], [], [], []
    must_save, soft_banned, reasons, offload, regions = set(), set(), {}, set(), {}
    for i, node in enumerate(nodes):
        edges.extend((index[a], i) for a in node.all_input_nodes if a in index)
        if node in states:
            edges.append((index[states[node]], i))
        size = 0 if is_graph_input(node) else value_nbytes(node.meta.get("val"))
        nbytes.append(size)
        weights.append(_save_weight(node, size, never_saved))
        # Unclaimed values (not needed by the forward outputs) run once either way: free.
        costs.append(node_flops(node) if node in forward else 0)
        in_region = "recompute" in node.meta
        if in_region and "ac_graph_id" in node.meta:
            regions[node.name] = int(node.meta["ac_graph_id"])
        reason, soft = _classify(node, in_region)
        if reason is None and in_region and weights[-1] is not None and _leaves_region(node, forward):
            # A region's outputs that feed the next region stay computed by the forward (as
            # eager checkpoint keeps them): that region is recomputed from them, not from the
            # start of the model.
            reason, soft = NoRecompute.BOUNDARY, True
        if reason is not None:
            reasons[node.name] = reason
            (soft_banned if soft else must_save).add(i)
        if node.meta.get("recompute") in _OFFLOAD:
            offload.add(node.name)
    problem = Problem(
        names=tuple(n.name for n in nodes),
        edges=tuple(edges),
        nbytes=tuple(nbytes),
        save_weight=tuple(weights),
        recompute_cost=tuple(costs),
        must_save=frozenset(must_save),
        soft_banned=frozenset(soft_banned),
        needed=frozenset(index[n] for n in needed_nodes),
    )
    return JointInfo(problem, nodes, frozenset(forward), frozenset(backward), reasons, frozenset(offload), regions)


def _leaves_region(node: fx.Node, forward: set[fx.Node]) -> bool:
    """Read by the forward of another checkpoint region (values leaving the last region
    for untagged code stay recomputable, as torch's partitioner does)."""
    region = node.meta.get("ac_graph_id")
    return any(u.meta.get("ac_graph_id") not in (None, region) for u in node.users if u in forward)


def _ancestors(roots: Any, *, stop: set[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [r for r in roots if r not in stop]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(a for a in node.all_input_nodes if a not in stop and a not in seen)
    return seen
