"""Clear answers to common mistakes (issue 22), checked where they are made.

Private helpers of ``_checkpoint`` and ``_selective`` (the eager API), and of ``plan`` and
``explain`` (a model that fails on its example inputs, or has nothing that needs a
gradient): each error names the argument, what was received and what is accepted; each
warning names a silent trap. They import nothing above the engine (policies mark
themselves with plain attributes, read here):

* ``_checkpoint_policy_factory``: on a policy *factory* (``save_only_these_names``): the
  call that makes a policy, shown when the factory itself is passed as a policy;
* ``_checkpoint_names``: on a name-based policy: the names it looks for, so a name that no
  ``checkpoint_name`` in the region used is reported (a typo saves silently less).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy

from ckpt_compile.passes.facts import as_policy

__all__: list[str] = []

CHECKPOINT_KEYWORDS = (
    "use_reentrant", "context_fn", "determinism_check", "debug", "early_stop", "preserve_rng_state",
    "respect_saved_tensors_hooks",
)


def describe(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters, with the type: ``'x' (str)``."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return None


def _accepts(fn: Callable, *args: Any, partial: bool = False) -> bool:
    """Whether ``fn(*args)`` binds (``partial``: whether it takes that many positionals)."""
    signature = _signature(fn)
    if signature is None:
        return True
    try:
        (signature.bind_partial if partial else signature.bind)(*args)
    except TypeError:
        return False
    return True


def check_function(function: Any, has_inputs: bool) -> None:
    """``checkpoint(function, ...)``: a callable, and a bare ``@checkpoint`` caught early."""
    if not callable(function):
        hint = (" For the decorator form pass the options by keyword: "
                "@ckpt_compile.checkpoint(use_reentrant=False)." if isinstance(function, bool) else "")
        raise TypeError(
            f"ckpt_compile.checkpoint(function, *args): function must be a callable (the region "
            f"to run, e.g. a module or a function), got {describe(function)}.{hint}"
        )
    if has_inputs or torch.compiler.is_dynamo_compiling():
        return
    signature = _signature(function)
    if signature is None:
        return
    try:
        signature.bind()
    except TypeError:
        raise TypeError(
            f"ckpt_compile.checkpoint({_name(function)}) got no inputs, but {_name(function)}{signature} "
            f"needs some. To checkpoint every call of a function, decorate it with parentheses: "
            f"@ckpt_compile.checkpoint(use_reentrant=False); to checkpoint one call, pass its "
            f"inputs: ckpt_compile.checkpoint(fn, x, use_reentrant=False)."
        ) from None


def unexpected_keywords(api: str, keywords: Any, accepted: str) -> ValueError:
    """torch's "Unexpected keyword arguments: x" (kept as the first words), plus what is accepted."""
    return ValueError(f"Unexpected keyword arguments: {','.join(keywords)}. {api} {accepted}")


def region_contexts(context_fn: Any) -> tuple[Any, Any]:
    """``context_fn()``, checked: a function of no arguments returning two context managers."""
    factory = _selective_factory(context_fn)
    if factory:
        raise TypeError(
            f"ckpt_compile.checkpoint: context_fn must be a function of no arguments returning the "
            f"two contexts; got {factory} itself. Bind the policy: "
            f"context_fn=functools.partial({factory}, policy)."
        )
    if isinstance(context_fn, (tuple, list)):
        raise TypeError(
            f"ckpt_compile.checkpoint: context_fn must be a function returning the two contexts, got "
            f"the {type(context_fn).__name__} of contexts itself (a fresh pair is needed for every "
            f"region). Pass context_fn=functools.partial(create_selective_checkpoint_contexts, policy)."
        )
    if not callable(context_fn):
        raise TypeError(
            f"ckpt_compile.checkpoint: context_fn must be a function of no arguments returning two "
            f"context managers, got {describe(context_fn)}."
        )
    if not _accepts(context_fn):
        is_policy = _accepts(context_fn, None, None, partial=True)
        hint = (f" It looks like a selective-checkpoint policy: pass context_fn=functools.partial("
                f"create_selective_checkpoint_contexts, {_name(context_fn)})." if is_policy else "")
        raise TypeError(
            f"ckpt_compile.checkpoint: context_fn is called with no arguments, but "
            f"{_name(context_fn)}{_signature(context_fn)} needs some.{hint}"
        )
    contexts = context_fn()
    if not isinstance(contexts, (tuple, list)) or len(contexts) != 2:
        size = f"a {type(contexts).__name__} of {len(contexts)}" if isinstance(contexts, (tuple, list)) else describe(contexts)
        raise TypeError(
            f"ckpt_compile.checkpoint: context_fn must return two context managers (entered around "
            f"the forward and around the recomputation), but {_name(context_fn)} returned {size}. "
            f"For one context, return (ctx, contextlib.nullcontext())."
        )
    for which, ctx in zip(("first (forward)", "second (recompute)"), contexts):
        if not (hasattr(ctx, "__enter__") and hasattr(ctx, "__exit__")):
            raise TypeError(
                f"ckpt_compile.checkpoint: context_fn must return two context managers, but the "
                f"{which} value {_name(context_fn)} returned is {describe(ctx)}, not a context manager."
            )
    return contexts[0], contexts[1]


def _selective_factory(fn: Any) -> str | None:
    # Ours or torch's, by name (the engine's selective module imports this one).
    name = getattr(fn, "__name__", None)
    return name if name == "create_selective_checkpoint_contexts" else None


