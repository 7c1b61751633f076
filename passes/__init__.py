"""Graph passes of the ``backend="ckpt"`` pipeline (shipped as ``ckpt_compile.passes``).

- :func:`partition`: the min-cut partitioner; same contract as torch's partition functions,
  so it can be passed as ``partition_fn`` to AOTAutograd.
- :func:`tag_recompute`: turns recompute annotations on a joint graph into per-node
  recompute policies.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "partition": "ckpt_compile.passes.partitioner",
    "tag_recompute": "ckpt_compile.passes.recompute_tags",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt_compile.passes' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
