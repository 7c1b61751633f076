"""Non-reentrant checkpointing, built on ``torch.autograd.graph.saved_tensors_hooks``.

The forward runs normally (with grad), but every tensor autograd wants to save is replaced
by a small :class:`_Slot`. The first time the backward unpacks a slot of a region, the
region is recomputed under a second pack hook that drops each recomputed tensor into its
slot (and stops as soon as the last one is filled, "early stop"). Each slot hands its
tensor out exactly once and forgets it: recomputed tensors are freed as soon as they are
used.

A backward call is identified by its graph task id, or by the enclosing
:class:`GraphExecGroup`; a second backward (``retain_graph=True``) recomputes again.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch._C._autograd import SavedTensor, _make_saved_tensor

from ckpt_compile.eager._common import CheckpointError, _run_fn_with_dynamo_disabled
from ckpt_compile.eager._device_state import _ReplayState
from ckpt_compile.eager._torch_api import _current_user_saved_tensors_hooks

_DEBUG_TIP = (
    "Tip: pass debug=True to ckpt_compile.checkpoint(...) or wrap the code in "
    "`with ckpt_compile.set_checkpoint_debug_enabled(True):` to see the operators of the "
    "original forward and of the recomputation side by side."
)
_CONSUMED = object()


def _tensor_metadata(x: torch.Tensor) -> tuple:
    return (x.shape, x.dtype, x.device)


def _no_metadata(x: torch.Tensor) -> None:
    return None


_DETERMINISM_CHECKS: dict[str, Callable[[torch.Tensor], Any]] = {
    "default": _tensor_metadata,
    "none": _no_metadata,
}


class _StopRecomputation(Exception):
    """Raised by the recomputation's pack hook once every saved tensor is back (early stop)."""


class _Slot:
    """Stands in for one saved tensor; holds its recomputed value per backward call."""

    __slots__ = ("index", "by_call", "__weakref__")

    def __init__(self, index: int) -> None:
        self.index = index
        self.by_call: dict[Any, Any] = {}


