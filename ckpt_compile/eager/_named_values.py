"""How the selective engine recognises a value named with ``cc.checkpoint_name``.

The name's operator (``ckpt_compile::checkpoint_name``, defined by ``ckpt_compile.policies``)
is matched by its qualified name, so the engine imports nothing above it; its producer is
found by storage, because the name may see the producer's output through a view of all of
it (a linear layer on 3-d input ends in a reshape). See ``_selective._SaveMode._serve_name``.
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


def names_exist() -> bool:
    return hasattr(torch.ops.ckpt_compile, "checkpoint_name")


def is_name_op(func) -> bool:
    # ckpt_compile.policies.checkpoint_name's operator, matched by name: the engine imports
    # nothing above it.
    return getattr(func, "namespace", None) == "ckpt_compile" and func.__name__ == "checkpoint_name.default"
