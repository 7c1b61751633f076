"""Public path of the module wrappers (docs/api.md); the code lives in ``ckpt_compile.modules.wrappers``.

A drop-in for ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper``.
"""
from ckpt_compile.modules.wrappers import (
    ActivationWrapper,
    CheckpointImpl,
    CheckpointWrapper,
    OffloadWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    offload_wrapper,
)

__all__ = [
    "CheckpointImpl",
    "ActivationWrapper",
    "CheckpointWrapper",
    "OffloadWrapper",
    "checkpoint_wrapper",
    "offload_wrapper",
    "apply_activation_checkpointing",
]