class _Frame:
    """The state of one checkpointed region between its forward and its backward."""

    __slots__ = (
        "run", "inputs", "slots", "metadata", "metadata_fn", "early_stop", "on_error",
        "recomputed_for", "forward_completed", "ignore_count_mismatch", "_user_hooks",
    )
    # The frame is its region's pack hook (``__call__``). Marked as checkpointing's own
    # hook, it lets a selective cache find the user's hooks beneath it (``_user_hooks``,
    # set only while the forward runs), by our lookup and by torch 2.14+'s alike.
    _checkpoint_internal = True

    def __init__(self, run: Callable, metadata_fn, early_stop: bool, on_error) -> None:
        self.run = run
        self.inputs: list[Any] = []
        self.slots: list[weakref.ref] = []
        self.metadata: list[Any] = []
        self.metadata_fn = metadata_fn
        self.early_stop = early_stop
        self.on_error = on_error
        self.recomputed_for: set = set()
        self.forward_completed = False
        self.ignore_count_mismatch = False
        self._user_hooks = None

    def save_inputs(self, args: tuple) -> None:
        # SavedTensor keeps autograd's version check: an input modified in place before
        # the backward is reported exactly as autograd reports it for ordinary ops.
        self.inputs = [_make_saved_tensor(a, is_output=False) if isinstance(a, torch.Tensor) else a for a in args]

    # -- forward ---------------------------------------------------------------------
    def pack(self, x: torch.Tensor) -> _Slot:
        slot = _Slot(len(self.slots))
        self.slots.append(weakref.ref(slot))
        if self.metadata_fn is not _no_metadata:
            self.metadata.append(self.metadata_fn(x))
        return slot

    __call__ = pack  # the frame itself is the pack hook (see ``_checkpoint_internal``)

    # -- backward --------------------------------------------------------------------
    def unpack(self, slot: _Slot) -> torch.Tensor:
        call = torch._C._get_graph_exec_group()
        if call is None:
            call = torch._C._current_graph_task_id()
            if call == -1:  # unpacked outside any backward: a one-off recomputation
                call = object()
        if call not in self.recomputed_for:
            self._recompute(call)
        value = slot.by_call.get(call, _CONSUMED)
        if value is _CONSUMED:
            group = ""
            if torch._C._get_graph_exec_group() is not None:
                group = (
                    "Performing two backward calls that overlap (i.e. require the same saved "
                    "activation in order to compute gradients) is not allowed while under the "
                    "GraphExecGroup context. "
                )
            raise CheckpointError(
                "ckpt_compile.checkpoint: Unpack is being triggered for a tensor that was already "
                f"unpacked once. {group}If you are calling ctx.saved_tensors in backward, make sure "
                "to do so only once."
            )
        slot.by_call[call] = _CONSUMED  # hand it out once, then let it go
        return value

    def _recompute(self, call: Any, keep_output: bool = False) -> Any:
        """Rerun the region for backward ``call``, filling its slots; with ``keep_output``
        it runs to the end (no early stop) and returns what the region returned (a
        segment's next block needs it, ``_segment``)."""
        expected = len(self.slots)
        early_stop = self.early_stop and not keep_output
        count = 0
        mismatches: list[str] = []

        def pack_recomputed(x: torch.Tensor) -> torch.Tensor:
            nonlocal count
            index = count
            count += 1
            x = x.detach() if x.requires_grad else x
            if index >= expected:
                if not self.forward_completed:
                    # A backward inside the region's own forward: more tensors are saved
                    # than the forward had saved so far, and that is fine.
                    self.ignore_count_mismatch = True
                    return x
                raise CheckpointError(
                    "ckpt_compile.checkpoint: trying to save more tensors during recomputation "
                    f"than during the original forward pass (the forward saved {expected}).{self._tip()}"
                )
            slot = self.slots[index]()
            if slot is not None:
                slot.by_call[call] = x
            if self.metadata:
                before = self.metadata[index]
                after = self.metadata_fn(x)
                if before != after:
                    mismatches.append(_describe_mismatch(index, before, after))
            if early_stop and count == expected:
                raise _StopRecomputation
            return x

        args = self._recompute_args(call)
        out = None
        # Checkpointing's own hook too: a nested region rerun here must find the user's
        # hooks beneath it, not this one (see ``_Frame._checkpoint_internal``).
        pack_recomputed._checkpoint_internal = True
        pack_recomputed._user_hooks = _current_user_saved_tensors_hooks()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack_recomputed, _identity), torch.enable_grad():
                out = _run_fn_with_dynamo_disabled(self.run, *args)
        except _StopRecomputation:
            pass
        finally:
            pack_recomputed._user_hooks = None
        self.recomputed_for.add(call)
        if count != expected and not self.ignore_count_mismatch:
            raise CheckpointError(
                "ckpt_compile.checkpoint: A different number of tensors was saved during the "
                "original forward and recomputation.\n"
                f"Number of tensors saved during forward: {expected}\n"
                f"Number of tensors saved during recomputation: {count}.{self._tip()}"
            )
        if mismatches:
            raise CheckpointError(
                "ckpt_compile.checkpoint: Recomputed values for the following tensors have "
                "different metadata than during the forward pass.\n"
                + "".join(mismatches).rstrip("\n") + self._tip()
            )
        return out

    def _recompute_args(self, call: Any) -> list:
        """The region's inputs for the recomputation of backward ``call``."""
        return [a.unpack() if isinstance(a, SavedTensor) else a for a in self.inputs]

    def _tip(self) -> str:
        # In debug mode the error already carries the operator traces the tip points to.
        return "" if self.on_error is not None else "\n" + _DEBUG_TIP


def _identity(x):
    return x


def _describe_mismatch(index: int, before: tuple, after: tuple) -> str:
    names = ("shape", "dtype", "device")
    diffs = [f"{name} {a} -> {b}" for name, a, b in zip(names, before, after) if a != b]
    return (
        f"tensor at position {index} (saved tensor #{index + 1} of the region):\n"
        f"saved metadata: shape={before[0]}, dtype={before[1]}, device={before[2]}\n"
        f"recomputed metadata: shape={after[0]}, dtype={after[1]}, device={after[2]}\n"
        f"differs in: {'; '.join(diffs)}\n"
    )


class _RegionHooks(torch.autograd.graph.saved_tensors_hooks):
    """The forward's saved-tensor hooks of one region. While they are on the stack the frame
    remembers the user hooks they cover, for selective caches that respect them; forgotten
    on exit, since autograd keeps the pack hook (the frame) alive with the graph."""

    def __init__(self, frame: _Frame, unpack: Callable) -> None:
        super().__init__(frame, unpack)
        self.frame = frame

    def __enter__(self):
        self.frame._user_hooks = _current_user_saved_tensors_hooks()
        return super().__enter__()

    def __exit__(self, *exc):
        self.frame._user_hooks = None
        return super().__exit__(*exc)


