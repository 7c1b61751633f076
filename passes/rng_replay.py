"""Random ops recomputed with the forward's RNG state: the backward draws the same numbers.

A random op in a checkpoint region (eager ``native_dropout``, ``rand_like``, ``bernoulli``
... under ``inner="eager"`` or inductor's ``fallback_random``) is rewritten in the joint
graph, by the tagging pass, as::

    pair  = run_and_save_rng_state(op, *args)    # the RNG state before op, and op's result
    state = pair[0]                              # a small CPU uint8 tensor (5056 B on CPU,
    value = pair[1]                              #   16 B for CUDA's Philox seed and offset)

``value`` takes the op's place. The forward runs as before (the state is read, not
changed). If the plan recomputes ``value``, the backward runs
``run_with_rng_state(state, op, *args)`` instead: the saved state is set, ``op`` runs, the
backward's own RNG state is put back. The cut problem sees ``state`` as a value that may
not be recomputed and that ``value`` reads, so recomputing the op costs saving the state,
and the min-cut picks whichever of the state or the op's output (the dropout mask) is
smaller. torch's partitioner does the same for its own recomputed random ops
(``functionalize_rng_ops``); these are torch's higher-order operators, which eager and
inductor (as fallback kernels) both run.

Graphs run as they are (``inner="eager"``) call :func:`run_eagerly` first: it swaps the two
higher-order operators for plain functions that do the same, so that a
``TorchDispatchMode`` active around the step (``FlopCounterMode``, an op counter) sees the
random op itself rather than an operator it may not support.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .facts import TagReason, tensors_of

__all__ = ["can_replay", "is_rng_state", "replay_random_op", "replayed_op", "rng_state_of", "run_eagerly"]

_DEVICES = ("cpu", "cuda")


@functools.cache
def _hops():
    from torch._prims import rng_prims

    return rng_prims.run_and_save_rng_state, rng_prims.run_with_rng_state


def can_replay(node: fx.Node) -> bool:
    """Whether the random op ``node`` can be rewritten: its tensors live on one CPU or CUDA
    device (whose RNG state torch can read and set) and it takes no explicit generator."""
    if node.kwargs.get("generator") is not None:
        return False
    devices = {t.device.type for t in tensors_of(node.meta.get("val"))}
    return len(devices) == 1 and devices <= set(_DEVICES)


def _state_value(node: fx.Node) -> torch.Tensor:
    """A fake (or meta) stand-in for the RNG state the op's device keeps: shape and dtype of
    ``torch.get_rng_state()`` on CPU, of the Philox seed and offset (16 bytes) for CUDA."""
    val = tensors_of(node.meta["val"])[0]
    numel = 16 if val.device.type == "cuda" else torch.get_rng_state().numel()
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return torch.empty(numel, dtype=torch.uint8, device="meta")
    with mode:
        return torch.empty(numel, dtype=torch.uint8, device="cpu")


def replay_random_op(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Rewrite the random op ``node`` of a joint graph as ``run_and_save_rng_state`` (see the
    module docstring); return the node that now carries its value."""
    run_and_save, _ = _hops()
    with graph.inserting_before(node):
        pair = graph.call_function(run_and_save, (node.target, *node.args), dict(node.kwargs))
        state = graph.call_function(operator.getitem, (pair, 0))
        value = graph.call_function(operator.getitem, (pair, 1))
    state_val = _state_value(node)
    region = {k: node.meta[k] for k in ("partitioner_tag", "ac_graph_id", "stack_trace", "custom") if k in node.meta}
    pair.meta = {**node.meta, "val": (state_val, node.meta["val"]), "ckpt_tag_reason": TagReason.RNG_REPLAY}
    # The state is not recomputable (it is what makes the recompute exact) and is saved only
    # when the op is recomputed: MUST_SAVE inside the region, rng_state_of() outside it.
    state.meta = {**region, "val": state_val, "recompute": CheckpointPolicy.MUST_SAVE,
                  "ckpt_tag_reason": TagReason.RNG_STATE}
    value.meta = {**node.meta, "ckpt_tag_reason": TagReason.RNG_REPLAY}
    node.replace_all_uses_with(value)
    graph.erase_node(node)
    return value


def _pair(node: fx.Node, index: int) -> fx.Node | None:
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1] != index:
        return None
    pair = node.args[0]
    run_and_save, _ = _hops()
    return pair if isinstance(pair, fx.Node) and pair.target is run_and_save else None


def rng_state_of(node: fx.Node) -> fx.Node | None:
    """The RNG-state node a replayed op's value reads (``pair[0]`` for ``value = pair[1]``),
    or None when ``node`` is not such a value."""
    pair = _pair(node, 1)
    if pair is None:
        return None
    return next((u for u in pair.users if _pair(u, 0) is pair), None)


def is_rng_state(node: fx.Node) -> bool:
    """Whether ``node`` is the saved RNG state of a replayed op (``pair[0]``)."""
    return _pair(node, 0) is not None


def replayed_op(graph: fx.Graph, node: fx.Node, state: fx.Node, lookup) -> fx.Node:
    """Emit, in the backward ``graph``, the recompute of the replayed value ``node`` as
    ``run_with_rng_state(state, op, *args)``; ``lookup`` maps joint nodes to backward ones."""
    _, run_with = _hops()
    pair = node.args[0]
    op, *args = pair.args
    args, kwargs = fx.node.map_arg((tuple(args), dict(pair.kwargs)), lookup)
    new = graph.call_function(run_with, (state, op, *args), kwargs)
    new.meta = dict(node.meta)
    return new


# ---------------------------------------------------------------------------- eager
def _device(args, kwargs) -> torch.device:
    for t in tensors_of([*args, *kwargs.values()]):
        return t.device
    return torch.device("cpu")


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state.cpu(), device)
    else:
        torch.set_rng_state(state)


def _run_and_save_rng_state(op, *args, **kwargs):
    """``run_and_save_rng_state`` as a plain function: (the state before ``op``, its result)."""
    return _get_state(_device(args, kwargs)), op(*args, **kwargs)


def _run_with_rng_state(state, op, *args, **kwargs):
    """``run_with_rng_state`` as a plain function: ``op`` under ``state``, the current state
    put back afterwards (also when ``op`` raises)."""
    device = _device(args, kwargs)
    current = _get_state(device)
    _set_state(device, state)
    try:
        return op(*args, **kwargs)
    finally:
        _set_state(device, current)


def run_eagerly(module: fx.GraphModule) -> fx.GraphModule:
    """``module`` with the replay's higher-order operators swapped for plain functions (in
    place; see the module docstring)."""
    run_and_save, run_with = _hops()
    plain = {run_and_save: _run_and_save_rng_state, run_with: _run_with_rng_state}
    changed = False
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in plain:
            node.target = plain[node.target]
            changed = True
    if changed:
        module.recompile()
    return module
