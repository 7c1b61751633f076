"""Composable activation checkpointing: ``checkpoint(module)`` through forward hooks.

A drop-in for ``torch.distributed._composable.checkpoint`` (torch 2.13). Nothing is
wrapped and no name changes: a forward pre-hook opens a non-reentrant checkpoint region of
:mod:`ckpt_compile`'s eager engine (its saved-tensor hooks) and a forward hook closes it.
In backward, the region is recomputed by calling the module again with these two hooks
switched off (its other hooks run again, as in PyTorch).

Which call owns a region: the pre-hook hands nn.Module a copy of the call's keyword
arguments, a :class:`_CallToken`; nn.Module passes that same object to the forward hook
(which closes the region it belongs to, and no other) and holds it for as long as the call
runs, while the region keeps only a weak reference. A region whose token is gone belongs
to a call that ended without the forward hook.

Differences from PyTorch 2.13, on purpose:

* ``debug=True`` works (PyTorch's composable API rejects it at the first forward);
* the forward hook is registered with ``always_call=True`` and always closes the region,
  so a forward that raises leaves no saved-tensor hooks behind: the next forward and
  backward work normally;
* after a ``KeyboardInterrupt`` (or any ``BaseException``, for which nn.Module runs no
  forward hook) the very next step is correct (issue 17; PyTorch raises a metadata
  ``CheckpointError`` there and recovers one step later): what is saved before the next
  checkpointed forward starts (a layer in front of the first block) is saved as it is,
  not into the interrupted region, and that next forward closes the region and releases
  what it held. Caveat: the interrupted call's token lives as long as its traceback; where
  that is kept on purpose (IPython keeps the last one as ``sys.last_traceback``) the region
  looks alive and the next step behaves as PyTorch's does;
* bad input is reported when ``checkpoint(module, ...)`` is called, not at the first
  forward: a non-module is a ``TypeError``, a bad ``determinism_check`` a ``ValueError``.
  ``use_reentrant=True`` (``NotImplementedError``) and unknown keywords (``ValueError``)
  are refused at that point too, as PyTorch does, in PyTorch's words plus the accepted ones;
* under ``torch.compile`` (issue 22; PyTorch's fails there) each forward of the module is
  captured as a checkpoint region exactly as :func:`ckpt_compile.checkpoint` captures one
  (a ``tag_activation_checkpoint`` region that ``backend="ckpt"``, inductor and aot_eager
  all recompute): while Dynamo traces, the forward hook traces the module's ``forward``
  again inside the region and returns that output; the first trace of it is then unused
  and removed by the compiler. A forward that changes buffers in place (BatchNorm in
  training) would change them twice there: use ``checkpoint_wrapper`` for such modules.

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
import threading
import warnings
import weakref
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


class _CallToken(dict):
    """The keyword arguments of one checkpointed call, and that call's token.

    The pre-hook returns it to nn.Module as the call's kwargs, so nn.Module hands the same
    object to the forward hook and keeps it alive exactly as long as the call runs (and
    its traceback, after an exception). Weak-referenceable, unlike a plain dict.
    """

    __slots__ = ("__weakref__",)


class _SavedAsIs:
    """A tensor saved while a stale region's hooks were still on the stack: kept as is."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _RegionFrame(_Frame):
    """The engine's frame of one composable region, which knows its call by ``token``.

    Its pack hook checks the token first (issue 17): once the call that opened the region
    is over, the region is stale, and a tensor reaching it (saved by code running before
    the next checkpointed forward notices and closes it) is not the region's: it is saved
    as it is, which is what autograd does without the region.
    """

    __slots__ = ("token",)

    def pack(self, x: torch.Tensor) -> Any:
        if self.token() is None:
            # detached, as the engine keeps recomputed tensors: a saved output must not
            # hold its own grad_fn (a cycle through C++ that gc cannot free)
            return _SavedAsIs(x.detach() if x.requires_grad else x)
        return _Frame.pack(self, x)

    __call__ = pack  # the frame is its region's pack hook (see _Frame)

    def unpack(self, packed: Any) -> torch.Tensor:
        if type(packed) is _SavedAsIs:
            return packed.tensor
        return _Frame.unpack(self, packed)

    def abandon(self) -> None:
        """The forward never completed: release its inputs; nothing will recompute it."""
        self.inputs = []
        self.run = _interrupted_region


def _interrupted_region(*inputs: Any) -> None:
    raise RuntimeError(
        "ckpt_compile.composable.checkpoint: a tensor saved by a forward that was interrupted "
        "(e.g. by KeyboardInterrupt) was used in backward; an interrupted forward cannot be "
        "recomputed. Run the forward again."
    )


@dataclasses.dataclass(eq=False)  # compared by identity
class _Region:
    frame: _RegionFrame
    replay: _ReplayState
    contexts: contextlib.ExitStack
    state: _CheckpointState

    def owned_by(self, kwargs: Any) -> bool:
        return self.frame.token() is kwargs

    def stale(self) -> bool:
        return self.frame.token() is None


# Regions open on each thread, every module together, in the order they were opened: their
# saved-tensor hooks sit on autograd's per-thread stack in the same order.
_OPEN = threading.local()


def _open_regions() -> list[_Region]:
    regions = getattr(_OPEN, "regions", None)
    if regions is None:
        regions = _OPEN.regions = []
    return regions


