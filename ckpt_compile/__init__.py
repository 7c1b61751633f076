"""ckpt_compile: activation checkpointing for PyTorch.

A drop-in replacement for ``torch.utils.checkpoint`` (swap the import), module wrappers
(``checkpoint_wrapper``, ``offload_wrapper``, ``apply_activation_checkpointing``), a
composable ``ckpt_compile.composable.checkpoint(module)``, and a ``torch.compile`` backend
``backend="ckpt"`` whose saved-versus-recomputed decision is a networkx min-cut
(``ckpt_compile.passes``), and diagnostics (``explain``, ``Report``, ``write_picture``,
``saved_tensor_bytes``, ``autograd_nodes``).

Layout, one subpackage per part (each one's docstring says what it may import):
``eager/`` the engine, ``modules/`` wrappers and composable, ``compile/`` the backend and
``explain``, ``diagnostics/`` reports and pictures, ``cli/`` the command line; the
top-level ``passes/`` folder ships as ``ckpt_compile.passes``.

>>> import torch, ckpt_compile as cc
>>> x = torch.randn(4, 4, requires_grad=True)
>>> y = cc.checkpoint(torch.sin, x, use_reentrant=False)
>>> y.sum().backward()
>>> torch.equal(x.grad, torch.cos(x.detach()))
True
"""
from __future__ import annotations

import importlib

# The package's version: pyproject.toml reads it from here (one source of truth).
__version__ = "0.1.0"

from ckpt_compile.eager._checkpoint import checkpoint, checkpoint_sequential
from ckpt_compile.eager._common import (
    CheckpointError,
    GraphExecGroup,
    noop_context_fn,
    set_checkpoint_debug_enabled,
    set_checkpoint_early_stop,
)
from ckpt_compile.eager._device_state import DefaultDeviceType, get_device_states, set_device_states
from ckpt_compile.eager._reentrant import CheckpointFunction
from ckpt_compile.eager._selective import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    create_selective_checkpoint_contexts,
)
from ckpt_compile.eager._torch_api import SAC_IGNORED_OPS, check_backward_validity, detach_variable

# Names whose modules import heavier parts of torch (distributed, inductor) are loaded on
# first use, so `import ckpt_compile` stays cheap and never fails on an optional piece.
_LAZY = {
    "CheckpointImpl": "ckpt_compile.modules.wrappers",
    "ActivationWrapper": "ckpt_compile.modules.wrappers",
    "CheckpointWrapper": "ckpt_compile.modules.wrappers",
    "OffloadWrapper": "ckpt_compile.modules.wrappers",
    "checkpoint_wrapper": "ckpt_compile.modules.wrappers",
    "offload_wrapper": "ckpt_compile.modules.wrappers",
    "apply_activation_checkpointing": "ckpt_compile.modules.wrappers",
    "backend": "ckpt_compile.compile._backend",
    "backend_with": "ckpt_compile.compile._configured",
    "explain": "ckpt_compile.compile._explain",
    "Report": "ckpt_compile.diagnostics._report",
    "write_picture": "ckpt_compile.diagnostics._picture",
    "saved_tensor_bytes": "ckpt_compile.diagnostics._graph_stats",
    "autograd_nodes": "ckpt_compile.diagnostics._graph_stats",
    "plan": "ckpt_compile.planner._plan",
    "CheckpointPlan": "ckpt_compile.planner._plan",
    "checkpoint_name": "ckpt_compile.policies",
    "estimate_memory": "ckpt_compile.memory._estimate",
    "measure_memory": "ckpt_compile.memory._measure",
    "StepMemory": "ckpt_compile.memory._step",
}

__all__ = [
    "checkpoint",
    "checkpoint_sequential",
    "CheckpointPolicy",
    "SelectiveCheckpointContext",
    "create_selective_checkpoint_contexts",
    "set_checkpoint_early_stop",
    "set_checkpoint_debug_enabled",
    "CheckpointError",
    "DefaultDeviceType",
    "noop_context_fn",
    "GraphExecGroup",
    # the rest of torch.utils.checkpoint.__all__ (helpers code written for it imports)
    "CheckpointFunction",
    "check_backward_validity",
    "detach_variable",
    "get_device_states",
    "set_device_states",
    "SAC_IGNORED_OPS",
    *_LAZY,
]


def __getattr__(name: str):
    if name in ("policies", "memory"):  # public modules (docs/api.md), loaded on first use
        return importlib.import_module(f"ckpt_compile.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt_compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
