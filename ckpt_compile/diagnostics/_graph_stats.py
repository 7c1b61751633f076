"""Graph-size figures: of one compiled partition (FX graphs) and of an eager forward pass.

Compiled side, used by the backend's report (:mod:`ckpt_compile.diagnostics._report`):
:func:`partition_figures` counts the nodes, saved tensors and recomputed work of a
forward/backward pair straight from the graphs, and :func:`baseline_partition` partitions
the same joint graph again with every checkpoint tag removed (the no-checkpoint baseline,
without a second compile).

Eager side: :func:`autograd_nodes` counts the autograd nodes reachable from an output,
:func:`saved_tensor_bytes` the activation bytes a forward pass leaves for the backward,
with or without our eager checkpointing (selective checkpointing's cache included).

>>> import torch, ckpt_compile as cc
>>> lin = torch.nn.Linear(512, 512)
>>> x = torch.randn(512, 512)
>>> saved_tensor_bytes(lambda: lin(x).relu().sin()) // 2**20   # x (weight grad), relu's output
2
>>> region = lambda t: lin(t).relu().sin()
>>> saved_tensor_bytes(lambda: cc.checkpoint(region, x, use_reentrant=False)) // 2**20  # x only
1
>>> autograd_nodes(lin(x).relu().sin())  # sin, relu, addmm, t, 2 AccumulateGrad
6
"""
from __future__ import annotations

from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

__all__ = ["autograd_nodes", "saved_tensor_bytes", "partition_figures", "baseline_partition"]

# Keys that mark a joint-graph node as part of a checkpoint region (written by Dynamo's
# lowering of the checkpoint HOP and by ckpt_compile.passes.tag_recompute).
_REGION_META = ("recompute", "ac_graph_id", "ckpt_rng_exact", "ckpt_tag_reason")


# ---------------------------------------------------------------- eager


def autograd_nodes(output: torch.Tensor) -> int:
    """Number of distinct autograd nodes reachable from ``output.grad_fn`` (0 for a leaf).

    A checkpointed region shows up as its few boundary nodes here: the nodes inside it are
    only built again during the backward.

    >>> import torch, ckpt_compile as cc
    >>> lin = torch.nn.Linear(4, 4)
    >>> x = torch.randn(2, 4)
    >>> cc.autograd_nodes(lin(x).relu().sin())  # sin, relu, addmm, t, 2 AccumulateGrad
    6
    >>> cc.autograd_nodes(cc.checkpoint(lambda t: lin(t).relu().sin(), x, use_reentrant=False))
    6
    """
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"autograd_nodes(output): expected a torch.Tensor, got {type(output).__name__}")
    seen: set = set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions if next_fn is not None)
    return len(seen)


