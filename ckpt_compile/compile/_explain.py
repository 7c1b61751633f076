"""``ckpt_compile.explain``: what ``backend="ckpt"`` saves and recomputes, before training.

Example: see :func:`explain`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Callable

import torch

from torch._dynamo.exc import BackendCompilerFailed, Unsupported

from ckpt_compile.compile._backend import compile_graph, show_report
from ckpt_compile.compile._options import BackendOptions
from ckpt_compile.eager._misuse import check_needs_grad, model_call_error
from ckpt_compile.diagnostics._report import Report

__all__ = ["explain"]

log = logging.getLogger("ckpt_compile")


def explain(model_or_fn: Callable, *example_inputs: Any, **options: Any) -> Report:
    """Compile ``model_or_fn`` with ``backend="ckpt"``, run one forward on ``example_inputs``,
    and return the :class:`~ckpt_compile.Report` of what was saved and recomputed.

    ``options`` are the backend's (``memory_budget``, ``inner``, ``report``: a path
    receives the JSON, replacing the file, since it holds the one report returned);
    ``dynamic=`` and ``fullgraph=`` go to ``torch.compile``. The figures are exactly those
    the backend writes for a user's compile with ``options={"report": path}`` (the same
    pipeline, handing its Report over directly); the baseline is the
    same joint graph partitioned with every checkpoint region removed. No backward runs,
    and the model's parameters are untouched; a forward pass does run (dropout draws
    random numbers, batch-norm statistics update, as in one training step).

    Why each value is saved: ``report.saved_values`` lists every saved activation
    (``name``, ``region``, ``bytes``, ``why``), ``why`` being one of ``"boundary"`` (a
    checkpoint region's output read by another region), ``"policy"`` (a selective policy
    or annotation), ``"random"``, ``"rng state"`` (the RNG state a recomputed random op
    replays), ``"not recomputable"``, ``"budget"``, ``"needed by backward"`` or
    ``"recompute input"`` (see ``ckpt_compile.passes.saving.WHY``);
    ``report.saved_by_reason`` and the table's "why saved" section sum them.

    A model that fails on ``example_inputs`` is a ``ValueError`` naming the inputs' dtypes,
    shapes and devices, with the model's error chained; so is a model in which nothing
    requires grad.

    ``str(report)`` is a table; ``report.to_dict()`` is JSON; see also
    ``cc.write_picture(report, "cut.html")``.

    >>> import torch, ckpt_compile as cc
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(512, 512)
    ...     def forward(self, x):
    ...         return cc.checkpoint(lambda t: self.lin(t).relu().sin(), x, use_reentrant=False)
    >>> report = cc.explain(Block(), torch.randn(512, 512), inner="eager")
    >>> report.saved_bytes, report.baseline["saved_bytes"]   # without checkpointing: relu's 1 MiB
    (0, 1048576)
    >>> report.summary()
    'saved 1.00 MiB -> 0 B (-100%), +100% forward FLOPs recomputed'
    """
    if not callable(model_or_fn):
        raise TypeError(
            f"explain(model_or_fn, *example_inputs): expected an nn.Module or a function, got "
            f"{type(model_or_fn).__name__}"
        )
    if isinstance(options.get("options"), dict):
        spelled = ", ".join(f"{k}={v!r}" for k, v in options["options"].items())
        raise ValueError(
            f"explain: the backend's options are keywords of explain itself: explain(model, *inputs, "
            f"{spelled}), not 'options'={{...}}"
        )
    check_needs_grad("explain", model_or_fn, example_inputs, {})
    compile_kwargs = {k: options.pop(k) for k in ("dynamic", "fullgraph") if k in options}
    opts = BackendOptions.from_mapping(options)  # ValueError for unknown or bad options
    graphs: list[dict[str, Any]] = []
    # The backend's own pipeline, with the detailed report on, handing its reports here.
    detailed = dataclasses.replace(opts, report=True)

    def ckpt(gm, example_inputs):
        compiled, reports = compile_graph(gm, example_inputs, detailed)
        graphs.extend(reports)
        return compiled

    # A fresh backend object, so Dynamo compiles again even if this model was compiled
    # before (its cache entries check the backend).
    compiled = torch.compile(model_or_fn, backend=ckpt, **compile_kwargs)
    with torch.enable_grad():
        try:
            compiled(*example_inputs)
        except (BackendCompilerFailed, Unsupported):
            raise  # the backend's own error, or a graph break under fullgraph=True: as it is
        except Exception as e:  # the user's model on these inputs (issue 22): say which call
            raise model_call_error("explain", model_or_fn, example_inputs, {}, e) from e
    if not graphs:
        raise ValueError(
            "explain: the compiled model produced no backward graph, so nothing is saved "
            "for backward; give it parameters or example inputs that require grad "
            "(x.requires_grad_()), and check that torch.compile did not fall back to eager"
        )
    report = Report(tuple(graphs), {"memory_budget": opts.memory_budget, "inner": opts.inner})
    if opts.report is True:
        show_report(report)
    elif opts.report:
        report.write(opts.report)  # explain's one report replaces the file
    return report


def write_report_files(report: Report, folder: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``report.json`` and ``report.html`` (the picture) into ``folder``."""
    from ckpt_compile.diagnostics._picture import write_picture

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "report.json"
    report.write(json_path)
    return json_path, write_picture(report, folder / "report.html")
