"""Small shared pieces of the eager API: errors, process-wide switches, the dynamo trampoline."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = [
    "CheckpointError",
    "GraphExecGroup",
    "noop_context_fn",
    "set_checkpoint_debug_enabled",
    "set_checkpoint_early_stop",
]


class CheckpointError(RuntimeError):
    """Raised when the recomputation of a checkpointed region does not match its forward.

    A subclass of ``RuntimeError``, like ``torch.utils.checkpoint.CheckpointError``.
    """


def noop_context_fn():
    """The default ``context_fn``: two do-nothing context managers (forward, recompute)."""
    return contextlib.nullcontext(), contextlib.nullcontext()


class _Switches:
    """Process-wide overrides set by the context managers below (``None`` = defer to the call)."""

    early_stop: bool | None = None
    debug: bool | None = None


@contextlib.contextmanager
def set_checkpoint_early_stop(enable: bool) -> Iterator[None]:
    """Override ``early_stop`` for every non-reentrant checkpoint whose *forward* runs inside.

    With early stop (the default) the recomputation stops as soon as every tensor the
    backward needs has been recomputed; without it the whole region is rerun. Only the
    forward needs to run under this context; the backward may run outside it.

    >>> import torch, ckpt_compile as cc
    >>> x = torch.ones(3, requires_grad=True)
    >>> with cc.set_checkpoint_early_stop(False):
    ...     y = cc.checkpoint(torch.exp, x, use_reentrant=False)
    >>> y.sum().backward()
    """
    prev = _Switches.early_stop
    _Switches.early_stop = enable
    try:
        yield
    finally:
        _Switches.early_stop = prev


@contextlib.contextmanager
def set_checkpoint_debug_enabled(enabled: bool | None) -> Iterator[None]:
    """Override ``debug`` for every non-reentrant checkpoint run inside (``None`` defers).

    In debug mode a mismatch between forward and recomputation raises a
    :class:`CheckpointError` that lists the operators of the original forward and of the
    recomputation, each with the user source line that ran it.
    """
    prev = _Switches.debug
    _Switches.debug = enabled
    try:
        yield
    finally:
        _Switches.debug = prev


class GraphExecGroup:
    """Backward calls under one instance recompute each checkpointed region at most once.

    Without it every backward call (every graph task) recomputes the regions it reaches.
    Backward calls under the same group must touch non-overlapping parts of the graph:
    reusing a saved activation is a :class:`CheckpointError`. Groups cannot be nested.
    Only non-reentrant checkpoint is affected. The group is stored where torch's own
    ``torch.utils.checkpoint.GraphExecGroup`` stores it, so either class works with either
    checkpoint implementation.

    >>> import torch, ckpt_compile as cc
    >>> x = torch.ones(3, requires_grad=True)
    >>> a, b = cc.checkpoint(lambda t: (t.sin(), t.cos()), x, use_reentrant=False)
    >>> with cc.GraphExecGroup():
    ...     ga, = torch.autograd.grad(a.sum(), x, retain_graph=True)
    ...     gb, = torch.autograd.grad(b.sum(), x)
    """

    def __enter__(self) -> "GraphExecGroup":
        current = torch._C._get_graph_exec_group()
        if current is not None:
            raise RuntimeError(
                f"GraphExecGroup contexts cannot be nested. Already inside group {current}"
            )
        torch._C._set_graph_exec_group(self)
        return self

    def __exit__(self, *exc: object) -> None:
        torch._C._set_graph_exec_group(None)

    @staticmethod
    def _get_current_group() -> object | None:
        return torch._C._get_graph_exec_group()


@torch._disable_dynamo
def _run_fn_with_dynamo_disabled(fn, *args, **kwargs):
    """Run ``fn`` with Dynamo off: a graph break or compiled autograd never re-traces it.

    A module-level trampoline without a closure on purpose: decorating a local function
    instead would make the decorator hold the closure (and the activations it reaches)
    in a reference cycle (pytorch#154642).
    """
    return fn(*args, **kwargs)


def _skip_as_fresh_frame(code) -> None:
    """Tell Dynamo never to start a trace at ``code`` (inlining it into a caller's trace is
    unaffected): after a graph break at a checkpoint call, Dynamo runs the call eagerly and
    would otherwise start a fresh trace inside ``checkpoint``, fail inside the region again,
    and end in torch's eager checkpoint instead of ours. What
    ``torch._dynamo.eval_frame.skip_code`` does, without importing Dynamo (about 1 s) at
    ``import ckpt_compile``.
    """
    from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy

    set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.DEFAULT))
