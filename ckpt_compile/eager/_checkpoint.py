"""The public eager entry points: :func:`checkpoint` and :func:`checkpoint_sequential`."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from ckpt_compile.eager._common import _skip_as_fresh_frame, noop_context_fn

__all__ = ["checkpoint", "checkpoint_sequential"]

_USE_REENTRANT_WARNING = (
    "{api}: the use_reentrant parameter should be passed explicitly. Starting in PyTorch "
    "2.9, calling checkpoint without use_reentrant will raise an exception. "
    "use_reentrant=False is recommended, but if you need to preserve the current default "
    "behavior, you can pass use_reentrant=True. Refer to docs for more details on the "
    "differences between the two variants."
)


def checkpoint(
    function: Callable,
    *args: Any,
    use_reentrant: bool | None = None,
    context_fn: Callable = noop_context_fn,
    determinism_check: str = "default",
    debug: bool = False,
    early_stop: bool = True,
    preserve_rng_state: bool = True,
    **kwargs: Any,
):
    """Checkpoint ``function(*args, **kwargs)``: keep its inputs, recompute the rest in backward.

    A drop-in for ``torch.utils.checkpoint.checkpoint`` (PyTorch 2.13 semantics).

    Args:
        function: the region to run; called as ``function(*args, **kwargs)``.
        use_reentrant: ``False`` (recommended) records the region's autograd graph and
            swaps its saved tensors for recompute-on-unpack placeholders: it supports keyword
            arguments, ``torch.autograd.grad``, ``backward(inputs=...)``, nested and double
            backward, and stops recomputing as soon as every needed tensor is back.
            ``True`` runs the region under ``no_grad`` inside one autograd Function and
            reruns it in a reentrant backward (no kwargs, no ``context_fn``/``debug``, only
            ``.backward()``). ``None`` behaves as PyTorch 2.13 does: it warns that the
            argument should be passed explicitly and uses the reentrant variant.
        context_fn: returns two context managers, entered around the forward and around
            the recomputation (selective checkpointing:
            :func:`create_selective_checkpoint_contexts`). Non-reentrant only.
        determinism_check: ``"default"`` compares shape, dtype and device of every
            recomputed tensor with the saved one and raises :class:`CheckpointError`
            naming the tensor and the difference; ``"none"`` skips it.
        debug: on a mismatch, the error also lists the operators of the original forward
            and of the recomputation with the source lines that ran them. Non-reentrant only.
        early_stop: stop the recomputation once every needed tensor is recomputed
            (overridden by :func:`set_checkpoint_early_stop`). Non-reentrant only.
        preserve_rng_state: replay the CPU and device RNG states in the recomputation so
            random ops (dropout) draw the same values.

    Under ``torch.compile`` the region is captured into the graph with recompute
    annotations (no graph break); when Dynamo is off or falls back, it runs eagerly with
    the recomputation under ``_run_fn_with_dynamo_disabled``.

    >>> import torch, ckpt_compile as cc
    >>> lin = torch.nn.Linear(4, 4)
    >>> x = torch.randn(2, 4, requires_grad=True)
    >>> cc.checkpoint(lambda t: lin(t).relu(), x, use_reentrant=False).sum().backward()
    >>> x.grad.shape
    torch.Size([2, 4])
    """
    if torch.compiler.is_dynamo_compiling():
        from ckpt_compile.eager._capture import checkpoint_under_dynamo

        return checkpoint_under_dynamo(
            function, *args, use_reentrant=use_reentrant, context_fn=context_fn,
            determinism_check=determinism_check, debug=debug, early_stop=early_stop,
            preserve_rng_state=preserve_rng_state, **kwargs,
        )
    if use_reentrant is None:
        warnings.warn(_USE_REENTRANT_WARNING.format(api="ckpt_compile.checkpoint"), stacklevel=2)
        use_reentrant = True
    return _checkpoint_eager(
        function, args, kwargs, use_reentrant, context_fn, determinism_check, debug, early_stop,
        preserve_rng_state,
    )


@torch._disable_dynamo
def _checkpoint_eager(function, args, kwargs, use_reentrant, context_fn, determinism_check, debug,
                      early_stop, preserve_rng_state):
    # Dynamo stays off for the whole eager region, like torch's checkpoint: after a graph
    # break it must not start tracing our bookkeeping or the user's recomputation.
    if use_reentrant:
        if kwargs:
            raise ValueError("Unexpected keyword arguments: " + ",".join(kwargs))
        if context_fn is not noop_context_fn or debug is not False:
            raise ValueError("Passing `context_fn` or `debug` is only supported when use_reentrant=False.")
        from ckpt_compile.eager._reentrant import _ReentrantCheckpoint

        return _ReentrantCheckpoint.apply(function, preserve_rng_state, *args)
    from ckpt_compile.eager._non_reentrant import _checkpoint_non_reentrant

    return _checkpoint_non_reentrant(
        function, args, kwargs, preserve_rng_state=preserve_rng_state, context_fn=context_fn,
        determinism_check=determinism_check, debug=debug, early_stop=early_stop,
    )


class _Segment:
    """Runs ``functions[start:end]`` in order; a named callable keeps debug traces readable."""

    __slots__ = ("functions", "start", "end")

    def __init__(self, functions, start: int, end: int) -> None:
        self.functions, self.start, self.end = functions, start, end

    def __call__(self, value):
        for j in range(self.start, self.end):
            value = self.functions[j](value)
        return value


def checkpoint_sequential(functions, segments: int, input, use_reentrant: bool | None = None, **kwargs):
    """Run a sequential model in ``segments`` chunks, checkpointing all but the last.

    Same contract as ``torch.utils.checkpoint.checkpoint_sequential``: ``functions`` is an
    ``nn.Sequential`` or a list of callables taking and returning one value, the only
    keyword accepted besides ``use_reentrant`` is ``preserve_rng_state``, and
    ``use_reentrant=None`` warns and uses the reentrant variant. Stricter than PyTorch 2.13:
    ``segments`` must be an int from 1 to ``len(functions)`` (PyTorch divides by zero or
    fails inside ``range`` otherwise), a ``ValueError`` saying so.

    >>> import torch, ckpt_compile as cc
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
    >>> y = cc.checkpoint_sequential(model, 2, torch.randn(2, 4, requires_grad=True), use_reentrant=False)
    """
    if use_reentrant is None:
        warnings.warn(_USE_REENTRANT_WARNING.format(api="ckpt_compile.checkpoint_sequential"), stacklevel=2)
        use_reentrant = True
    preserve = kwargs.pop("preserve_rng_state", True)
    if kwargs:
        raise ValueError("Unexpected keyword arguments: " + ",".join(kwargs))
    if isinstance(functions, torch.nn.Sequential):
        functions = list(functions.children())
    if not isinstance(segments, int) or isinstance(segments, bool):
        raise ValueError(f"checkpoint_sequential: segments must be an int, got {type(segments).__name__}.")
    if not 1 <= segments <= max(len(functions), 1) or not functions:
        raise ValueError(
            f"checkpoint_sequential: segments must be between 1 and the number of functions "
            f"({len(functions)}), got {segments}."
        )
    size = len(functions) // segments
    end = 0
    # All segments but the last are checkpointed; the last one's activations are needed
    # right away by the backward, so it runs plainly.
    for start in range(0, size * (segments - 1), size):
        end = start + size
        input = checkpoint(
            _Segment(functions, start, end), input, use_reentrant=use_reentrant, preserve_rng_state=preserve
        )
    return _Segment(functions, end, len(functions))(input)


# The eager fallback after a graph break at a checkpoint call stays on our engine.
_skip_as_fresh_frame(checkpoint.__code__)