def _install_hooks(frame: _Frame):
    """The forward's hooks; a closure over the frame only (autograd keeps the unpack hook)."""
    frame._user_hooks = None
    on_error = frame.on_error
    if on_error is None:
        return _RegionHooks(frame, frame.unpack)

    def unpack_reporting(slot: _Slot) -> torch.Tensor:
        try:
            return frame.unpack(slot)
        except CheckpointError as e:
            on_error(e)

    return _RegionHooks(frame, unpack_reporting)


def _region_contexts(context_fn: Callable, debug: bool):
    """(forward context, recompute context, error callback) of one region.

    ``set_checkpoint_debug_enabled`` overrides ``debug``; debug mode brings its own pair of
    operator-tracing contexts, so it cannot be combined with a user ``context_fn``.
    """
    from ckpt_compile.eager._common import _Switches, noop_context_fn

    if _Switches.debug if _Switches.debug is not None else debug:
        if context_fn is not noop_context_fn:
            raise ValueError("debug=True is incompatible with non-default context_fn")
        from ckpt_compile.eager._debug import _DebugTraces

        traces = _DebugTraces()
        return (*traces.contexts(), traces.raise_with_traces)
    from ckpt_compile.eager._misuse import region_contexts

    forward_context, recompute_context = region_contexts(context_fn)
    return forward_context, recompute_context, None


def _metadata_fn(determinism_check: str):
    metadata_fn = _DETERMINISM_CHECKS.get(determinism_check)
    if metadata_fn is None:
        raise ValueError(
            f"determinism_check should be one of {list(_DETERMINISM_CHECKS)}, but got {determinism_check!r}"
        )
    return metadata_fn


def _pass_respect_saved_tensors_hooks(forward_context: Any, respect: bool | None) -> None:
    """Tell a selective forward mode (ours, or torch 2.14+'s) whether its cache goes
    through the user's saved-tensors hooks; set after construction, as torch does."""
    if hasattr(forward_context, "respect_saved_tensors_hooks"):
        forward_context.respect_saved_tensors_hooks = respect
    elif respect and isinstance(forward_context, torch.utils.checkpoint._CachingTorchDispatchMode):
        raise ValueError(
            "ckpt_compile.checkpoint: respect_saved_tensors_hooks=True needs a selective "
            "policy that can route its cache through saved_tensors_hooks; this torch's "
            "torch.utils.checkpoint.create_selective_checkpoint_contexts cannot. Use "
            "ckpt_compile.create_selective_checkpoint_contexts."
        )


def _new_frame(run: Callable, metadata_fn, early_stop: bool, on_error, frame_type: type = _Frame) -> _Frame:
    """A region's frame; ``set_checkpoint_early_stop`` overrides ``early_stop``.

    ``frame_type``: ``_Frame`` or a subclass (the composable API's keeps a call token)."""
    from ckpt_compile.eager._common import _Switches

    early_stop = _Switches.early_stop if _Switches.early_stop is not None else early_stop
    return frame_type(run, metadata_fn, early_stop, on_error)


def _checkpoint_non_reentrant(
    function: Callable,
    args: tuple,
    kwargs: dict,
    *,
    preserve_rng_state: bool,
    context_fn: Callable,
    determinism_check: str,
    debug: bool,
    early_stop: bool,
    respect_saved_tensors_hooks: bool | None = None,
):
    metadata_fn = _metadata_fn(determinism_check)
    if not torch.is_grad_enabled():
        # Nothing will be saved for backward: there is nothing to checkpoint.
        return function(*args, **kwargs)
    forward_context, recompute_context, on_error = _region_contexts(context_fn, debug)
    _pass_respect_saved_tensors_hooks(forward_context, respect_saved_tensors_hooks)
    state = _ReplayState.capture(args, preserve_rng_state)

    def run(*inputs):
        with state.replay(recompute_context):
            function(*inputs, **kwargs)

    frame = _new_frame(run, metadata_fn, early_stop, on_error)
    frame.save_inputs(args)
    completed = False
    with _install_hooks(frame), forward_context:
        out = function(*args, **kwargs)
        completed = True
    if not completed:  # the forward raised and forward_context swallowed the exception
        raise RuntimeError(
            "ckpt_compile.checkpoint: the forward context provided by context_fn suppressed "
            "an exception raised during the checkpointed forward. This is not supported "
            "because checkpoint cannot return a value for a failed forward."
        )
    frame.forward_completed = True
    state.check_no_device_init_in_forward()
    return out
