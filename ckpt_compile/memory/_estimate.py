"""``estimate_memory``: one steady-state training step on fake tensors, its peak and what holds it.

The step: forward, loss, backward, then (with an optimizer) ``optimizer.step()`` and
``zero_grad(set_to_none=True)``. Steady state: the optimizer's state exists before the step
(it is made by one step on zero gradients, not counted), and no gradient is alive when the
step starts. The model's output and the loss are dropped after backward, before the
optimizer step (a loop that keeps them alive longer holds them through the optimizer step).

The model is not touched: its parameters and buffers are swapped for fake copies (tied
weights stay tied) for the duration of the step and put back after it, even on error.
Every checkpoint entry point works, because the step runs the model as it is: ours and
torch's ``checkpoint``, wrappers, composable, selective policies, offload, an applied plan.

Workspaces: fake tensors see every tensor an operator returns, not the scratch memory a
kernel allocates inside itself and frees before returning; none is modelled. They matter
only when the peak falls inside such an operator (CPU convolutions' im2col buffers).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ckpt_compile.memory._step import CATEGORIES, StepMemory
from ckpt_compile.memory._tracker import _Tracker

__all__ = ["estimate_memory"]


def estimate_memory(model: nn.Module, *example_inputs: Any, optimizer: Any = None,
                    loss_fn: Callable[[Any], torch.Tensor] | None = None, world_size: int = 1,
                    **example_kwargs: Any) -> StepMemory:
    """Estimate the peak of live tensor bytes of one training step of ``model`` on fake tensors.

    ``optimizer``: an optimizer class or a callable ``params -> optimizer`` (None: no
    optimizer step); ``loss_fn(output)`` makes the loss, else ``output.loss``, else a scalar
    output. ``world_size=N``: one rank under FSDP2 ``fully_shard`` of each block and the root.
    A model built on ``device="meta"`` works: nothing is computed.

    >>> import functools, torch, ckpt_compile as cc
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    >>> est = cc.estimate_memory(model, torch.randn(64, 256), loss_fn=lambda out: out.sum(),
    ...                          optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    >>> est.peak_bytes > est.start_bytes, est.peak_phase in cc.memory.PHASES
    (True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ckpt_compile.estimate_memory: model must be an nn.Module, got {type(model).__name__}")
    make_optimizer = _optimizer_factory(optimizer)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"ckpt_compile.estimate_memory: world_size must be an int >= 1 (ranks), got {world_size!r}")
    if world_size > 1:
        from ckpt_compile.memory._fsdp import sharding_for

        return _estimate(model, example_inputs, example_kwargs, make_optimizer, loss_fn,
                         sharding=sharding_for(model, world_size),
                         source=f"estimate on fake tensors, one rank of {world_size} under FSDP2")
    return _estimate(model, example_inputs, example_kwargs, make_optimizer, loss_fn)


def _optimizer_factory(optimizer: Any) -> Callable | None:
    if optimizer is None:
        return None
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"ckpt_compile.estimate_memory: optimizer must be an optimizer class or a callable "
            f"params -> optimizer (e.g. functools.partial(torch.optim.SGD, lr=0.1)), got an instance of "
            f"{type(optimizer).__name__}; the estimate builds its own on fake parameters")
    if not callable(optimizer):
        raise TypeError(f"ckpt_compile.estimate_memory: optimizer must be an optimizer class or a callable "
                        f"params -> optimizer, got {optimizer!r}")
    return optimizer


def _estimate(model, args, kwargs, make_optimizer, loss_fn, sharding=None,
              source: str = "estimate on fake tensors") -> StepMemory:
    """The step on fake tensors, with ``model``'s state swapped for fake copies;
    ``sharding`` (``_fsdp``) moves the tracker's offsets as FSDP2 would."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    names = {id(m): _clean(name) for name, m in model.named_modules(remove_duplicate=False) if _clean(name)}
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    with fake_mode, _fake_state(model, fake_mode) as state:
        fake_args, fake_kwargs = tree_map(lambda v: fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) else v,
                                          (args, kwargs))
        params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
        opt = make_optimizer(params) if make_optimizer is not None else None
        if opt is not None:
            _warm_up(opt, params)
        tracker = _Tracker(names, device)
        for t in state:
            tracker.adopt(t, "parameters")
        if opt is not None:
            for t in torch.utils._pytree.tree_leaves([dict(s) for s in opt.state.values()]):
                tracker.adopt(t, "optimizer_state")
        for t in torch.utils._pytree.tree_leaves((fake_args, fake_kwargs)):
            tracker.adopt(t, "activations")
        hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.adopt(p.grad, "gradients")) for p in params]
        if sharding is not None:
            sharding.install(tracker, params, opt)
        start = sum(tracker.totals) + sum(tracker.offsets)
        try:
            with torch.enable_grad(), tracker, warnings.catch_warnings():
                # Our module hooks are global while the step runs; torch.compile warns that
                # they fire once more for the OptimizedModule, which the tracker expects.
                warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
                tracker.sample()
                tracker.phase = "forward"
                output = model(*fake_args, **fake_kwargs)
                tracker.phase = "loss"
                loss = _loss(output, loss_fn)
                tracker.start_backward(loss)
                loss.backward()
                del output, loss
                if sharding is not None:
                    sharding.backward_finished()
                if opt is not None:
                    tracker.phase = "optimizer"
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if sharding is not None:
                        sharding.step_finished()
                tracker.sample()
        finally:
            for hook in hooks:
                hook.remove()
            if sharding is not None:
                sharding.remove()
    point = tracker.peak_point
    return StepMemory(
        peak_bytes=tracker.peak, start_bytes=start, peak_phase=point.phase, peak_module=point.module,
        breakdown=dict(zip(CATEGORIES, point.bytes)), timeline=tuple(tracker.timeline),
        source=source, device=str(device), unit="op")


# Wrappers' inner module names (torch.compile, checkpoint_wrapper, FSDP1) say nothing to
# the user: "blocks.0._checkpoint_wrapped_module.fc" is reported as "blocks.0.fc".
_WRAPPED = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def _clean(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPED)


def _loss(output: Any, loss_fn) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(output)
        what = "loss_fn(output)"
    elif getattr(output, "loss", None) is not None:
        loss, what = output.loss, "output.loss"
    else:
        loss, what = output, "the model's output"
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"a tensor of shape {tuple(loss.shape)}"
        raise TypeError(
            f"ckpt_compile.estimate_memory: the loss must be a scalar tensor; {what} is {got}. "
            f"Pass loss_fn=lambda output: ... that returns one, or return a scalar or an object with .loss")
    return loss


def _warm_up(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Make the optimizer's state (one step on zero gradients), then drop the gradients."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _fake_state(model: nn.Module, fake_mode):
    """Swap every parameter and buffer of ``model`` for a fake copy (one copy per tensor, so
    tied weights stay tied), yield the fake tensors, and put the real ones back."""
    fakes: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict, str, Any]] = []

    def fake(t: torch.Tensor, is_param: bool) -> torch.Tensor:
        if id(t) not in fakes:
            f = fake_mode.from_tensor(t)
            fakes[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if is_param else f
        return fakes[id(t)]

    try:
        for module in model.modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, t in list(table.items()):
                    if t is not None:
                        swapped.append((table, name, t))
                        table[name] = fake(t, is_param)
        yield list(fakes.values())
    finally:
        for table, name, t in reversed(swapped):
            table[name] = t