def check_policy(policy_fn: Callable) -> None:
    """A policy is called ``policy(ctx, op, *args, **kwargs)``: say so when it cannot be."""
    factory = getattr(policy_fn, "_checkpoint_policy_factory", None)
    if factory:
        raise TypeError(
            f"create_selective_checkpoint_contexts: {_name(policy_fn)} makes a policy, it is not one: "
            f"pass {factory} (its result is the policy)."
        )
    if not _accepts(policy_fn, None, None, partial=True):
        raise TypeError(
            f"create_selective_checkpoint_contexts: a policy is called as policy(ctx, op, *args, "
            f"**kwargs) and returns a CheckpointPolicy, but {_name(policy_fn)}{_signature(policy_fn)} "
            f"cannot be called that way."
        )


class PolicyWatch:
    """What one region's forward mode notices for the warnings below."""

    __slots__ = ("names_used", "warned_offload", "error")

    def __init__(self) -> None:
        self.names_used: set[str] = set()
        self.warned_offload = False
        # A policy's TypeError, kept: Tensor's operators (`a @ b`) turn a TypeError raised
        # inside them into NotImplemented, so Python reports "unsupported operand" instead.
        self.error: BaseException | None = None

    def finish(self, policy_fn: Callable, exc: BaseException | None) -> None:
        """At the end of the region's forward: re-raise a masked policy error, or warn
        about names the policy looks for that no ``checkpoint_name`` in the region used."""
        if self.error is not None and exc is not None and exc is not self.error:
            error, self.error = self.error, None
            raise error
        wanted = getattr(policy_fn, "_checkpoint_names", None)
        if exc is not None or not wanted:
            return
        for name in sorted(set(wanted) - self.names_used):
            used = ", ".join(repr(n) for n in sorted(self.names_used)) or "none"
            warnings.warn(
                f"selective checkpoint policy {_name(policy_fn)}: no checkpoint_name(..., {name!r}) ran "
                f"in this checkpointed region (names used here: {used}), so {name!r} matches nothing; "
                f"check the spelling and that the region marks the value.",
                UserWarning,
                stacklevel=2,
            )

    def offloading(self, policy_fn: Callable, func, out: Any) -> None:
        """An offload decision for an output already in host memory: one warning per region."""
        if self.warned_offload:
            return
        tensors = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if tensors and all(t.device.type == "cpu" for t in tensors):
            self.warned_offload = True
            warnings.warn(
                f"selective checkpoint policy {_name(policy_fn)} offloads the output of {func} to CPU, "
                f"but it is already on CPU: there is nothing to offload to, so it is kept as saved. "
                f"CPU offload saves memory only for tensors on an accelerator.",
                UserWarning,
                stacklevel=2,
            )


# ---------------------------------------------------------------- plan / explain inputs
def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(s) for s in value.shape)}] on {value.device}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe_value(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"{type(value).__name__}[{inner}]"
    if isinstance(value, dict):
        return "dict{" + ", ".join(f"{k!r}: {_describe_value(v)}" for k, v in list(value.items())[:4]) + "}"
    return describe(value, limit=40)


def describe_inputs(args: tuple, kwargs: dict) -> str:
    """``example_inputs = (float32[4, 9] on cpu)``: what a model was called with."""
    if not args and not kwargs:
        return "no example inputs (pass them after the model)"
    parts = []
    if args:
        parts.append("example_inputs = (" + ", ".join(_describe_value(a) for a in args) + ")")
    if kwargs:
        parts.append("example_kwargs = {" + ", ".join(f"{k}: {_describe_value(v)}" for k, v in kwargs.items()) + "}")
    return " and ".join(parts)


def _parameters(model: Any) -> str:
    if not isinstance(model, torch.nn.Module):
        return ""
    kinds = sorted({f"{str(p.dtype).removeprefix('torch.')} on {p.device}" for p in model.parameters()})
    return f"; its parameters are {', '.join(kinds)}" if kinds else ""


def model_call_error(api: str, model: Any, args: tuple, kwargs: dict, error: BaseException) -> ValueError:
    """The user's model failed on the example inputs: say which call, with which inputs."""
    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    lines = str(root).strip().splitlines()
    name = type(model).__name__ if isinstance(model, torch.nn.Module) else _name(model)
    return ValueError(
        f"{api}: calling the {name} with {describe_inputs(args, kwargs)} failed: "
        f"{type(root).__name__}: {lines[0] if lines else ''} Check that the example inputs are what the "
        f"model takes (shapes, dtypes, devices{_parameters(model)}); keywords that are not {api}'s "
        f"own go to the model."
    )


def check_needs_grad(api: str, model: Any, args: tuple, kwargs: dict) -> None:
    """Nothing requires grad: the backward saves nothing, so a plan or report is empty."""
    if not isinstance(model, torch.nn.Module) or any(p.requires_grad for p in model.parameters()):
        return
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
        return
    raise ValueError(
        f"{api}: nothing requires grad: no parameter of the {type(model).__name__} and no example input "
        f"requires grad, so the backward saves nothing. Unfreeze the parameters "
        f"(model.requires_grad_()) or pass inputs made with x.requires_grad_()."
    )


def policy_decision(value: Any, func, policy_fn=None) -> CheckpointPolicy:
    """The policy's answer as a CheckpointPolicy, or a TypeError naming the policy and the op."""
    policy = as_policy(value)  # a member, or PyTorch's older boolean form (True means save)
    if policy is not None:
        return policy
    name = getattr(policy_fn, "__name__", None)
    raise TypeError(
        f"selective checkpoint policy {name + ' ' if name else ''}returned {value!r} for {func}; "
        "expected a CheckpointPolicy member (MUST_SAVE, PREFER_SAVE, MUST_RECOMPUTE, PREFER_RECOMPUTE, "
        "MUST_CPU_OFFLOAD, PREFER_CPU_OFFLOAD) or a bool, for every operator (a missing `return` gives None)."
    )