def saved_tensor_bytes(forward: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs.

    Counted with a ``saved_tensors_hooks`` pack hook; parameters and inputs saved by an op
    count too (they are what a region saves at its boundary). Selective checkpointing's
    cache (``ckpt_compile.create_selective_checkpoint_contexts``) is added: it holds
    activations that autograd never sees.

    >>> import torch, ckpt_compile as cc
    >>> lin = torch.nn.Linear(512, 512)
    >>> x = torch.randn(512, 512)          # 1 MiB of float32
    >>> cc.saved_tensor_bytes(lambda: lin(x).relu().sin()) // 2**20   # x (weight grad), relu's output
    2
    >>> cc.saved_tensor_bytes(lambda: cc.checkpoint(lambda t: lin(t).relu().sin(), x, use_reentrant=False)) // 2**20
    1
    """
    return sum(saved_storages(forward).values())


def saved_storages(forward: Callable[[], Any]) -> dict[int, int]:
    """What :func:`saved_tensor_bytes` sums: storage data pointer -> bytes."""
    from ckpt_compile.eager import _selective

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with _selective._observe_caches() as modes, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    for mode in modes:
        storages.update(_selective._cached_storages(mode))
    return storages


# ---------------------------------------------------------------- compiled


def baseline_partition(joint_module: fx.GraphModule, partition_fn: Callable, *args, **kwargs):
    """``partition_fn(joint_module, *args, **kwargs)`` with every checkpoint tag hidden:
    the partition of the same model compiled with no checkpointing at all. The tags are
    put back afterwards (the joint graph is AOTAutograd's, shared with the real partition).
    """
    hidden: list[tuple[fx.Node, dict[str, Any]]] = []
    for node in joint_module.graph.nodes:
        tags = {k: node.meta.pop(k) for k in _REGION_META if k in node.meta}
        if tags:
            hidden.append((node, tags))
    try:
        return partition_fn(joint_module, *args, **kwargs)
    finally:
        for node, tags in hidden:
            node.meta.update(tags)


def saved_nodes(fw_module: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    """Activations the forward hands to the backward: AOTAutograd's forward returns (user
    outputs..., saved tensors..., saved SymInts...); graph inputs (parameters, user inputs)
    are excluded, they stay alive whether or not anything is checkpointed."""
    outputs = fw_module.graph.output_node().args[0]
    return [
        n for n in outputs[num_fwd_outputs:]
        if isinstance(n, fx.Node) and n.op != "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
    ]


def calls(module: fx.GraphModule) -> list[fx.Node]:
    """The operator nodes of a graph (what the report counts as its nodes)."""
    return [n for n in module.graph.nodes if n.op == "call_function"]


def recomputed_nodes(fw_module: fx.GraphModule, bw_module: fx.GraphModule) -> list[fx.Node]:
    """Backward nodes that repeat forward work: the plan's recomputed names when the
    partitioner attached one, else backward copies of forward-tagged nodes."""
    plan = bw_module.meta.get("ckpt_partition") or fw_module.meta.get("ckpt_partition")
    backward = calls(bw_module)
    if plan is not None:
        names = set(plan.recomputed)
        return [n for n in backward if n.name in names]
    return [n for n in backward if n.meta.get("partitioner_tag") == "is_forward"]


def node_bytes(node: fx.Node) -> tuple[int, sympy.Expr]:
    """(bytes at the example inputs' sizes, bytes as a size expression) of a tensor node."""
    from ckpt_compile.passes.facts import value_nbytes

    value = node.meta["val"]
    numel = value.numel()
    expr = numel.node.expr if isinstance(numel, torch.SymInt) else sympy.Integer(numel)
    # At the example inputs' sizes by the plan's rule (passes.facts.size_hint).
    return value_nbytes(value), expr * value.element_size()


def partition_figures(fw_module: fx.GraphModule, bw_module: fx.GraphModule, num_fwd_outputs: int) -> dict[str, Any]:
    """Node counts, saved tensors and recompute work of one forward/backward pair."""
    from ckpt_compile.passes.problem import node_flops

    saved = saved_nodes(fw_module, num_fwd_outputs)
    sizes = [node_bytes(n) for n in saved]
    expr = sympy.Add(*(e for _, e in sizes)) if sizes else sympy.Integer(0)
    recomputed = recomputed_nodes(fw_module, bw_module)
    plan = fw_module.meta.get("ckpt_partition")
    return {
        "forward_nodes": len(calls(fw_module)),
        "backward_nodes": len(calls(bw_module)),
        "saved_tensors": len(saved),
        "saved_bytes": sum(b for b, _ in sizes),
        # Symbolic sizes (dynamic=True) also print as an expression of the size symbols.
        "saved_bytes_expr": None if expr.is_number else str(expr),
        "recomputed_nodes": len(recomputed),
        "recompute_flops": sum(node_flops(n) for n in recomputed),
        "forward_flops": sum(node_flops(n) for n in calls(fw_module)),
        "offloaded_nodes": len(plan.offloaded) if plan is not None else 0,
    }


def format_bytes(n: int) -> str:
    """``1536`` -> ``"1.50 KiB"``: binary units, two decimals."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def graph_structure(fw_module: fx.GraphModule, bw_module: fx.GraphModule, num_fwd_outputs: int,
                    region_of: dict[str, int]) -> dict[str, Any]:
    """The partitioned graph as plain JSON data for :func:`render_svg`.

    ``nodes``: ``[name, side, status, region]`` rows (side ``"forward"``/``"backward"``,
    status ``saved``, ``banned``, ``forward``, ``recomputed`` or ``backward``); ``edges``: data edges within a side as index pairs;
    ``cut``: a saved forward value -> the backward node reading it.
    """
    plan = fw_module.meta.get("ckpt_partition")
    banned = {name for name, _ in plan.banned} if plan is not None else set()
    saved = {n.name for n in saved_nodes(fw_module, num_fwd_outputs)}
    recomputed = {n.name for n in recomputed_nodes(fw_module, bw_module)}
    nodes, index, edges, cut = [], {}, [], []
    for side, module in (("forward", fw_module), ("backward", bw_module)):
        for node in calls(module):
            if side == "forward":
                status = "saved" if node.name in saved else "banned" if node.name in banned else "forward"
            else:
                status = "recomputed" if node.name in recomputed else "backward"
            index[side, node.name] = len(nodes)
            nodes.append([node.name, side, status, region_of.get(node.name)])
            for source in node.all_input_nodes:
                if (side, source.name) in index and source.op == "call_function":
                    edges.append([index[side, source.name], index[side, node.name]])
                elif side == "backward" and source.op == "placeholder" and ("forward", source.name) in index:
                    cut.append([index["forward", source.name], index[side, node.name]])
    return {"nodes": nodes, "edges": edges, "cut": cut}
