"""Composable activation checkpointing: ``checkpoint(module)`` through forward hooks.

A drop-in for ``torch.distributed._composable.checkpoint`` (torch 2.13). Nothing is
wrapped and no name changes: a forward pre-hook opens a non-reentrant checkpoint region of
:mod:`ckpt_compile`'s eager engine (its saved-tensor hooks) and a forward hook closes it.
In backward, the region is recomputed by calling the module again with these two hooks
switched off (its other hooks run again, as in PyTorch).

Differences from PyTorch 2.13, on purpose:

* ``debug=True`` works (PyTorch's composable API rejects it at the first forward);
* the forward hook is registered with ``always_call=True`` and always closes the region,
  so a forward that raises leaves no saved-tensor hooks behind: the next forward and
  backward work normally; after a ``KeyboardInterrupt`` or other ``BaseException`` (for
  which nn.Module runs no forward hook) the next checkpointed forward closes the region;
* bad input is reported when ``checkpoint(module, ...)`` is called, not at the first
  forward: a non-module is a ``TypeError``, a bad ``determinism_check`` a ``ValueError``.
  ``use_reentrant=True`` (``NotImplementedError``) and unknown keywords (``ValueError``)
  are refused at that point too, as PyTorch does, in PyTorch's words plus the accepted ones.

Not for ``torch.compile``: Dynamo compiles the module's forward but the region's hooks run
eagerly, so the recomputation does not match what the compiled forward saved (PyTorch's
composable API fails the same way). Under compile use :func:`ckpt_compile.checkpoint_wrapper`
or call :func:`ckpt_compile.checkpoint` in the model's forward.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
>>> keys = list(model.state_dict())
>>> _ = checkpoint(model[0])
>>> list(model.state_dict()) == keys
True
>>> model(torch.randn(3, 4)).sum().backward()
>>> checkpoint.state(model[0]).enable_hook = False  # model[0] runs without checkpointing
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ckpt_compile.eager._common import noop_context_fn
from ckpt_compile.eager._device_state import _ReplayState
from ckpt_compile.eager._non_reentrant import _Frame, _install_hooks, _metadata_fn, _new_frame, _region_contexts

__all__ = ["checkpoint"]

# The state lives in the module's __dict__ under this key: a plain attribute, so it is in
# no state_dict and no named_* listing, and it travels with deepcopy.
_STATE_KEY = "_ckpt_compile_composable_checkpoint"
_ACCEPTED = ("use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug", "early_stop")


class _AppliedTwiceError(ValueError, AssertionError):
    """``checkpoint`` applied to a module that already has it.

    A ``ValueError``; also an ``AssertionError``, the type PyTorch's composable
    ``contract`` raises for this, so code written against PyTorch still catches it.
    """


@dataclasses.dataclass
class _CheckpointState:
    """What :func:`checkpoint` keeps on a module; ``checkpoint.state(module)`` returns it."""

    enable_hook: bool
    preserve_rng_state: bool
    context_fn: Callable[[], tuple[Any, Any]] | None
    determinism_check: str
    debug: bool
    early_stop: bool
    # One entry per forward of this module in flight (a module may call itself).
    open_regions: list[_Region] = dataclasses.field(default_factory=list)
    # > 0 while the backward recomputes the module: its calls open no region.
    recomputing: int = 0


@dataclasses.dataclass(eq=False)  # compared by identity
class _Region:
    frame: _Frame
    replay: _ReplayState
    contexts: contextlib.ExitStack
    state: _CheckpointState
    caller: types.FrameType | None  # nn.Module's frame that runs this forward (and its hooks)


# Regions open on each thread, every module together, in the order they were opened: their
# saved-tensor hooks sit on autograd's per-thread stack in the same order.
_OPEN = threading.local()


def _open_regions() -> list[_Region]:
    regions = getattr(_OPEN, "regions", None)
    if regions is None:
        regions = _OPEN.regions = []
    return regions


def _close_stale_regions() -> None:
    """Close the regions whose forward ended without our forward hook (issue 10, fault 6a).

    nn.Module runs ``always_call`` forward hooks for an ``Exception`` only: after a
    ``KeyboardInterrupt`` (any ``BaseException``) the region's saved-tensor hooks stay
    pushed, every later backward would trip over them and they keep tensors alive. A
    region is stale when the frame that ran its forward is no longer on the stack.
    """
    regions = _open_regions()
    while regions:
        region = regions[-1]
        frame = sys._getframe(1)
        while frame is not None and frame is not region.caller:
            frame = frame.f_back  # a nested call finds its parent's frame a few levels up
        if frame is not None:
            return  # still running: this call is nested in it, and so are those below
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is None or top[0] is not region.frame:  # the region's pack hook is its frame
            raise RuntimeError(
                "ckpt_compile.composable.checkpoint: a forward of a checkpointed module was "
                "interrupted (e.g. by KeyboardInterrupt) and its region cannot be closed: other "
                "saved-tensor hooks were pushed after it and are still active. Leave those "
                "`saved_tensors_hooks` blocks before calling the module again."
            )
        regions.pop()
        region.state.open_regions.remove(region)
        region.caller = None
        region.contexts.close()  # its forward context, then its saved-tensor hooks


def _opened_by_this_call(region: _Region) -> bool:
    """Whether the module call running our forward hook is the one that opened ``region``.

    nn.Module calls the forward hook from the frame that called the pre-hook; after an
    exception, from the frame that caught it, whose traceback leads to that frame. Any
    other region (one left open by an interrupted call) is not ours to close here.
    """
    if sys._getframe(2) is region.caller:
        return True
    tb = sys.exc_info()[2]
    while tb is not None:
        if tb.tb_frame is region.caller:
            return True
        tb = tb.tb_next
    return False


def checkpoint(module: nn.Module, **kwargs: Any) -> nn.Module:
    """Apply activation checkpointing to ``module`` in place, through forward hooks.

    Every forward of ``module`` becomes a non-reentrant :func:`ckpt_compile.checkpoint`
    region (positional and keyword inputs, any outputs); its fully-qualified names, its
    ``state_dict`` and its class are unchanged. Returns ``module``.

    Args:
        module: the module (a ``TypeError`` otherwise).
        **kwargs: ``preserve_rng_state`` (default True: dropout draws the same values in the
            recomputation), ``context_fn``, ``determinism_check`` (``"default"``),
            ``debug`` (False) and ``early_stop`` (True), with the meaning they have in
            :func:`ckpt_compile.checkpoint`. ``use_reentrant=True`` is a
            ``NotImplementedError``: the reentrant engine cannot be split into hooks.

    ``checkpoint.state(module).enable_hook = False`` switches checkpointing off for later
    forwards of ``module`` (and ``True`` back on). Applying it twice to one module raises.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"ckpt_compile.composable.checkpoint: expected an nn.Module, got "
            f"{type(module).__qualname__}. Apply it to each module separately."
        )
    if _STATE_KEY in module.__dict__:
        raise _AppliedTwiceError(
            f"ckpt_compile.composable.checkpoint can only be applied to a module once; it was "
            f"already applied to this {type(module).__name__}. To switch it off and on, set "
            f"checkpoint.state(module).enable_hook."
        )
    state = _parse_options(kwargs)
    object.__setattr__(module, _STATE_KEY, state)
    module.register_forward_pre_hook(_open_region, with_kwargs=True)
    # prepend: close our region before other forward hooks run (they are outside it, as in
    # PyTorch); always_call: close it even when the forward raises.
    module.register_forward_hook(_close_region, prepend=True, always_call=True)
    return module


