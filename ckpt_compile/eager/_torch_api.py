"""The rest of ``torch.utils.checkpoint``'s public namespace, and what differs by torch version.

``torch.utils.checkpoint.__all__`` also holds small helpers that code written for the
reentrant engine imports from there (Megatron-style code: ``detach_variable``,
``get_device_states`` / ``set_device_states``, ``CheckpointFunction``), and the set of
operators selective checkpointing never caches (``SAC_IGNORED_OPS``). They are here with
the same signatures, results, warnings and errors, so swapping the import keeps working.

Messages that changed between torch releases are chosen from the installed torch's own
API (feature detection, never a version string): ``checkpoint`` follows the documentation
of the torch it runs with.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterable

import torch
import torch.utils.checkpoint as _torch_checkpoint

__all__ = ["SAC_IGNORED_OPS", "check_backward_validity", "detach_variable"]

# torch's own set object, not a copy: code that adds an operator to
# ``torch.utils.checkpoint.SAC_IGNORED_OPS`` (or to ours) changes what both torch's and our
# selective checkpointing skip, as it would with torch alone.
SAC_IGNORED_OPS: set = _torch_checkpoint.SAC_IGNORED_OPS

# torch 2.14 added ``respect_saved_tensors_hooks`` (and the decorator form) to checkpoint.
TORCH_HAS_RESPECT_HOOKS = "respect_saved_tensors_hooks" in inspect.signature(_torch_checkpoint.checkpoint).parameters


def reentrant_options_message(respect_saved_tensors_hooks_passed: bool) -> str:
    """The ``ValueError`` text for reentrant-only restrictions, worded as the installed torch
    words it (2.14 names ``respect_saved_tensors_hooks`` too). On older torch the new keyword
    is ours, so its own rejection uses the newer wording."""
    if TORCH_HAS_RESPECT_HOOKS or respect_saved_tensors_hooks_passed:
        return (
            "Passing `context_fn`, `debug`, or `respect_saved_tensors_hooks` is only supported "
            "when use_reentrant=False."
        )
    return "Passing `context_fn` or `debug` is only supported when use_reentrant=False."


def detach_variable(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Detach every tensor of the tuple ``inputs``, keeping its ``requires_grad`` flag.

    Non-tensors pass through; anything but a tuple is a ``RuntimeError``, as in
    ``torch.utils.checkpoint.detach_variable``.

    >>> import torch, ckpt_compile as cc
    >>> x = torch.ones(2, requires_grad=True) * 2
    >>> d, n = cc.detach_variable((x, 3))
    >>> d.grad_fn is None, d.requires_grad, n
    (True, True, 3)
    """
    if not isinstance(inputs, tuple):
        raise RuntimeError(
            f"Only tuple of tensors is supported. Got Unsupported input type: {type(inputs).__name__}"
        )
    out = []
    for value in inputs:
        if isinstance(value, torch.Tensor):
            detached = value.detach()
            detached.requires_grad = value.requires_grad
            value = detached
        out.append(value)
    return tuple(out)


def check_backward_validity(inputs: Iterable[Any]) -> None:
    """Warn, as torch does, when no tensor in ``inputs`` requires grad (gradients will be None).

    >>> import torch, warnings, ckpt_compile as cc
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     cc.check_backward_validity((torch.ones(1),))
    >>> str(caught[0].message)
    'None of the inputs have requires_grad=True. Gradients will be None'
    """
    if not any(value.requires_grad for value in inputs if isinstance(value, torch.Tensor)):
        warnings.warn("None of the inputs have requires_grad=True. Gradients will be None", stacklevel=2)


def _current_user_saved_tensors_hooks():
    """The ``(pack, unpack)`` pair a tensor saved right now would use, skipping the hooks
    checkpointing itself installs (they carry ``_checkpoint_internal`` and remember the pair
    that was visible when they were entered; torch 2.14+ marks its own hooks the same way,
    so regions of either implementation nest), or ``None``."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    while hooks is not None and getattr(hooks[0], "_checkpoint_internal", False):
        hooks = hooks[0]._user_hooks
    return hooks
