"""Which submodules ``apply_activation_checkpointing`` wraps, and the in-place rewrite.

Private helper of :mod:`ckpt_compile.wrappers`. It follows FSDP's auto-wrap protocol, as
``torch.distributed.algorithms._checkpoint.checkpoint_wrapper.apply_activation_checkpointing``
does in torch 2.13, without importing FSDP:

* a *callable* policy is asked ``policy(module=m, recurse=True, nonwrapped_numel=n)``
  before descending into ``m`` (``False`` leaves the whole subtree alone) and
  ``policy(module=m, recurse=False, nonwrapped_numel=rest)`` after ``m``'s children were
  handled, where ``rest`` counts the parameters not already inside a wrapped child;
  ``check_fn`` becomes such a policy that always descends and wraps where
  ``check_fn(m)`` is true;
* an FSDP policy *object* (``ModuleWrapPolicy``, ``CustomPolicy``: anything with
  ``_run_policy``) names its targets up front, and they are wrapped children first.

The root module is never wrapped, and a module reachable through several parents is
wrapped once (every parent then holds the same wrapper).

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
>>> policy = lambda module, recurse, nonwrapped_numel: recurse or isinstance(module, nn.ReLU)
>>> wrap_submodules(model, policy, lambda m: nn.Sequential(m))
>>> [type(m).__name__ for m in model]
['Linear', 'Sequential']
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

__all__: list[str] = []


def check_fn_policy(check_fn: Callable[[nn.Module], bool]) -> Callable[..., bool]:
    """The callable policy equivalent to FSDP's ``lambda_auto_wrap_policy(check_fn)``."""
    if isinstance(check_fn, type):
        raise TypeError(
            f"apply_activation_checkpointing: check_fn must be a function module -> bool, got the "
            f"class {check_fn.__name__}; to wrap every {check_fn.__name__}, pass "
            f"check_fn=lambda m: isinstance(m, {check_fn.__name__})."
        )

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            return True
        answer = check_fn(module)
        if not isinstance(answer, bool) and not policy.non_bool:
            policy.non_bool.append((type(module).__name__, answer))  # the first one, for the warning
        return bool(answer)

    policy.non_bool = []
    return policy


def warn_if_nothing_wrapped(model: nn.Module, policy: Any, chooser: str, wrapped: int) -> None:
    """The silent traps of ``apply_activation_checkpointing`` (issue 22): a ``check_fn``
    answering something else than a bool (a missing ``return`` gives None), and a policy
    that matched no submodule."""
    for cls, answer in getattr(policy, "non_bool", ()):
        warnings.warn(
            f"apply_activation_checkpointing: check_fn returned {answer!r} ({type(answer).__name__}) for a "
            f"{cls}, not a bool; it was read as {bool(answer)}. Return True or False (a function without "
            f"`return` gives None).",
            UserWarning,
            stacklevel=3,
        )
    if not wrapped:
        warnings.warn(
            f"apply_activation_checkpointing wrapped no submodule of the {type(model).__name__}: its "
            f"{chooser} selected none (the root module itself is never wrapped). Check the class it "
            f"tests for, e.g. check_fn=lambda m: isinstance(m, Block).",
            UserWarning,
            stacklevel=3,
        )


def wrap_submodules(
    model: nn.Module,
    policy: Callable[..., bool] | Any,
    wrapper_fn: Callable[..., nn.Module],
) -> int:
    """Replace the submodules of ``model`` that ``policy`` selects by ``wrapper_fn(module)``;
    returns how many were wrapped."""
    calls = []

    def counted(module: nn.Module, **kwargs: Any) -> nn.Module:
        calls.append(module)
        return _call_wrapper(wrapper_fn, module, kwargs)

    if callable(policy):
        _wrap_with_callable_policy(model, policy, counted)
        return len(calls)
    run_policy = getattr(policy, "_run_policy", None)
    if run_policy is None:
        raise ValueError(
            f"apply_activation_checkpointing: auto_wrap_policy must be a callable "
            f"policy(module, recurse, nonwrapped_numel) -> bool or an FSDP wrap policy object "
            f"(e.g. torch.distributed.fsdp.wrap.ModuleWrapPolicy), got {policy!r}."
        )
    targets = run_policy(model, ignored_modules=set(), root_kwargs={})
    _wrap_targets_post_order(model, targets, counted)
    return len(calls)


def _wrap_with_callable_policy(
    model: nn.Module, policy: Callable[..., bool], wrapper_fn: Callable[..., nn.Module]
) -> None:
    replaced: dict[int, tuple[nn.Module, int]] = {}  # id(module) -> (replacement, numel)

    def visit(module: nn.Module, is_root: bool) -> tuple[nn.Module, int]:
        numel = sum(p.numel() for p in module.parameters())
        if not policy(module=module, recurse=True, nonwrapped_numel=numel):
            return module, 0
        wrapped_numel = 0
        for name, child in list(module._modules.items()):  # shared ones too
            if child is None:
                continue
            if id(child) in replaced:
                replacement, _ = replaced[id(child)]  # shared module: counted once, above
                child_numel = 0
            else:
                replacement, child_numel = visit(child, is_root=False)
                replaced[id(child)] = (replacement, child_numel)
            if replacement is not child:
                setattr(module, name, replacement)
            wrapped_numel += child_numel
        if not is_root and policy(module=module, recurse=False, nonwrapped_numel=numel - wrapped_numel):
            return _call_wrapper(wrapper_fn, module, {}), numel
        return module, wrapped_numel

    visit(model, is_root=True)


def _wrap_targets_post_order(
    model: nn.Module, targets: dict[nn.Module, dict[str, Any]], wrapper_fn: Callable[..., nn.Module]
) -> None:
    replaced: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> nn.Module:
        for name, child in list(module._modules.items()):  # shared ones too
            if child is None:
                continue
            if id(child) not in replaced:
                replaced[id(child)] = visit(child)
            replacement = replaced[id(child)]
            if replacement is not child:
                setattr(module, name, replacement)
        if module is not model and module in targets:
            return _call_wrapper(wrapper_fn, module, targets[module])
        return module

    visit(model)


def _call_wrapper(wrapper_fn: Callable[..., nn.Module], module: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    wrapped = wrapper_fn(module, **kwargs)
    if not isinstance(wrapped, nn.Module):
        raise TypeError(
            f"apply_activation_checkpointing: checkpoint_wrapper_fn must return an nn.Module, "
            f"but {getattr(wrapper_fn, '__name__', wrapper_fn)!r} returned "
            f"{type(wrapped).__qualname__} for {type(module).__name__}."
        )
    return wrapped