def _state(module: nn.Module) -> _CheckpointState:
    """The :func:`checkpoint` state of ``module`` (``enable_hook`` and the options)."""
    state = module.__dict__.get(_STATE_KEY)
    if state is None:
        raise ValueError(
            f"checkpoint.state: checkpoint(module) was not applied to this "
            f"{type(module).__name__}; call ckpt_compile.composable.checkpoint(module) first."
        )
    return state


checkpoint.state = _state  # type: ignore[attr-defined]  # PyTorch's spelling: checkpoint.state(m)


def _parse_options(kwargs: dict[str, Any]) -> _CheckpointState:
    options = dict(kwargs)
    # Errors begin with PyTorch's own words (torch.distributed._composable.checkpoint,
    # raised when it is applied, as here), so code matching them keeps working.
    if options.pop("use_reentrant", False):
        raise NotImplementedError(
            "use_reentrant=True is not supported in composable checkpoint. Please use "
            "torch.utils.checkpoint.checkpoint instead. (ckpt_compile: the reentrant engine "
            "cannot be split into forward hooks; use use_reentrant=False, the default, or "
            "ckpt_compile.checkpoint_wrapper(module, CheckpointImpl.REENTRANT).)"
        )
    state = _CheckpointState(
        enable_hook=True,
        preserve_rng_state=options.pop("preserve_rng_state", True),
        context_fn=options.pop("context_fn", None),
        determinism_check=options.pop("determinism_check", "default"),
        debug=options.pop("debug", False),
        early_stop=options.pop("early_stop", True),
    )
    if options:
        raise ValueError(
            "Unexpected keyword arguments: " + ",".join(options)
            + f" (ckpt_compile.composable.checkpoint accepts {', '.join(_ACCEPTED)})"
        )
    _metadata_fn(state.determinism_check)  # validated now, not at the first forward
    if state.context_fn is not None and not callable(state.context_fn):
        raise TypeError(
            f"context_fn must be a callable returning two context managers, got {state.context_fn!r}."
        )
    return state


