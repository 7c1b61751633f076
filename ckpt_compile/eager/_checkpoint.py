"""The public eager entry points: :func:`checkpoint` and :func:`checkpoint_sequential`."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple

import torch

from ckpt_compile.eager import _misuse
from ckpt_compile.eager._common import _skip_as_fresh_frame, noop_context_fn
from ckpt_compile.eager._torch_api import reentrant_options_message

__all__ = ["checkpoint", "checkpoint_sequential"]

_USE_REENTRANT_WARNING = (
    "{api}: the use_reentrant parameter should be passed explicitly. Starting in PyTorch "
    "2.9, calling checkpoint without use_reentrant will raise an exception. "
    "use_reentrant=False is recommended, but if you need to preserve the current default "
    "behavior, you can pass use_reentrant=True. Refer to docs for more details on the "
    "differences between the two variants."
)


def checkpoint(
    function: Callable | None = None,
    *args: Any,
    use_reentrant: bool | None = None,
    context_fn: Callable = noop_context_fn,
    determinism_check: str = "default",
    debug: bool = False,
    early_stop: bool = True,
    preserve_rng_state: bool = True,
    respect_saved_tensors_hooks: bool | None = None,
    **kwargs: Any,
):
    """Checkpoint ``function(*args, **kwargs)``: keep its inputs, recompute the rest in backward.

    A drop-in for ``torch.utils.checkpoint.checkpoint``, with the semantics of the torch it
    runs with (2.13 to 2.15) plus the two additions of torch 2.14, offered on every version:

    * the decorator form: called without ``function`` (keywords only), it returns a
      decorator, ``checkpoint(use_reentrant=False)(fn)``, that checkpoints every call of
      ``fn`` (methods too) with those options; ``fn``'s own keyword arguments then all go
      to ``fn``. Any other keyword there is a ``ValueError``, as in torch 2.14.
    * ``respect_saved_tensors_hooks`` (below). On torch 2.13, which has neither, they are
      ours with torch 2.14's meaning; nothing reaches ``function`` as a stray keyword.

    Args:
        function: the region to run; called as ``function(*args, **kwargs)``. Omitted:
            the decorator form.
        use_reentrant: ``False`` (recommended) records the region's autograd graph and
            swaps its saved tensors for recompute-on-unpack placeholders: it supports keyword
            arguments, ``torch.autograd.grad``, ``backward(inputs=...)``, nested and double
            backward, and stops recomputing as soon as every needed tensor is back.
            ``True`` runs the region under ``no_grad`` inside one autograd Function
            (:class:`CheckpointFunction`) and reruns it in a reentrant backward (no kwargs,
            no ``context_fn``/``debug``/``respect_saved_tensors_hooks``, only
            ``.backward()``). ``None`` behaves as PyTorch does: it warns that the argument
            should be passed explicitly and uses the reentrant variant. Anything else is a
            ``TypeError`` (stricter than PyTorch, which takes any truthy value, ``"no"``
            included, as ``True``).
        context_fn: returns two context managers, entered around the forward and around
            the recomputation (selective checkpointing:
            :func:`create_selective_checkpoint_contexts`). Non-reentrant only.
        determinism_check: ``"default"`` compares shape, dtype and device of every
            recomputed tensor with the saved one and raises :class:`CheckpointError`
            naming the tensor and the difference; ``"none"`` skips it.
        debug: on a mismatch, the error also lists the operators of the original forward
            and of the recomputation with the source lines that ran them. Non-reentrant only.
        early_stop: stop the recomputation once every needed tensor is recomputed
            (overridden by :func:`set_checkpoint_early_stop`). Non-reentrant only.
        preserve_rng_state: replay the CPU and device RNG states in the recomputation so
            random ops (dropout) draw the same values.
        respect_saved_tensors_hooks: whether the tensors a selective-checkpoint policy
            saves (held outside autograd, so ``saved_tensors_hooks`` such as
            ``torch.autograd.graph.save_on_cpu`` never see them) go through the
            surrounding user hooks: ``True`` routes them (packed in the forward, unpacked
            when the recomputation uses them), ``False`` keeps them as they are, ``None``
            keeps them too and, on torch 2.14+, warns (``FutureWarning``, as torch does)
            when such a hook is active. No effect without a selective policy.
            Non-reentrant only.

    Mistakes get a ``TypeError`` saying what was passed and what is accepted: a
    ``function`` that is not callable, a bare ``@checkpoint`` (a function given no inputs
    that needs some), a ``context_fn`` that is not a function returning two context
    managers (the pair itself, a policy, ``create_selective_checkpoint_contexts`` unbound).

    Under ``torch.compile`` the region is captured into the graph exactly as
    ``torch.utils.checkpoint.checkpoint`` would be with the same arguments (no graph
    break); when Dynamo is off or falls back, it runs eagerly with the recomputation
    under ``_run_fn_with_dynamo_disabled``.

    >>> import torch, ckpt_compile as cc
    >>> lin = torch.nn.Linear(4, 4)
    >>> x = torch.randn(2, 4, requires_grad=True)
    >>> cc.checkpoint(lambda t: lin(t).relu(), x, use_reentrant=False).sum().backward()
    >>> x.grad.shape
    torch.Size([2, 4])
    >>> @cc.checkpoint(use_reentrant=False)
    ... def block(t, scale=1.0):
    ...     return lin(t).relu() * scale
    >>> block(x, scale=2.0).sum().backward()
    """
    options = _Options(
        use_reentrant, context_fn, determinism_check, debug, early_stop, preserve_rng_state,
        respect_saved_tensors_hooks,
    )
    if function is None and not args:
        if kwargs:
            raise _misuse.unexpected_keywords(
                "ckpt_compile.checkpoint", kwargs,
                "(the decorator form, with no function) accepts only its options: "
                + ", ".join(_misuse.CHECKPOINT_KEYWORDS) + "; the decorated function's own keywords "
                "go to its calls.",
            )
        options.validate("ckpt_compile.checkpoint")
        return functools.partial(_CheckpointedFunction, options=options)
    _misuse.check_function(function, bool(args or kwargs))
    return _checkpoint_call(function, args, kwargs, options)


class _Options(NamedTuple):
    """The keywords of one checkpoint call (field names are torch's keyword names)."""

    use_reentrant: bool | None
    context_fn: Callable
    determinism_check: str
    debug: bool
    early_stop: bool
    preserve_rng_state: bool
    respect_saved_tensors_hooks: bool | None

    def validate(self, api: str) -> None:
        for name in ("use_reentrant", "respect_saved_tensors_hooks"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(
                    f"{api}: {name} must be True, False or None, got {value!r} "
                    f"({type(value).__name__})."
                )


class _CheckpointedFunction:
    """What the decorator form returns: ``function`` checkpointed on every call."""

    def __init__(self, function: Callable, *, options: _Options) -> None:
        self.function = function
        self.options = options
        functools.update_wrapper(self, function, updated=())

    def __call__(self, *args: Any, **kwargs: Any):
        return _checkpoint_call(self.function, args, kwargs, self.options)

    def __get__(self, instance, owner=None):
        # Used on a method: bind it to the instance and keep the options.
        if instance is None or not hasattr(self.function, "__get__"):
            return self
        return type(self)(self.function.__get__(instance, owner), options=self.options)


def _checkpoint_call(function: Callable, args: tuple, kwargs: dict, options: _Options):
    options.validate("ckpt_compile.checkpoint")
    if torch.compiler.is_dynamo_compiling():
        from ckpt_compile.eager._capture import checkpoint_under_dynamo

        return checkpoint_under_dynamo(function, args, kwargs, options._asdict())
    use_reentrant = options.use_reentrant
    if use_reentrant is None:
        # stacklevel 3: the user's call, through checkpoint() or a decorated function.
        warnings.warn(_USE_REENTRANT_WARNING.format(api="ckpt_compile.checkpoint"), stacklevel=3)
        use_reentrant = True
    return _checkpoint_eager(function, args, kwargs, options._replace(use_reentrant=use_reentrant))


@torch._disable_dynamo
def _checkpoint_eager(function, args, kwargs, options: _Options):
    # Dynamo stays off for the whole eager region, like torch's checkpoint: after a graph
    # break it must not start tracing our bookkeeping or the user's recomputation.
    if options.use_reentrant:
        if kwargs:  # torch's words, exactly (tests/test_eager_errors.py holds the parity)
            raise ValueError("Unexpected keyword arguments: " + ",".join(kwargs))
        respect_passed = options.respect_saved_tensors_hooks is not None
        if options.context_fn is not noop_context_fn or options.debug is not False or respect_passed:
            raise ValueError(reentrant_options_message(respect_passed))
        from ckpt_compile.eager._reentrant import CheckpointFunction

        return CheckpointFunction.apply(function, options.preserve_rng_state, *args)
    from ckpt_compile.eager._non_reentrant import _checkpoint_non_reentrant

    return _checkpoint_non_reentrant(
        function, args, kwargs, preserve_rng_state=options.preserve_rng_state,
        context_fn=options.context_fn, determinism_check=options.determinism_check,
        debug=options.debug, early_stop=options.early_stop,
        respect_saved_tensors_hooks=options.respect_saved_tensors_hooks,
    )


class _Segment:
    """Runs ``functions[start:end]`` in order; a named callable keeps debug traces readable."""

    __slots__ = ("functions", "start", "end")

    def __init__(self, functions, start: int, end: int) -> None:
        self.functions, self.start, self.end = functions, start, end

    def __call__(self, value):
        for j in range(self.start, self.end):
            value = self.functions[j](value)
        return value


def checkpoint_sequential(functions, segments: int, input, use_reentrant: bool | None = None, **kwargs):
    """Run a sequential model in ``segments`` chunks, checkpointing all but the last.

    Same contract as ``torch.utils.checkpoint.checkpoint_sequential``: ``functions`` is an
    ``nn.Sequential`` or a list of callables taking and returning one value, the only
    keyword accepted besides ``use_reentrant`` is ``preserve_rng_state``, and
    ``use_reentrant=None`` warns and uses the reentrant variant. Stricter than PyTorch 2.13:
    ``segments`` must be an int from 1 to ``len(functions)`` (PyTorch divides by zero or
    fails inside ``range`` otherwise), a ``ValueError`` saying so, and ``use_reentrant``
    must be a bool or ``None`` (a ``TypeError``, as for :func:`checkpoint`).

    >>> import torch, ckpt_compile as cc
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
    >>> y = cc.checkpoint_sequential(model, 2, torch.randn(2, 4, requires_grad=True), use_reentrant=False)
    """
    _Options(use_reentrant, noop_context_fn, "default", False, True, True, None).validate(
        "ckpt_compile.checkpoint_sequential"
    )
    if use_reentrant is None:
        warnings.warn(_USE_REENTRANT_WARNING.format(api="ckpt_compile.checkpoint_sequential"), stacklevel=2)
        use_reentrant = True
    preserve = kwargs.pop("preserve_rng_state", True)
    if kwargs:
        raise _misuse.unexpected_keywords(
            "ckpt_compile.checkpoint_sequential", kwargs,
            "accepts only use_reentrant and preserve_rng_state; for other options (context_fn, "
            "debug, ...) checkpoint each segment with ckpt_compile.checkpoint.",
        )
    if isinstance(functions, torch.nn.Sequential):
        functions = list(functions.children())
    elif isinstance(functions, torch.nn.Module) or not hasattr(functions, "__len__"):
        raise TypeError(
            f"checkpoint_sequential: functions must be an nn.Sequential or a list of callables, got "
            f"{_misuse.describe(functions)}; to checkpoint one module, use "
            f"ckpt_compile.checkpoint(module, input, use_reentrant=False)."
        )
    if not isinstance(segments, int) or isinstance(segments, bool):
        raise ValueError(
            f"checkpoint_sequential: segments must be an int, got {_misuse.describe(segments)}; the "
            f"call is checkpoint_sequential(functions, segments, input, use_reentrant=False)."
        )
    if not functions:
        raise ValueError("checkpoint_sequential: functions is empty; pass the layers to run in order.")
    if not 1 <= segments <= len(functions):
        raise ValueError(
            f"checkpoint_sequential: segments must be between 1 and the number of functions "
            f"({len(functions)}), got {segments}."
        )
    size = len(functions) // segments
    end = 0
    # All segments but the last are checkpointed; the last one's activations are needed
    # right away by the backward, so it runs plainly.
    for start in range(0, size * (segments - 1), size):
        end = start + size
        input = checkpoint(
            _Segment(functions, start, end), input, use_reentrant=use_reentrant, preserve_rng_state=preserve
        )
    return _Segment(functions, end, len(functions))(input)


# The eager fallback after a graph break at a checkpoint call stays on our engine: Dynamo
# must not start a fresh trace in any frame between the user's call and the engine.
for _code in (checkpoint.__code__, _checkpoint_call.__code__, _CheckpointedFunction.__call__.__code__):
    _skip_as_fresh_frame(_code)
del _code
