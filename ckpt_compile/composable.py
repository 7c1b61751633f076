"""Public path of the composable API (docs/api.md); the code lives in ``ckpt_compile.modules.composable``.

A drop-in for ``torch.distributed._composable.checkpoint``.
"""
from ckpt_compile.modules.composable import checkpoint

__all__ = ["checkpoint"]
