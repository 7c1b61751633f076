"""Turn checkpoint annotations on a joint graph into per-node recompute policies.

Entry point: :func:`tag_recompute` (``ckpt_compile.passes.tag_recompute``). It runs on the
joint forward+backward graph that AOTAutograd hands to a partitioner, before the
min-cut (``ckpt_compile.passes.partition``) reads the tags. Contract with the partitioner:

- ``node.meta["recompute"]``: a ``torch.utils.checkpoint.CheckpointPolicy`` on forward
  nodes inside a checkpoint region (absent outside every region);
- ``node.meta["ac_graph_id"]``: the int id of that region;
- ``node.meta["ckpt_rng_exact"] = True``: a random op whose recompute reproduces the
  forward's values (the partitioner never recomputes any other random op);
- the one graph change: a region's other random ops become ``run_and_save_rng_state``
  pairs (:mod:`.rng_replay`), whose value the partitioner recomputes with the saved state.

Where the annotations come from:

1. ``torch.utils.checkpoint.checkpoint`` and ``ckpt_compile.checkpoint`` inside a compiled
   model (both lower to the ``tag_activation_checkpoint`` higher-order op): AOTAutograd's
   tracing already wrote ``recompute`` / ``ac_graph_id`` on every forward node of the
   region, with selective policies evaluated per aten op by PyTorch's
   ``_CachingTorchDispatchMode`` while the region was traced.
2. ``torch.fx.traceback.annotate({"ckpt_region": k})`` around code inside a compiled
   model, optionally with ``"ckpt_policy": "MUST_SAVE"`` (any ``CheckpointPolicy`` name;
   default ``"PREFER_RECOMPUTE"``): the annotation arrives as ``node.meta["custom"]``
   and becomes a region with a fresh id.

What this pass adds on top, so that compiled checkpointing behaves like eager (issue 4):

- **Region boundaries are saved as eager saves them.** Eager checkpointing saves the
  inputs of every region and never recomputes one region to feed another. A region node
  read by the forward of another region, directly or through untagged forward code, is
  therefore ``MUST_SAVE`` (reason ``"boundary"``; PyTorch's own partitioner only keeps
  such a boundary when region ids increase in program order). A region's value read only
  by untagged code that reaches no other region (the tail of the model: final norm, head,
  loss) is not forced: the min-cut may recompute it with its region, as torch does. The
  partitioner may still drop a boundary the backward can rebuild cheaply
  (``ckpt_compile.passes.saving``).
- **Random ops stay exact.** (Attention kernels with ``dropout_p == 0`` draw nothing and
  are not random here, although every SDPA kernel carries the ``nondeterministic_seeded``
  tag: their recompute is exact, so their outputs need not be kept.) Inductor's seeded
  random (``prims.inductor_random``, produced by inductor's ``replace_random_passes``
  before partitioning) recomputes bit-identically from its saved seed: marked
  ``ckpt_rng_exact``. Any other random op in a region (eager ``native_dropout``,
  ``rand_like``, ``bernoulli`` ... under ``inner="eager"`` or ``fallback_random``) is
  rewritten to run with a saved RNG state (:mod:`.rng_replay`): recomputing it replays the
  forward's numbers, at the price of saving that state (reason ``"rng_replay"``). A random
  op that cannot be replayed (an explicit generator, an unusual device) is ``MUST_SAVE``,
  and so is everything in the region computed from random values alone (the dropout
  mask), so the cheapest thing saved is the bool mask rather than the float noise.
- **Policies are normalised** to ``torch.utils.checkpoint.CheckpointPolicy`` (a ``bool``
  from a selective policy means save / recompute, as in PyTorch); ``*_CPU_OFFLOAD`` is kept
  as is: the partitioner saves such a value and moves it to CPU.

Every node this pass changes records why in ``node.meta["ckpt_tag_reason"]``, a
:class:`~.facts.TagReason` (``"boundary"``, ``"random"``, ``"random_exact"``, ``"rng_replay"``, ``"rng_state"``,
``"annotation"``).

>>> import torch
>>> from torch.utils.checkpoint import CheckpointPolicy
>>> g = torch.fx.Graph()
>>> x = g.placeholder("x")
>>> a = g.call_function(torch.ops.aten.sin.default, (x,))
>>> b = g.call_function(torch.ops.aten.cos.default, (a,))
>>> out = g.output((b,))
>>> for n, region in ((a, 0), (b, 1)):
...     n.meta["partitioner_tag"] = "is_forward"
...     if region is not None:
...         n.meta.update(recompute=CheckpointPolicy.PREFER_RECOMPUTE, ac_graph_id=region)
>>> gm = tag_recompute(torch.fx.GraphModule(torch.nn.Module(), g))
>>> a.meta["recompute"], a.meta["ckpt_tag_reason"]
(<CheckpointPolicy.MUST_SAVE: 0>, <TagReason.BOUNDARY: 'boundary'>)
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .facts import TagReason, as_policy, draws_random
from .rng_replay import can_replay, replay_random_op

__all__ = ["tag_recompute"]

_RECOMPUTE = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)

# Random ops whose recompute is exact: inductor's replace_random_passes rewrites every
# random op of the joint graph into these, reading a seed that is computed once in the
# forward (a nondeterministic `inductor_seeds` node outside any region). Matched by name:
# the prims exist only once torch._inductor has been imported.
_SEEDED_RANDOM = frozenset({"prims::inductor_random", "prims::inductor_randint"})
# The seeds those read: a few bytes, saved rather than replayed (torch 2.15 traces the
# inductor_seeds node into the region; replaying it would run inductor's seed kernel as
# an eager fallback, so the compiled model would draw other numbers than without regions).
_SEEDS = frozenset({"prims::inductor_seeds"})

# Annotation keys read from node.meta["custom"] (torch.fx.traceback.annotate).
REGION_KEY = "ckpt_region"
POLICY_KEY = "ckpt_policy"


def tag_recompute(joint_module: fx.GraphModule) -> fx.GraphModule:
    """Write per-node recompute policies on ``joint_module`` (in place) and return it.

    ``joint_module`` is a joint graph as AOTAutograd passes it to a partitioner: every
    node carries ``meta["partitioner_tag"]``. See the module docstring for the rules.
    """
    if not isinstance(joint_module, fx.GraphModule):
        raise TypeError(
            "tag_recompute(joint_module): expected a torch.fx.GraphModule (the joint graph "
            f"AOTAutograd hands to a partitioner), got {type(joint_module).__name__}"
        )
    graph = joint_module.graph
    forward = [n for n in graph.nodes if _is_forward(n)]
    _normalise_policies(forward)
    _regions_from_annotations(forward)
    _keep_random_exact(graph, forward)
    forward = [n for n in graph.nodes if _is_forward(n)]  # random ops were rewritten
    _save_region_boundaries(forward)
    graph.lint()
    return joint_module


def _is_forward(node: fx.Node) -> bool:
    return node.op == "call_function" and node.meta.get("partitioner_tag") == "is_forward"


def _normalise_policies(forward: list[fx.Node]) -> None:
    # Selective policies may return bools, and another CheckpointPolicy-like enum (for
    # example a re-export) must reach the partitioner as PyTorch's own members.
    for node in forward:
        if "recompute" in node.meta:
            node.meta["recompute"] = _as_policy(node.meta["recompute"], node)


def _as_policy(value: object, node: fx.Node) -> CheckpointPolicy:
    policy = as_policy(value)  # a member, or a bool (True means save)
    if policy is not None:
        return policy
    # An annotation's policy name, or another CheckpointPolicy-like enum's member.
    name = value if isinstance(value, str) else getattr(value, "name", None)
    if isinstance(name, str) and name in CheckpointPolicy.__members__:
        return CheckpointPolicy[name]
    raise ValueError(
        f"tag_recompute: node {node.format_node()} has recompute policy {value!r}; expected "
        f"a torch.utils.checkpoint.CheckpointPolicy, a bool, or one of the names "
        f"{sorted(CheckpointPolicy.__members__)}"
    )


def _regions_from_annotations(forward: list[fx.Node]) -> None:
    # Annotated regions get ids after every id already in the graph, in program order,
    # so they never collide with PyTorch's process-wide ac_graph_id counter.
    used = [n.meta["ac_graph_id"] for n in forward if isinstance(n.meta.get("ac_graph_id"), int)]
    next_id = max(used, default=-1) + 1
    ids: dict[object, int] = {}
    for node in forward:
        custom = node.meta.get("custom") or {}
        if REGION_KEY not in custom or "recompute" in node.meta:
            continue  # a checkpoint call inside an annotated block keeps its own tags
        key = custom[REGION_KEY]
        if key not in ids:
            ids[key] = next_id
            next_id += 1
        node.meta["ac_graph_id"] = ids[key]
        node.meta["recompute"] = _as_policy(custom.get(POLICY_KEY, "PREFER_RECOMPUTE"), node)
        node.meta["ckpt_tag_reason"] = TagReason.ANNOTATION


def _is_random(node: fx.Node) -> bool:
    # Attention kernels carry the random-op tag even with dropout_p == 0, where they draw
    # no random numbers and recompute exactly (the problem builder's rule: one definition).
    return isinstance(node.target, torch._ops.OpOverload) and draws_random(node)


def _is_seeded_random(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.name in _SEEDED_RANDOM


def _replayable(node: fx.Node) -> bool:
    return node.target._schema.name not in _SEEDS and can_replay(node)


def _keep_random_exact(graph: fx.Graph, forward: list[fx.Node]) -> None:
    random_derived: set[fx.Node] = set()
    for node in forward:
        if "recompute" not in node.meta:
            continue
        if _is_seeded_random(node):
            node.meta["ckpt_rng_exact"] = True
            node.meta["ckpt_tag_reason"] = TagReason.RANDOM_EXACT
            continue
        if _is_random(node) and _replayable(node):
            replay_random_op(graph, node)  # recomputed with the forward's RNG state
            continue
        inputs = node.all_input_nodes
        derived = bool(inputs) and all(i in random_derived for i in inputs)
        if _is_random(node) or derived:
            # Saving the mask (or the op's output) is what keeps gradients equal to eager
            # with preserve_rng_state=True: recomputing would draw new numbers.
            random_derived.add(node)
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            node.meta["ckpt_tag_reason"] = TagReason.RANDOM


def _save_region_boundaries(forward: list[fx.Node]) -> None:
    # Untagged forward nodes from which the forward of some region is reachable through
    # untagged nodes only (walked backwards, so every user is decided first).
    feeds_region: set[fx.Node] = set()
    for node in reversed(forward):
        if "recompute" not in node.meta and any(
            _is_forward(u) and ("recompute" in u.meta or u in feeds_region) for u in node.users
        ):
            feeds_region.add(node)
    for node in forward:
        if node.meta.get("recompute") not in _RECOMPUTE:
            continue
        region = node.meta.get("ac_graph_id")
        for user in node.users:
            if not _is_forward(user):
                continue
            other_region = "recompute" in user.meta and user.meta.get("ac_graph_id") != region
            if other_region or user in feeds_region:
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                node.meta["ckpt_tag_reason"] = TagReason.BOUNDARY
                break