def _close_stale_regions(keep: _Region | None = None) -> None:
    """Close, from the top, the open regions whose call ended without our forward hook.

    nn.Module runs ``always_call`` forward hooks for an ``Exception`` only: after a
    ``KeyboardInterrupt`` (any ``BaseException``) the region's saved-tensor hooks stay
    pushed (issue 10, fault 6a). Stale: its token is gone; with ``keep``, also every region
    opened after ``keep`` (calls nested in ``keep``'s, which is ending).
    """
    regions = _open_regions()
    while regions and regions[-1] is not keep and (keep is not None or regions[-1].stale()):
        region = regions[-1]
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is None or top[0] is not region.frame:  # the region's pack hook is its frame
            raise RuntimeError(
                "ckpt_compile.composable.checkpoint: a forward of a checkpointed module was "
                "interrupted (e.g. by KeyboardInterrupt) and its region cannot be closed: other "
                "saved-tensor hooks were pushed after it and are still active. Leave those "
                "`saved_tensors_hooks` blocks before calling the module again."
            )
        _close(region)
        region.frame.abandon()


def _close(region: _Region) -> None:
    """Take ``region`` off both lists and pop its forward context and saved-tensor hooks."""
    _open_regions().remove(region)
    region.state.open_regions.remove(region)
    region.contexts.close()


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
    # PyTorch); always_call: close it even when the forward raises; with_kwargs: the hook
    # receives the call's token (the kwargs our pre-hook returned).
    module.register_forward_hook(_close_region, prepend=True, always_call=True, with_kwargs=True)
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


def _open_region(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
    if torch.compiler.is_dynamo_compiling():
        return None  # captured by the forward hook (see _capture_under_dynamo)
    _close_stale_regions()  # the next forward starts clean after an interrupted one
    state = module.__dict__[_STATE_KEY]
    if not state.enable_hook or state.recomputing or not torch.is_grad_enabled():
        return None  # like ckpt_compile.checkpoint: nothing is saved, so nothing to checkpoint
    forward_context, recompute_context, on_error = _region_contexts(state.context_fn or noop_context_fn, state.debug)
    replay = _ReplayState.capture(args, state.preserve_rng_state)

    def recompute(*inputs: Any) -> None:
        with replay.replay(_recomputing(state, recompute_context)):
            module(*inputs, **kwargs)

    frame = _new_frame(recompute, _metadata_fn(state.determinism_check), state.early_stop, on_error, _RegionFrame)
    token = _CallToken(kwargs)
    frame.token = weakref.ref(token)
    frame.save_inputs(args)
    contexts = contextlib.ExitStack()
    try:
        contexts.enter_context(_install_hooks(frame))
        contexts.enter_context(forward_context)
    except BaseException:
        contexts.close()
        raise
    region = _Region(frame, replay, contexts, state)
    state.open_regions.append(region)
    _open_regions().append(region)
    return args, token


def _close_region(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    state = module.__dict__[_STATE_KEY]
    if torch.compiler.is_dynamo_compiling():
        return _capture_under_dynamo(module, state, args, kwargs)
    region = next((r for r in reversed(state.open_regions) if r.owned_by(kwargs)), None)
    if region is None:
        region = _region_whose_token_was_replaced(module, state)
    if region is None:
        return None  # this call opened no region (e.g. a pre-hook raised before ours ran)
    _close_stale_regions(keep=region)  # calls nested in this one that were interrupted
    _close(region)
    # Also reached when the forward raised (always_call): the region is then simply
    # dropped, its saved-tensor hooks already popped by close() above.
    region.frame.forward_completed = True
    region.replay.check_no_device_init_in_forward()
    return None


def _region_whose_token_was_replaced(module: nn.Module, state: _CheckpointState) -> _Region | None:
    """This call's region when a pre-hook that ran after ours returned new kwargs.

    Our token then died before the forward began, so the region saved every tensor as it
    is (correct, but nothing was checkpointed): close it and say so. Recognised as the
    innermost open region, stale and with nothing saved into it.
    """
    regions = _open_regions()
    top = state.open_regions[-1] if state.open_regions else None
    if top is None or not regions or regions[-1] is not top or not top.stale() or top.frame.slots:
        return None
    warnings.warn(
        f"ckpt_compile.composable.checkpoint: a forward pre-hook of this {type(module).__name__} "
        "that runs after checkpoint's own returned new keyword arguments, so this forward was "
        "not checkpointed (its tensors were saved as usual). Register that hook before calling "
        "checkpoint(module), or with prepend=True.",
        stacklevel=2,
    )
    return top


def _capture_under_dynamo(module: nn.Module, state: _CheckpointState, args: tuple, kwargs: dict) -> Any:
    """While Dynamo traces: the module's output, traced again as a checkpoint region.

    A hook cannot stop nn.Module from calling ``forward``, so Dynamo has traced it once
    already; the output returned here replaces that one, which leaves the first trace
    unused (the compiler removes it). The region is recorded by the same call as
    :func:`ckpt_compile.checkpoint`'s under Dynamo, so ``backend="ckpt"`` and torch's own
    partitioners treat it as they treat a ``cc.checkpoint`` region.
    """
    if not state.enable_hook or not torch.is_grad_enabled():
        return None
    from ckpt_compile.eager._capture import checkpoint_under_dynamo

    options = {
        "use_reentrant": False,
        "context_fn": state.context_fn or noop_context_fn,
        "determinism_check": state.determinism_check,
        "debug": state.debug,
        "early_stop": state.early_stop,
        "preserve_rng_state": state.preserve_rng_state,
        "respect_saved_tensors_hooks": None,
    }
    return checkpoint_under_dynamo(module.forward, args, dict(kwargs), options)
