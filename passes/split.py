"""Apply step of the partitioner: build the forward and backward graphs from a plan.

:func:`split` walks the joint graph once, copying each node into the forward graph, the
backward graph, or both (a recomputed value), with its ``node.meta`` (``"val"`` included).
The layout is AOTAutograd's: the forward returns its own outputs, then the saved tensors,
then the saved SymInts; the backward takes the saved SymInts, the saved tensors, then the
tangents (and any backward seeds / backward state).

Example::

    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> def joint(primals, tangents):
    ...     y = torch.ops.aten.sin.default(primals)
    ...     return [y, torch.ops.aten.mul.Tensor(tangents, torch.ops.aten.cos.default(primals))]
    >>> gm = make_fx(joint)(torch.randn(4), torch.randn(4))
    >>> fw, bw = split(gm, saved=("primals_1",), recomputed=("cos",), offloaded=(), num_fwd_outputs=1)
    >>> [n.name for n in bw.graph.nodes]
    ['primals_1', 'tangents_1', 'cos', 'mul', 'output']
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import find_symbol_binding_fx_nodes, free_symbols

from .facts import PlaceholderKind, placeholder_kind
from .rng_replay import replayed_op, rng_state_of

_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _is_backward_placeholder(node: fx.Node) -> bool:
    # Tangents and backward RNG seeds: backward inputs only (the BackwardState is an
    # input of both graphs).
    return placeholder_kind(node) in (PlaceholderKind.TANGENT, PlaceholderKind.BACKWARD_SEED)


def _is_backward_state(node: fx.Node) -> bool:
    return placeholder_kind(node) is PlaceholderKind.BACKWARD_STATE


def is_sym(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), _SYM)


def symbol_bindings(graph: fx.Graph, values: Iterable[fx.Node], bound: Iterable[fx.Node]) -> list[fx.Node]:
    """SymInt nodes that bind the free symbols of ``values`` not already bound by ``bound``:
    a backward input with a symbolic size needs its symbols passed along."""
    binding = find_symbol_binding_fx_nodes(graph)
    have = set().union(*(free_symbols(n.meta["val"]) for n in bound if "val" in n.meta))
    extra: dict[fx.Node, None] = {}
    for node in values:
        for symbol in sorted(free_symbols(node.meta.get("val")) - have, key=lambda s: s.name):
            if symbol in binding and binding[symbol] not in bound:
                extra[binding[symbol]] = None
    return list(extra)


def split(
    joint_module: fx.GraphModule,
    *,
    saved: Iterable[str],
    recomputed: Iterable[str],
    offloaded: Iterable[str],
    num_fwd_outputs: int,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward modules of ``joint_module`` for a plan (names of saved values,
    recomputed values, and saved values that go through CPU memory)."""
    graph = joint_module.graph
    by_name = {n.name: n for n in graph.nodes}
    saved_nodes = [by_name[name] for name in saved]
    saved_tensors = [n for n in saved_nodes if not is_sym(n)]
    saved_syms = [n for n in saved_nodes if is_sym(n)]
    recompute = {by_name[name] for name in recomputed}
    offload = {by_name[name] for name in offloaded}
    output = graph.output_node()
    flat_outputs = torch.utils._pytree.arg_tree_leaves(*output.args)
    descs = torch.utils._pytree.arg_tree_leaves(output.meta.get("desc", [None] * len(flat_outputs)))

    fw_graph, bw_graph = fx.Graph(), fx.Graph()
    fw_env: dict[fx.Node, fx.Node] = {}
    bw_env: dict[fx.Node, fx.Node] = {}
    # AOTAutograd's backward calling convention: saved SymInts, saved tensors, tangents and
    # backward seeds, then the BackwardState last (compiled autograd passes it there; it is
    # a forward input too, so in graph order it would come before the tangents).
    placeholders = graph.find_nodes(op="placeholder")
    bw_inputs = saved_syms + saved_tensors
    bw_inputs += [n for n in placeholders if _is_backward_placeholder(n)]
    bw_inputs += [n for n in placeholders if _is_backward_state(n)]
    for node in bw_inputs:
        bw_env[node] = _placeholder(bw_graph, node, to_cpu=node in offload)
        if node in offload:  # back to the original device at the start of the backward
            bw_env[node] = _to_device(bw_graph, bw_env[node], node.meta["val"])
    backward: set[fx.Node] = set()

    # The one linear pass: forward nodes go to the forward graph (dead ones are removed
    # below); tangent-dependent nodes go to the backward graph, pulling in the recomputed
    # values they read.
    for node in graph.nodes:
        if node.op == "output":
            break
        if node.op == "placeholder":
            if _is_backward_placeholder(node):
                backward.add(node)
            else:
                fw_env[node] = _placeholder(fw_graph, node, to_cpu=False)
            continue
        in_backward = any(a in backward for a in node.all_input_nodes) or node.meta.get("partitioner_tag") == "must_be_in_backward"
        if in_backward:
            backward.add(node)
        else:
            fw_env[node] = fw_graph.node_copy(node, fw_env.__getitem__)
        if in_backward and node not in bw_env:
            _emit(bw_graph, bw_env, node, recompute)

    fw_saved = [fw_env[n] for n in saved_tensors]
    fw_saved = [_to_cpu(fw_graph, v) if n in offload else v for n, v in zip(saved_tensors, fw_saved)]
    fw_outs = [fw_env[o] if isinstance(o, fx.Node) else o for o in flat_outputs[:num_fwd_outputs]]
    fw_out = fw_graph.output(tuple(fw_outs + fw_saved + [fw_env[n] for n in saved_syms]))
    bw_outs = [_emit(bw_graph, bw_env, o, recompute) if isinstance(o, fx.Node) else o for o in flat_outputs[num_fwd_outputs:]]
    bw_out = bw_graph.output(tuple(bw_outs))
    _set_descs(fw_out, descs[:num_fwd_outputs], len(saved_nodes))
    bw_out.meta["desc"] = descs[num_fwd_outputs:]
    for g in (fw_graph, bw_graph):
        g.eliminate_dead_code()
        g.lint()
    return _graph_module(joint_module, fw_graph), _graph_module(joint_module, bw_graph)


