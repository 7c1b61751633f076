"""Debug mode: the operator trace of a region's forward and of its recomputation.

With ``debug=True`` (or :func:`set_checkpoint_debug_enabled`), every aten operator run in
the original forward and in the recomputation is logged with the user source line that
called it. When the recomputation does not match the forward, the :class:`CheckpointError`
carries both traces and points at the first operator where they diverge.
"""
from __future__ import annotations

import os
import traceback
from typing import Any, NoReturn

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ckpt_compile.eager._common import CheckpointError

_TORCH_DIR = os.path.dirname(torch.__file__)
_OUR_DIR = os.path.dirname(__file__)
_PYTHON_DIR = os.path.dirname(os.__file__)
# Checkpointing itself inserts detaches, and their number differs between the forward and
# the recomputation: they are noise in a trace.
_IGNORED = {torch.ops.aten.detach.default, torch.ops.prim.device.default}
# PyTorch's own explanation of a debug-mode error (its heading and why the user sees it),
# said for both ways of turning debug mode on; the traces above it and the first
# difference below it are ours.
_EXPLANATION = (
    "ERROR: Detected non-determinism while running activation checkpointing\n\n"
    "You are seeing this error because checkpoint debug mode is on (`debug=True` was passed "
    "to checkpoint, or the code runs under `set_checkpoint_debug_enabled(True)`) and the "
    "tensors saved during the original forward differ from those saved during "
    "recomputation. This can happen if different operators were run in the original forward "
    "and in the recomputation: compare the two operator lists above, each operator with "
    "the source line that ran it."
)


def _user_location() -> str:
    """The innermost source line outside torch, this package and the standard library.
    Read for the debug-mode message only (what the user's code ran), never to decide
    anything: a traceback summary, as torch's own debug mode records (no frame objects)."""
    for entry in reversed(traceback.extract_stack()):
        filename = entry.filename
        if not (filename.startswith((_TORCH_DIR, _OUR_DIR, _PYTHON_DIR)) or filename.startswith("<frozen")):
            return f"{filename}:{entry.lineno} in {entry.name}"
    return "<unknown>"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{dtype}{list(value.shape)}"
    return type(value).__name__


class _OpTrace(TorchDispatchMode):
    """Logs ``(operator, input/output summary, user source line)`` for each aten call."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[tuple[str, str, str]] = []

    def __enter__(self):
        self.entries = []  # a region recomputed again (another backward) gets a fresh trace
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in _IGNORED:
            inputs = ", ".join(_describe(a) for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor))
            outputs = ", ".join(_describe(o) for o in tree_leaves(out) if isinstance(o, torch.Tensor))
            self.entries.append((str(func), f"({inputs}) -> ({outputs})", _user_location()))
        return out


def _format_trace(title: str, entries: list[tuple[str, str, str]]) -> str:
    lines = [f"{title} ({len(entries)} operators):"]
    for i, (op, shapes, where) in enumerate(entries, 1):
        lines.append(f"  {i:4d}. {op} {shapes}\n        at {where}")
    return "\n".join(lines)


class _DebugTraces:
    """The two traces of one checkpointed region and the error callback that prints them."""

    def __init__(self) -> None:
        self.forward = _OpTrace()
        self.recompute = _OpTrace()

    def contexts(self):
        return self.forward, self.recompute

    def raise_with_traces(self, error: CheckpointError) -> NoReturn:
        fwd, rec = self.forward.entries, self.recompute.entries
        divergence = next(
            (i for i, (a, b) in enumerate(zip(fwd, rec)) if a[:2] != b[:2]),
            None if len(fwd) == len(rec) else min(len(fwd), len(rec)),
        )
        if divergence is None:
            where = "The operator sequences agree; the difference is in the values saved for backward."
        else:
            left = " ".join(fwd[divergence][:2]) if divergence < len(fwd) else "<nothing>"
            right = " ".join(rec[divergence][:2]) if divergence < len(rec) else "<nothing>"
            where = (
                f"First difference at operator #{divergence + 1}: the forward ran {left}, "
                f"the recomputation ran {right}."
            )
        raise CheckpointError(
            f"{error}\n\nckpt_compile debug trace (detach calls omitted):\n"
            f"{_format_trace('Original forward', fwd)}\n"
            f"{_format_trace('Recomputation', rec)}\n\n{_EXPLANATION}\n\n{where}"
        ) from error
