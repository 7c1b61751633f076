"""Reentrant checkpointing: one ``torch.autograd.Function`` around the whole region.

The forward runs under ``no_grad`` and keeps only the inputs; the backward reruns the
region with grad enabled and calls ``torch.autograd.backward`` on it (a reentrant backward).
Its documented restrictions are PyTorch's: no keyword arguments, no ``context_fn`` /
``debug``, only ``.backward()`` without ``inputs=``, and outputs need an input that
requires grad.

The Function is public as :class:`CheckpointFunction` (``torch.utils.checkpoint`` exports
its own under that name): ``CheckpointFunction.apply(function, preserve_rng_state, *args)``.
"""
from __future__ import annotations

import torch

from ckpt_compile.eager._common import _run_fn_with_dynamo_disabled
from ckpt_compile.eager._device_state import _ReplayState
from ckpt_compile.eager._torch_api import check_backward_validity, detach_variable

__all__ = ["CheckpointFunction"]


class CheckpointFunction(torch.autograd.Function):
    """The reentrant engine as an autograd Function, as ``torch.utils.checkpoint.CheckpointFunction``.

    ``CheckpointFunction.apply(function, preserve_rng_state, *args)`` runs ``function(*args)``
    under ``no_grad``, keeps the inputs, and reruns it in backward (a reentrant backward).
    ``checkpoint(..., use_reentrant=True)`` calls exactly this.

    >>> import torch, ckpt_compile as cc
    >>> x = torch.randn(3, requires_grad=True)
    >>> cc.CheckpointFunction.apply(torch.sin, True, x).sum().backward()
    >>> torch.allclose(x.grad, x.detach().cos())
    True
    """

    @staticmethod
    def forward(ctx, run_function, preserve_rng_state, *args):
        check_backward_validity(args)
        ctx.run_function = run_function
        ctx.state = _ReplayState.capture(args, preserve_rng_state)
        ctx.tensor_positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        # Non-tensor arguments are kept as they are; tensors go through save_for_backward
        # so autograd checks them for in-place modification.
        ctx.other_args = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_positions))
        with torch.no_grad():
            return run_function(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "When use_reentrant=True, torch.utils.checkpoint is incompatible"
                " with .grad() or passing an `inputs` parameter to .backward()."
                " To resolve this error, you can either set use_reentrant=False,"
                " or call .backward() without passing the `inputs` argument."
            )
        inputs = list(ctx.other_args)
        for position, tensor in zip(ctx.tensor_positions, ctx.saved_tensors):
            inputs[position] = tensor
        inputs = list(detach_variable(tuple(inputs)))
        with ctx.state.replay(), torch.enable_grad():
            outputs = _run_fn_with_dynamo_disabled(ctx.run_function, *inputs)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [
            (out, grad) for out, grad in zip(outputs, grad_outputs)
            if isinstance(out, torch.Tensor) and out.requires_grad
        ]
        if not pairs:
            raise RuntimeError("none of output has requires_grad=True, this checkpoint() is not necessary")
        torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        grads = tuple(a.grad if isinstance(a, torch.Tensor) else None for a in inputs)
        return (None, None) + grads
