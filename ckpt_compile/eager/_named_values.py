"""The operator behind ``cc.checkpoint_name``, and how the selective engine recognises it.

The operator (``ckpt_compile::checkpoint_name``) is defined here, in the engine, so that it
exists whenever the engine does: what the engine does never depends on whether
``ckpt_compile.policies`` (which exposes ``checkpoint_name``) was imported. A named value's
producer is found by storage, because the name may see the producer's output through a
view of all of it (a linear layer on 3-d input ends in a reshape). See
``_selective._SaveMode._serve_name``.
"""
from __future__ import annotations

from typing import Any

import torch


def aliases(ptr: int, args: tuple) -> bool:
    # Alias-returning ops take the aliased tensor as a direct argument.
    return any(type(a) is torch.Tensor and storage_ptr(a) == ptr for a in args)


def storage_ptr(x: Any) -> int:
    """Data pointer of a dense tensor's storage; 0 for anything else (fake, meta, functional
    or batched tensors under tracing, empty tensors, non-tensors)."""
    if type(x) is not torch.Tensor or x.is_meta or not x.numel():
        return 0
    try:
        return x.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


# A functional custom op: policies see it as one operator call whose second argument is
# the name. It returns a copy, not a view: custom ops may not alias their inputs, and a
# view would share its producer's storage (the partitioner never saves a view alone). The
# copy costs no saved bytes: inside a checkpointed region the producer's output is not
# kept once the copy exists, so the named value is stored exactly once.
@torch.library.custom_op("ckpt_compile::checkpoint_name", mutates_args=())
def _name_op(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.clone()


@_name_op.register_fake
def _(x, name):
    return torch.empty_like(x)


def _name_backward(ctx, grad):
    return grad, None


_name_op.register_autograd(_name_backward)

NAME_OP = torch.ops.ckpt_compile.checkpoint_name.default


def is_name_op(func) -> bool:
    return func is NAME_OP
