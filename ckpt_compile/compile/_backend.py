"""The ``torch.compile`` backend ``"ckpt"``: our recompute tags and min-cut, then inductor.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="ckpt")`` works after ``pip install`` without importing
this package; :func:`backend` is also ``ckpt_compile.backend``.

>>> import torch, ckpt_compile as cc
>>> lin = torch.nn.Linear(4, 4)
>>> def f(x):
...     return cc.checkpoint(lambda t: lin(t).relu().sin(), x, use_reentrant=False).sum()
>>> g = torch.compile(f, backend=cc.backend, options={"inner": "eager"}, fullgraph=True)
>>> x = torch.randn(3, 4, requires_grad=True)
>>> g(x).backward()
>>> x.grad.shape
torch.Size([3, 4])

The pipeline (:func:`backend`) reads top to bottom: validate options, fingerprint the
annotations Dynamo captured, build the partitioner (tag recompute policies, then min-cut
with the option's memory budget), compile forward and backward with the inner compiler,
and report. AOTAutograd builds the joint graph and calls the partitioner in between.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import sys
import types
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from ckpt_compile._budget import MemoryBudget
from ckpt_compile.compile._options import BackendOptions, BackendValueError

__all__ = ["backend"]

log = logging.getLogger("ckpt_compile")

# Bump when the tagging or partition contract changes in a way the source hash misses.
_PARTITIONER_VERSION = "1"


def backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options=None, mode=None):
    """Compile a Dynamo graph with checkpoint-aware partitioning.

    ``options`` (from ``torch.compile(..., options={...})``): ``memory_budget`` (the
    activation bytes each compiled graph may save for the backward, parameters and inputs
    never counted: a float in (0, 1] is a fraction of what it saves with no checkpointing,
    default 1.0; a size such as ``"512MiB"`` or an int is bytes), ``inner`` (``"inductor"`` or ``"eager"``), ``report`` (False,
    True to log graph sizes and saved bytes on the ``"ckpt_compile"`` logger at INFO, or a
    path to write them as JSON). ``mode=`` is not supported: use ``options``.

    ``report=path``: when the file already holds a report this backend wrote with the same
    ``memory_budget`` and ``inner``, the new graphs are appended to it (a model split by
    graph breaks, a recompile, a second run); when there is no file, or it holds a report
    of other options, the file is replaced. Any other existing file is an error (nothing
    is overwritten that this backend did not write). Delete the file to start afresh.
    """
    # 1. Options: validated once, here at the boundary, before any compile work (with
    #    backend_with(...) they were already checked when the user wrote them).
    try:
        if mode is not None:
            raise ValueError(
                f'backend="ckpt" does not take mode={mode!r}; pass options={{...}} instead '
                "(memory_budget, inner, report)"
            )
        opts = BackendOptions.from_mapping(options)
    except ValueError as e:
        raise BackendValueError(str(e)) from None
    compiled, reports = compile_graph(gm, example_inputs, opts)
    # 5. Report what the partitioner decided (nothing when the graph has no backward).
    if opts.report is not False and reports:
        _emit_report(reports, opts)
    return compiled


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions):
    """Steps 2 to 4 of :func:`backend`: ``(compiled callable, one report per partition)``.
    ``explain()`` calls it directly, to take the reports as objects."""
    # 2. Capture already happened in Dynamo: regions are tag_activation_checkpoint nodes or
    #    annotate() metadata. Their fingerprint goes into inductor's cache key (node.meta
    #    is not part of it: docs/torch-notes.md, "Stale-cache trap").
    fingerprint = _annotation_fingerprint(gm)
    # 3. Partitioner: tag_recompute on the joint graph, then our min-cut.
    partitioner = _CkptPartitioner(opts, fingerprint)
    # 4. Forward and backward: AOTAutograd builds the joint graph, calls the partitioner,
    #    then the inner compiler.
    if opts.inner == "inductor":
        compiled = _compile_inductor(gm, example_inputs, partitioner, opts)
    else:
        compiled = _compile_eager(gm, example_inputs, partitioner)
    return compiled, partitioner.reports


def show_report(report) -> None:
    """``report=True``: on the ``"ckpt_compile"`` logger at INFO when logging would show
    it, else on stderr, so that asking for a report always shows one."""
    if _logging_shows_info():
        log.info("%s", report)
    else:
        print(report, file=sys.stderr)


def _logging_shows_info() -> bool:
    return log.isEnabledFor(logging.INFO) and log.hasHandlers()


class _CkptPartitioner(CustomPartitionerFn):
    """Partition function: ``tag_recompute`` then ``ckpt_compile.passes.partition``.

    Usable both as inductor's ``custom_partitioner_fn`` and as AOTAutograd's
    ``partition_fn``.
    """

    def __init__(self, options: BackendOptions, fingerprint: str) -> None:
        self.options = options
        self.fingerprint = fingerprint
        self.reports: list[dict[str, Any]] = []

    def __call__(self, joint_module, joint_inputs, **kwargs):
        from ckpt_compile import passes

        joint_module = passes.tag_recompute(joint_module)
        partition_fn = passes.partition
        budget, no_checkpoint_bytes = _partition_budget(
            joint_module, joint_inputs, kwargs, partition_fn, self.options.budget
        )
        try:
            fw_module, bw_module = partition_fn(joint_module, joint_inputs, memory_budget=budget, **kwargs)
        except ValueError as e:
            _raise_budget_error(e, self.options.budget, no_checkpoint_bytes)
        for module in (fw_module, bw_module):
            module.graph.lint()
        self.reports.append(_graph_report(
            joint_module, fw_module, bw_module, kwargs, partition_fn, joint_inputs, self.options.report is not False
        ))
        return fw_module, bw_module

    def uuid(self) -> str:
        # Cache key: our source and version, the options that change code, and the annotations.
        return hashlib.sha256(
            _source_hash() + f"{_PARTITIONER_VERSION};{self.options.fingerprint()};"
            f"{self.fingerprint}".encode()
        ).hexdigest()


def _partition_budget(joint_module, joint_inputs, kwargs, partition_fn, budget: MemoryBudget):
    """``(budget on the partitioner's scale, no-checkpoint saved bytes or None)``.

    docs/api.md: ``memory_budget`` limits the activation bytes this graph saves (graph
    inputs, so parameters, buffers and user inputs, are free): a fraction of what the same
    graph saves with no checkpointing at all, or bytes. The partitioner's ``memory_budget``
    is a fraction of the bytes its own plan saves at 1.0, which for a graph with checkpoint
    regions is already the (smaller) checkpointed figure; without regions the two scales
    coincide and a fraction goes through as it is. Bytes are converted either way.
    """
    fraction = budget.fraction
    has_regions = any("recompute" in node.meta for node in joint_module.graph.nodes)
    if fraction == 1.0 or (fraction is not None and not has_regions):
        return fraction, None
    from ckpt_compile.diagnostics._graph_stats import baseline_partition

    checkpointed = partition_fn(joint_module, joint_inputs, **kwargs)[0].meta["ckpt_partition"].saved_bytes
    no_checkpoint = (baseline_partition(joint_module, partition_fn, joint_inputs, **kwargs)[0].meta["ckpt_partition"]
                     .saved_bytes if has_regions else checkpointed)
    wanted = budget.bytes_of(no_checkpoint)
    if checkpointed == 0 or wanted >= checkpointed:
        return 1.0, no_checkpoint
    # +0.5 byte: the partitioner floors (fraction x its bytes at 1.0); rounding must not
    # take a byte off the budget.
    return (wanted + 0.5) / checkpointed, no_checkpoint


def _raise_budget_error(error: ValueError, budget: MemoryBudget, no_checkpoint_bytes: int | None):
    """Re-raise an infeasible budget in the option's own units (see _partition_budget)."""
    from ckpt_compile.passes.mincut import BudgetTooSmall

    too_small = error.__cause__
    if not isinstance(too_small, BudgetTooSmall) or not no_checkpoint_bytes:
        raise error
    smallest = math.ceil(too_small.min_bytes / no_checkpoint_bytes * 1e4) / 1e4
    use = (f"Use memory_budget >= {smallest}." if budget.fraction is not None
           else f"Use memory_budget >= {too_small.min_bytes} (bytes) or a fraction >= {smallest}.")
    raise BackendValueError(
        f'backend="ckpt": options memory_budget={budget.value!r} is infeasible for this graph: it must '
        f"save at least {too_small.min_bytes} bytes of activations (checkpoint region boundaries and values "
        f"that may not be recomputed), {smallest} of the {no_checkpoint_bytes} bytes it saves "
        f"with no checkpointing. {use}"
    ) from error


def _compile_inductor(gm, example_inputs, partitioner, opts: BackendOptions):
    from torch._inductor.compile_fx import compile_fx

    patches: dict[str, Any] = {"custom_partitioner_fn": partitioner}
    if opts.report is not False:
        # A cache hit skips the partitioner and would leave the report empty.
        patches["force_disable_caches"] = True
    return compile_fx(gm, example_inputs, config_patches=patches)


def _compile_eager(gm, example_inputs, partitioner):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def run_as_is(module: fx.GraphModule, _inputs):
        from ckpt_compile.passes.rng_replay import run_eagerly

        return make_boxed_func(run_eagerly(module).forward)

    return aot_autograd(
        fw_compiler=run_as_is,
        bw_compiler=run_as_is,
        partition_fn=partitioner,
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


@functools.lru_cache(maxsize=1)
def _source_hash() -> bytes:
    import importlib.metadata

    try:
        version = importlib.metadata.version("ckpt_compile")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        version = "source"
    return _hash_sources(_graph_sources(), version)


def _graph_sources() -> list[pathlib.Path]:
    """The modules that can change a captured or partitioned graph: every module of the
    package and of ``passes/``. The policies, the engine's tracing branch, the wrappers
    and the budget's baseline in diagnostics all do; a hand-kept narrower list missed
    them once (issue 21), and hashing the rest costs nothing but a cache miss."""
    import ckpt_compile.passes as passes_pkg

    package = pathlib.Path(__file__).resolve().parents[1]  # ckpt_compile/
    roots = (package, pathlib.Path(passes_pkg.__file__).parent)
    return sorted({p.resolve() for root in roots for p in root.rglob("*.py")})


def _hash_sources(files: Sequence[pathlib.Path], version: str) -> bytes:
    # Each file's name and length go in with its bytes, so moving code between files
    # changes the key too.
    digest = hashlib.sha256(f"ckpt_compile {version}\n".encode())
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.name}:{len(data)}\n".encode())
        digest.update(data)
    return digest.digest()


def _annotation_fingerprint(gm: fx.GraphModule) -> str:
    """Hash of everything in ``gm`` that decides recompute tags but is not in its code."""
    parts: list[str] = []
    for name, module in gm.named_modules():
        context_fn = getattr(module, "meta", {}).get("_checkpoint_context_fn")
        if context_fn is not None:
            parts.append(f"{name}:context_fn={_fingerprint(context_fn)}")
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            custom = node.meta.get("custom")
            if custom:
                parts.append(f"{name}.{node.name}:custom={_fingerprint(custom)}")
            if node.op == "call_function" and node.kwargs:
                parts.append(f"{name}.{node.name}:kwargs={_fingerprint(dict(node.kwargs))}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _fingerprint(value: Any, depth: int = 0) -> str:
    """A stable description of a policy (function, partial, op list, constants)."""
    if depth > 6:
        return "..."
    recurse = functools.partial(_fingerprint, depth=depth + 1)
    if isinstance(value, functools.partial):
        keywords = sorted(value.keywords.items())
        return f"partial({recurse(value.func)}, {recurse(value.args)}, {recurse(keywords)})"
    if isinstance(value, types.FunctionType):
        code = value.__code__
        closure = [c.cell_contents for c in value.__closure__ or () if _cell_filled(c)]
        code_hash = hashlib.sha256(code.co_code + repr(code.co_names).encode()).hexdigest()
        return (
            f"{value.__module__}.{value.__qualname__}#{code_hash}"
            f"{recurse(_consts(code))}{recurse(closure)}{recurse(value.__defaults__)}"
        )
    if isinstance(value, dict):
        return "{" + ",".join(f"{recurse(k)}:{recurse(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(map(recurse, value)) if isinstance(value, (set, frozenset)) else map(recurse, value)
        return f"{type(value).__name__}[" + ",".join(items) + "]"
    if isinstance(value, (types.BuiltinFunctionType, type)):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if isinstance(value, fx.Node):
        return f"node:{value.name}"
    # Ops, enums and constants have stable reprs; an object whose repr carries an address
    # only makes the cache miss, never hit wrongly.
    return f"{type(value).__name__}:{value!r}"


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _consts(code: types.CodeType) -> tuple:
    return tuple(_consts(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)


def _graph_report(joint_module, fw_module, bw_module, kwargs, partition_fn, joint_inputs, detailed: bool):
    """Figures of one partition: graph sizes and saved bytes (always, computed here so that
    a compile without ``report`` never imports the report modules; only a budget below 1 on
    a graph with checkpoint regions borrows ``diagnostics._graph_stats.baseline_partition``
    to price it); with ``detailed`` (the report option is on) the full report of ``ckpt_compile.diagnostics._report``: per-region rows, the graph for the
    picture, and the no-checkpoint baseline (the same joint graph partitioned again with
    its checkpoint tags hidden: no second compile)."""
    num_fwd_outputs = kwargs["num_fwd_outputs"]
    if not detailed:
        return _basic_figures(fw_module, bw_module, num_fwd_outputs)
    from ckpt_compile.diagnostics import _graph_stats, _report

    def baseline():
        return _graph_stats.baseline_partition(
            joint_module, partition_fn, joint_inputs, **{**kwargs, "memory_budget": 1.0})

    return _report.graph_report(joint_module, fw_module, bw_module, num_fwd_outputs=num_fwd_outputs,
                                baseline_fn=baseline)


def _basic_figures(fw_module: fx.GraphModule, bw_module: fx.GraphModule, num_fwd_outputs: int):
    # Saved activations exclude the graph's own inputs (parameters, user inputs), which
    # stay alive whether or not anything is checkpointed; counted from the forward graph
    # itself, independently of the plan.
    saved = [n for n in _saved_values(fw_module, num_fwd_outputs) if n.op != "placeholder"]
    report: dict[str, Any] = {
        "forward_nodes": _count_ops(fw_module),
        "backward_nodes": _count_ops(bw_module),
        "saved_tensors": len(saved),
        "saved_bytes": sum(_nbytes(n) for n in saved),
    }
    plan = fw_module.meta.get("ckpt_partition")
    if plan is not None:
        report["recomputed_nodes"] = len(plan.recomputed)
        report["offloaded_nodes"] = len(plan.offloaded)
        report["recompute_flops"] = int(plan.recompute_flops)
    return report


def _count_ops(module: fx.GraphModule) -> int:
    return sum(1 for n in module.graph.nodes if n.op == "call_function")


def _saved_values(fw_module: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    # AOTAutograd's forward returns (user outputs..., saved tensors..., saved symints...).
    outputs = fw_module.graph.find_nodes(op="output")[0].args[0]
    return [
        n
        for n in outputs[num_fwd_outputs:]
        if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)
    ]


def _nbytes(node: fx.Node) -> int:
    from ckpt_compile.passes.facts import value_nbytes

    return value_nbytes(node.meta["val"])  # the plan's rule for symbolic sizes


def _emit_report(reports: list[dict[str, Any]], opts: BackendOptions) -> None:
    from ckpt_compile.diagnostics._report import Report

    options = {"memory_budget": opts.memory_budget, "inner": opts.inner}
    if opts.report is True:
        if not _logging_shows_info():
            show_report(Report(tuple(reports), options))
            return
        for report in reports:
            figures = {k: v for k, v in report.items() if k != "graph"}  # the picture's data stays out of logs
            log.info("backend='ckpt' partition: %s", json.dumps(figures, sort_keys=True))
        log.info("%s", Report(tuple(reports), options))
        return
    # report=path: the rule in backend()'s docstring.
    path = pathlib.Path(opts.report)
    previous = _read_report(path)
    graphs = list(previous.graphs) if previous is not None and dict(previous.options) == options else []
    Report(tuple(graphs + reports), options).write(path)


def _read_report(path: pathlib.Path):
    """The report at ``path``, or None when there is no file; ValueError for another file."""
    from ckpt_compile.diagnostics._report import Report

    if not path.exists():
        return None
    try:
        return Report.read(path)
    except ValueError as e:
        raise ValueError(
            f'backend="ckpt": option report={os.fspath(path)!r} names an existing file that '
            "is not a report this backend wrote; pass a new path"
        ) from e