@contextlib.contextmanager
def _recomputing(state: _CheckpointState, inner: Any) -> Iterator[None]:
    """The recomputation calls the module again: our hooks must not open a new region."""
    state.recomputing += 1
    try:
        with inner if inner is not None else contextlib.nullcontext():
            yield
    finally:
        state.recomputing -= 1


def _open_region(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    _close_stale_regions()  # the next forward starts clean after an interrupted one
    state = module.__dict__[_STATE_KEY]
    if not state.enable_hook or state.recomputing or not torch.is_grad_enabled():
        return  # like ckpt_compile.checkpoint: nothing is saved, so nothing to checkpoint
    forward_context, recompute_context, on_error = _region_contexts(state.context_fn or noop_context_fn, state.debug)
    replay = _ReplayState.capture(args, state.preserve_rng_state)

    def recompute(*inputs: Any) -> None:
        with replay.replay(_recomputing(state, recompute_context)):
            module(*inputs, **kwargs)

    frame = _new_frame(recompute, _metadata_fn(state.determinism_check), state.early_stop, on_error)
    frame.save_inputs(args)
    contexts = contextlib.ExitStack()
    try:
        contexts.enter_context(_install_hooks(frame))
        contexts.enter_context(forward_context)
    except BaseException:
        contexts.close()
        raise
    region = _Region(frame, replay, contexts, state, sys._getframe(1))
    state.open_regions.append(region)
    _open_regions().append(region)


def _close_region(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    state = module.__dict__[_STATE_KEY]
    if state.recomputing or not state.open_regions or not _opened_by_this_call(state.open_regions[-1]):
        return  # this call opened no region (e.g. its pre-hook raised before it could)
    region = state.open_regions.pop()
    regions = _open_regions()
    if region in regions:
        regions.remove(region)
    region.caller = None
    region.contexts.close()
    # Also reached when the forward raised (always_call): the region is then simply
    # dropped, its saved-tensor hooks already popped by close() above.
    region.frame.forward_completed = True
    region.replay.check_no_device_init_in_forward()
