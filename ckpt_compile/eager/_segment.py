"""Segments: one checkpoint over consecutive blocks that their parent calls one by one.

``checkpoint_sequential`` checkpoints k functions as one region because it calls them
itself. A model's own loop (``for block in self.blocks: x = block(x, mask)``) calls its
blocks one by one, with its own code between them, so no single call can span them. A
segment here is a chain of per-block regions instead: block ``i`` (the head) is an
ordinary non-reentrant checkpoint that keeps its inputs; each later block ``m`` of the
segment (a link) keeps *no* reference to the input it got from block ``m - 1`` (the very
tensor ``m - 1`` returned, unmodified), only the other inputs (a mask, a buffer). In
backward, the first unpack of a link's saved tensor (the last block's, as the backward
runs last block first) recomputes the chain from the head's inputs: block ``i``, its
output detached into block ``i + 1``, ... up to ``m``, each under its own RNG state,
filling every block's slots for that backward. So the segment saves its input once, and
its recomputation holds the k blocks' activations at once, as Rotor and
``checkpoint_sequential`` do; the parent's code between blocks runs and saves as usual.

Where the chain is broken (the parent changes the tensor between blocks, a block ran
without grad, the forward stopped half-way), the link keeps its input like a plain
checkpoint: correct, it only saves more. Under ``torch.compile`` each block is a plain
checkpoint region. Each link holds its predecessor's frame (never the reverse), so a
segment's frames die with the last autograd node that holds them: nothing to clean up
after a failed step.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch._C._autograd import SavedTensor, _make_saved_tensor
from torch.utils._pytree import tree_leaves

from ckpt_compile.eager._common import _run_fn_with_dynamo_disabled, noop_context_fn
from ckpt_compile.eager._device_state import _ReplayState
from ckpt_compile.eager._non_reentrant import (
    _Frame, _install_hooks, _metadata_fn, _new_frame, _region_contexts,
)

__all__ = ["Segment"]


class _Chained:
    """An input that is output ``leaf`` of the previous block: recomputed, never kept."""

    __slots__ = ("leaf", "requires_grad")

    def __init__(self, leaf: int, requires_grad: bool) -> None:
        self.leaf = leaf
        self.requires_grad = requires_grad


class _ChainFrame(_Frame):
    """A block's frame whose chained inputs come from ``previous``'s recomputation."""

    __slots__ = ("previous", "__weakref__")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.previous: _ChainFrame | None = None

    def _recompute_args(self, call: Any) -> list:
        chained = any(isinstance(a, _Chained) for a in self.inputs)
        outputs = self.previous.outputs_for(call) if chained else []
        return [outputs[a.leaf].detach().requires_grad_(a.requires_grad) if isinstance(a, _Chained)
                else a.unpack() if isinstance(a, SavedTensor) else a for a in self.inputs]

    def outputs_for(self, call: Any) -> list[torch.Tensor]:
        """The tensors this block returns, recomputed for backward ``call`` (its slots filled
        on the way, unless they were already filled for this call)."""
        if call in self.recomputed_for:
            # An unusual order (this block's backward ran before its successor's): its
            # saved tensors are back already, only the output is wanted.
            with torch.no_grad():
                out = _run_fn_with_dynamo_disabled(self.run, *self._recompute_args(call))
        else:
            out = self._recompute(call, keep_output=True)
        return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


class Segment:
    """Shared by the k blocks of one segment; ``link(p)`` is block ``p``'s ``checkpoint_fn``
    (for :class:`~ckpt_compile.modules.wrappers.CheckpointWrapper`). Between two blocks of one
    forward it remembers, weakly, the last block's frame and outputs."""

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"a segment spans at least 2 blocks, got {size}")
        self.size = size
        self._last: tuple | None = None  # (position, weakref(frame), [(weakref(tensor), version)])

    def link(self, position: int) -> "_Link":
        return _Link(self, position)

    def _previous(self, position: int, inputs: list) -> tuple[_ChainFrame | None, list]:
        """The previous block's frame and which of ``inputs`` are its outputs, by identity."""
        last, self._last = self._last, None
        if position == 0 or last is None or last[0] != position - 1:
            return None, list(inputs)
        frame = last[1]()
        outputs = [(ref(), version) for ref, version in last[2]]
        if frame is None:
            return None, list(inputs)
        marked = []
        for a in inputs:
            leaf = next((i for i, (t, version) in enumerate(outputs)
                         if a is t and t is not None and t._version == version), None) if isinstance(a, torch.Tensor) else None
            marked.append(a if leaf is None else _Chained(leaf, a.requires_grad))
        return (frame if any(isinstance(a, _Chained) for a in marked) else None), marked

    def _remember(self, position: int, frame: _ChainFrame, out: Any) -> None:
        if position == self.size - 1:
            return
        leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self._last = (position, weakref.ref(frame), [(weakref.ref(t), t._version) for t in leaves])


class _Link:
    """Block ``position`` of a :class:`Segment`, called as ``checkpoint_fn(module, *args, **kwargs)``."""

    def __init__(self, segment: Segment, position: int) -> None:
        self.segment = segment
        self.position = position

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_dynamo_compiling():
            from ckpt_compile.eager._checkpoint import checkpoint

            return checkpoint(function, *args, use_reentrant=False, **kwargs)
        return _run_link(self.segment, self.position, function, args, kwargs)

    def __repr__(self) -> str:
        return f"segment block {self.position + 1} of {self.segment.size}"


@torch._disable_dynamo
def _run_link(segment: Segment, position: int, function: Callable, args: tuple, kwargs: dict) -> Any:
    if not torch.is_grad_enabled():
        segment._last = None
        return function(*args, **kwargs)
    keys = tuple(kwargs)
    flat = (*args, *kwargs.values())
    previous, marked = segment._previous(position, list(flat))
    forward_context, recompute_context, on_error = _region_contexts(noop_context_fn, False)
    state = _ReplayState.capture(flat, True)
    split = len(args)

    def run(*inputs):
        with state.replay(recompute_context):
            return function(*inputs[:split], **dict(zip(keys, inputs[split:])))

    frame = _new_frame(run, _metadata_fn("default"), True, on_error, frame_type=_ChainFrame)
    frame.previous = previous
    if previous is None:
        marked = list(flat)
    frame.inputs = [a if isinstance(a, _Chained) else
                    _make_saved_tensor(a, is_output=False) if isinstance(a, torch.Tensor) else a for a in marked]
    del marked, flat
    with _install_hooks(frame), forward_context:
        out = function(*args, **kwargs)
    frame.forward_completed = True
    state.check_no_device_init_in_forward()
    segment._remember(position, frame, out)
    return out