def _graph_module(root: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A graph module whose Python code is generated on first use (as torch's partitioner
    does): generating it eagerly took 40% of the time of a 64-block partition."""
    try:
        from torch.fx._lazy_graph_module import _make_graph_module
    except ImportError:
        return fx.GraphModule(root, graph)
    return _make_graph_module(root, graph)


def _emit(graph: fx.Graph, env: dict[fx.Node, fx.Node], node: fx.Node, recompute: set[fx.Node]) -> fx.Node:
    """Copy ``node`` into the backward graph, first recomputing the inputs it lacks.

    Recomputed values are emitted on demand, right before their first backward use, as
    autograd runs a checkpointed region's recompute just before its backward: recomputing
    all of them at the start of the backward would bring the peak memory back.

    A replayed random op's value (:mod:`.rng_replay`) is recomputed from its saved RNG state
    and the op's inputs, as ``run_with_rng_state``: never by running its
    ``run_and_save_rng_state`` pair again, which would draw new numbers."""
    stack = [(node, False, None)]
    while stack:
        current, inputs_ready, state = stack.pop()
        if current in env:
            continue
        if not inputs_ready:
            state = rng_state_of(current)
            stack.append((current, True, state))
            inputs = current.all_input_nodes if state is None else [state, *current.args[0].all_input_nodes]
            for a in reversed(inputs):
                if a not in env:
                    if a not in recompute:
                        _lookup(env, a, current)  # raises: neither saved nor recomputed
                    stack.append((a, False, None))
            continue
        lookup = lambda a, user=current: _lookup(env, a, user)  # noqa: E731
        if state is not None:
            env[current] = replayed_op(graph, current, lookup(state), lookup)
        else:
            env[current] = graph.node_copy(current, lookup)
        if current.op == "call_function":
            env[current].meta["autograd_backward"] = True
    return env[node]


def _lookup(env: dict[fx.Node, fx.Node], node: fx.Node, user: fx.Node) -> fx.Node:
    try:
        return env[node]
    except KeyError:
        raise RuntimeError(
            f"partition: the backward needs {node.name} (for {user.format_node()}) but the plan "
            "neither saves nor recomputes it; this is a bug in ckpt_compile.passes, please report it"
        ) from None


def _placeholder(graph: fx.Graph, node: fx.Node, *, to_cpu: bool) -> fx.Node:
    new = graph.placeholder(node.name)
    new.meta = dict(node.meta)
    if to_cpu:
        new.meta["val"] = _cpu_like(node.meta["val"])
    return new


def _cpu_like(val: torch.Tensor) -> torch.Tensor:
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
    with mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="cpu")


def _to_cpu(graph: fx.Graph, value: fx.Node) -> fx.Node:
    """*_CPU_OFFLOAD: the saved value moves to CPU at the end of the forward."""
    source = value.meta["val"]
    copy = graph.call_function(
        torch.ops.aten._to_copy.default, (value,),
        {"device": torch.device("cpu"), "non_blocking": source.device.type == "cuda"},
    )
    copy.meta = {**value.meta, "val": _cpu_like(source)}
    return copy


def _to_device(graph: fx.Graph, value: fx.Node, original: torch.Tensor) -> fx.Node:
    copy = graph.call_function(
        torch.ops.aten._to_copy.default, (value,),
        {"device": original.device, "non_blocking": original.device.type == "cuda"},
    )
    copy.meta = {**value.meta, "val": original}
    return copy


def _set_descs(out: fx.Node, fwd_descs: list, num_saved: int) -> None:
    try:
        from torch._functorch._aot_autograd.descriptors import SavedForBackwardsAOTOutput
    except ImportError:  # descriptors are informational; older layouts simply lack them
        return
    out.meta["desc"] = list(fwd_descs) + [SavedForBackwardsAOTOutput(i) for i in range(num_saved)]
