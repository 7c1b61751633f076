"""Module wrappers for activation checkpointing and offloading, with clean names.

A drop-in for ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` (torch 2.13):
``CheckpointImpl``, ``ActivationWrapper``, ``CheckpointWrapper``, ``OffloadWrapper``,
``checkpoint_wrapper``, ``offload_wrapper`` and ``apply_activation_checkpointing``.

How names stay clean
--------------------
PyTorch's wrapper registers the wrapped module as a child called
``_checkpoint_wrapped_module``. State-dict hooks hide that prefix from ``state_dict()``, but
``named_parameters()`` of any ancestor, ``named_buffers()`` and ``named_modules()`` still
show it, and optimizer state keyed by name, distributed checkpoints and ``torch.compile``
trip over it (pytorch#108269, #117399, #124546).

Here the wrapper *stands in* for the module instead of containing it: it shares the
module's ``_parameters``, ``_buffers``, ``_non_persistent_buffers_set``, ``_modules`` and
state-dict hook dicts (the same objects), so every name-producing API walks exactly the
unwrapped tree; the module itself is a plain attribute, ``_checkpoint_wrapped_module``, not
a registered child. ``state_dict()`` / ``_load_from_state_dict``, ``_apply`` and ``train()``
are delegated to it (class-specific saving, extra state, ``nn.RNNBase`` re-pointing its
flat weights). Nothing is copied: parameters keep their identity, so an optimizer built
before wrapping keeps working. The module's own forward hooks run inside the region and in
its recomputation, as in PyTorch. One module per name, as unwrapped.

How wrapped modules stay findable by class
------------------------------------------
The wrapper of a ``Block`` is an instance of ``CheckpointWrapperBlock``, a class made on the
fly (once per wrapped class, then cached) that derives from both ``CheckpointWrapper`` and
``Block``, as FSDP2's ``fully_shard`` makes ``FSDPBlock``. So ``isinstance(m, Block)`` over
``model.modules()`` counts the wrapped blocks as with PyTorch's wrapper (which lists the
inner module under ``..._checkpoint_wrapped_module``), and code that finds layers by class
(FSDP's ``ModuleWrapPolicy``, ``transformer_layer_cls_to_wrap``, LoRA or quantization
injection, a type-keyed ``model.apply(init_fn)``) finds them under clean names, while
``isinstance(wrapper, CheckpointWrapper)`` holds as before. Why not the alternatives:
registering the module as a child (PyTorch) puts the prefix back into names; checkpointing
in place (swapping the module's own class, as ``fully_shard`` does) would checkpoint the
original object wherever else it is used, leave no unwrapped module for
``_checkpoint_wrapped_module``, and take the module's hooks out of the region.

As the wrapper is an instance of the layer's class, the layer's code may run on it: plain
attributes that the layer has (on its instance or its class) are set on the wrapped module,
whose ``forward`` reads them; others stay on the wrapper, as in PyTorch. ``apply(fn)``
shows ``fn`` the wrapper, not also the hidden module. One limit: reading through the wrapper
an instance attribute that the layer's class also defines gives the class value; read it
from ``_checkpoint_wrapped_module``.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
>>> keys = list(model.state_dict())
>>> apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Linear))
>>> type(model[0]).__name__, isinstance(model[0], nn.Linear), list(model.state_dict()) == keys
('CheckpointWrapperLinear', True, True)
>>> [name for name, _ in model.named_parameters()]
['0.weight', '0.bias', '2.weight', '2.bias']
>>> model(torch.randn(3, 4)).sum().backward()
"""
from __future__ import annotations

import abc
import enum
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ckpt_compile.eager import _checkpoint as _engine
from ckpt_compile.modules import _auto_wrap, _stand_in
from ckpt_compile.modules._offload import offload_saved_tensors

__all__ = [
    "CheckpointImpl",
    "ActivationWrapper",
    "CheckpointWrapper",
    "OffloadWrapper",
    "checkpoint_wrapper",
    "offload_wrapper",
    "apply_activation_checkpointing",
]

_WRAPPED = "_checkpoint_wrapped_module"

# The dicts that make up a module's named tree and its state-dict behaviour. The wrapper
# holds the very same dict objects as the module it wraps, so both always agree.
_SHARED_STATE = (
    "_parameters",
    "_buffers",
    "_non_persistent_buffers_set",
    "_modules",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class CheckpointImpl(enum.Enum):
    """Which engine :class:`CheckpointWrapper` uses (``use_reentrant`` True or False)."""

    REENTRANT = enum.auto()
    NO_REENTRANT = enum.auto()


class ActivationWrapper(nn.Module, abc.ABC):
    """Base class of :class:`CheckpointWrapper` and :class:`OffloadWrapper`.

    Not instantiated directly; subclasses implement ``forward`` around
    ``self._checkpoint_wrapped_module``. ``Wrapper(module)`` returns an instance of a
    subclass of both ``Wrapper`` and ``type(module)`` (see the module docstring). Attribute
    access and indexing that the wrapper does not answer itself are forwarded to the
    wrapped module.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``module`` is already wrapped by the same kind of wrapper.
    """

    def __new__(cls, module: Any = None, *args: Any, **kwargs: Any):
        if module is None:  # passed by keyword: CheckpointWrapper(mod=...) as in PyTorch
            module = kwargs.get("mod", kwargs.get("module"))
        if isinstance(module, nn.Module) and not isinstance(module, cls) and _stand_in.wrapper_base(cls) is cls:
            cls = _stand_in.specialised(cls, type(module))
        return object.__new__(cls)  # __init__ reports a module that is not an nn.Module

    def __init__(self, module: nn.Module) -> None:
        base = _stand_in.wrapper_base(type(self))
        kind = base.__name__
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{kind} wraps an nn.Module, but got {type(module).__qualname__} "
                f"({_short_repr(module)}). Pass the module itself, e.g. {kind}(nn.Linear(4, 4))."
            )
        if isinstance(module, base):
            raise ValueError(
                f"{kind}: the module is already a {kind} around "
                f"{type(module._checkpoint_wrapped_module).__name__}; wrapping it again would "
                f"apply the same treatment twice to one region. Wrap the module once, or "
                f"unwrap it first with `._checkpoint_wrapped_module`."
            )
        # nn.Module's own __init__, not the wrapped class's (next in the method order).
        nn.Module.__init__(self)
        # Plain attribute, not a registered child: it must add no name to the tree.
        object.__setattr__(self, _WRAPPED, module)
        for name in _SHARED_STATE:
            object.__setattr__(self, name, getattr(module, name))
        object.__setattr__(self, "training", module.training)

    @abc.abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    # --- forwarding to the wrapped module -------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, children (shared)
        except AttributeError:
            wrapped = self.__dict__.get(_WRAPPED)
            if wrapped is None:  # half-built (during __init__ or unpickling)
                raise
        return getattr(wrapped, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # The wrapper is an instance of the layer's class, so code that sets a layer's
        # attribute may set it here: it must reach the module whose forward reads it.
        wrapped = self.__dict__.get(_WRAPPED)
        if wrapped is None or not _stand_in.forwards_attribute(self, name, value, ActivationWrapper):
            super().__setattr__(name, value)
        else:
            setattr(wrapped, name, value)

    def __delattr__(self, name: str) -> None:
        wrapped = self.__dict__.get(_WRAPPED)
        if wrapped is not None and _stand_in.forwards_attribute(self, name, None, ActivationWrapper):
            delattr(wrapped, name)
        else:
            super().__delattr__(name)

    def __reduce_ex__(self, protocol: int):
        # The class is made on the fly: pickle how to make it again, then the state.
        return (_stand_in.new_wrapper, (_stand_in.class_recipe(type(self)),), self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        nn.Module.__setstate__(self, state)  # not the wrapped class's, which expects its own

    def __getitem__(self, key: Any) -> Any:
        """Index the wrapped module, e.g. when it is an ``nn.Sequential``."""
        return self._checkpoint_wrapped_module[key]

    def __repr__(self) -> str:
        return f"{_stand_in.wrapper_base(type(self)).__name__}({self._checkpoint_wrapped_module!r})"

    # --- behaviour of the wrapped module's class, delegated -------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped module's state dict: the same keys as the unwrapped module."""
        return self._checkpoint_wrapped_module.state_dict(*args, **kwargs)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # State dicts written through PyTorch's own wrapper may carry the prefix (for
        # example ones assembled from named_parameters()): accept them by renaming.
        _stand_in.strip_wrapped_prefix(state_dict, prefix, error_msgs)
        self._checkpoint_wrapped_module._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        # The wrapped class may refresh derived state after a conversion (nn.RNNBase re-points
        # its _flat_weights at new Parameters), so its own _apply must run; the tensors it
        # touches are shared with us.
        self._checkpoint_wrapped_module._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        self._checkpoint_wrapped_module.train(mode)
        self.training = mode
        return self

    def apply(self, fn: Callable[[nn.Module], None]):
        # fn sees the subtree (shared), then us: an instance of the wrapped class, so a
        # type-keyed fn meets each wrapped layer once, as with PyTorch's wrapper (which
        # shows it the inner module and a wrapper of no layer class).
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self


class CheckpointWrapper(ActivationWrapper):
    """Runs the wrapped module under activation checkpointing.

    Built by :func:`checkpoint_wrapper`. With the default ``checkpoint_fn`` the engine is
    :func:`ckpt_compile.checkpoint` with ``use_reentrant`` taken from ``checkpoint_impl``.
    Keyword arguments of ``forward`` work with the reentrant engine too: they are packed
    into positional inputs and unpacked inside the checkpointed region.
    """

    def __init__(
        self,
        mod: nn.Module,
        checkpoint_impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT,
        checkpoint_fn: Callable[..., Any] | None = None,
        **checkpoint_fn_kwargs: Any,
    ) -> None:
        super().__init__(mod)
        if not isinstance(checkpoint_impl, CheckpointImpl):
            raise TypeError(
                f"checkpoint_wrapper: checkpoint_impl must be CheckpointImpl.REENTRANT or "
                f"CheckpointImpl.NO_REENTRANT, got {_short_repr(checkpoint_impl)}."
            )
        if checkpoint_fn is None:
            if "use_reentrant" in checkpoint_fn_kwargs:
                raise TypeError(
                    "checkpoint_wrapper: use_reentrant is set by checkpoint_impl; pass "
                    "checkpoint_impl=CheckpointImpl.REENTRANT (or NO_REENTRANT) instead."
                )
            checkpoint_fn = functools.partial(
                _engine.checkpoint,
                use_reentrant=checkpoint_impl is CheckpointImpl.REENTRANT,
                **checkpoint_fn_kwargs,
            )
        elif not callable(checkpoint_fn):
            raise TypeError(
                f"checkpoint_wrapper: checkpoint_fn must be a callable like "
                f"ckpt_compile.checkpoint, got {_short_repr(checkpoint_fn)}."
            )
        else:
            checkpoint_fn = functools.partial(checkpoint_fn, **checkpoint_fn_kwargs)
        self.checkpoint_impl = checkpoint_impl
        self.checkpoint_fn = checkpoint_fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        wrapped = self._checkpoint_wrapped_module
        if self.checkpoint_impl is CheckpointImpl.REENTRANT and kwargs:
            # The reentrant engine accepts positional tensors only.
            flat, keys = _pack_kwargs(args, kwargs)

            def run(*inputs: Any) -> Any:
                call_args, call_kwargs = _unpack_kwargs(inputs, keys)
                return wrapped(*call_args, **call_kwargs)

            return self.checkpoint_fn(run, *flat)
        return self.checkpoint_fn(wrapped, *args, **kwargs)


class OffloadWrapper(ActivationWrapper):
    """Keeps the wrapped module's saved activations in CPU memory until backward.

    Activations on an accelerator are copied to CPU (pinned memory for CUDA) and come back
    to their device when backward needs them. Tensors that share storage with the
    module's parameters or buffers are kept by reference, never copied.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with offload_saved_tensors(self._checkpoint_wrapped_module, warn_on_cpu=True):
            return self._checkpoint_wrapped_module(*args, **kwargs)


def checkpoint_wrapper(
    module: nn.Module,
    checkpoint_impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT,
    checkpoint_fn: Callable[..., Any] | None = None,
    **checkpoint_fn_kwargs: Any,
) -> nn.Module:
    """Wrap ``module`` so that every call runs under activation checkpointing.

    Args:
        module: the module to wrap (a ``TypeError`` otherwise, naming what was passed).
        checkpoint_impl: ``CheckpointImpl.NO_REENTRANT`` (default) or ``REENTRANT``; chooses
            ``use_reentrant`` of the default engine, :func:`ckpt_compile.checkpoint`.
            Ignored by a custom ``checkpoint_fn``, except that ``REENTRANT`` still packs
            keyword arguments into positional ones, as in PyTorch.
        checkpoint_fn: a functional checkpoint to use instead, called as
            ``checkpoint_fn(module, *args, **checkpoint_fn_kwargs, **kwargs)``.
        **checkpoint_fn_kwargs: passed to the checkpoint function on every call (for
            example ``context_fn``, ``preserve_rng_state``, ``debug``).

    Stricter than PyTorch: ``use_reentrant`` in ``checkpoint_fn_kwargs`` with the default
    engine is a ``TypeError`` at construction (PyTorch fails at the first forward), and so is
    a ``checkpoint_impl`` that is not a ``CheckpointImpl``.

    >>> import torch
    >>> block = checkpoint_wrapper(torch.nn.Linear(3, 3), checkpoint_impl=CheckpointImpl.REENTRANT)
    >>> block(torch.randn(2, 3, requires_grad=True)).sum().backward()
    >>> block.weight.grad.shape, [name for name, _ in block.named_parameters()]
    (torch.Size([3, 3]), ['weight', 'bias'])
    """
    return CheckpointWrapper(module, checkpoint_impl, checkpoint_fn, **checkpoint_fn_kwargs)


def offload_wrapper(module: nn.Module) -> nn.Module:
    """Wrap ``module`` so that its saved activations wait for backward in CPU memory.

    It composes with :func:`checkpoint_wrapper` (either way round) to trade recompute for
    host memory and transfers.

    >>> import torch
    >>> block = offload_wrapper(torch.nn.Linear(3, 3))
    >>> block(torch.randn(2, 3)).sum().backward()
    >>> list(block.state_dict())
    ['weight', 'bias']
    """
    return OffloadWrapper(module)


def apply_activation_checkpointing(
    model: nn.Module,
    checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] = checkpoint_wrapper,
    check_fn: Callable[[nn.Module], bool] = lambda _: True,
    auto_wrap_policy: Callable[..., bool] | Any | None = None,
) -> None:
    """Replace, in place, the submodules of ``model`` chosen by a policy with wrapped ones.

    Submodules are visited children first; the root ``model`` is never wrapped (wrap it
    yourself with :func:`checkpoint_wrapper` if needed). ``auto_wrap_policy``, when given,
    takes precedence over ``check_fn``: it is either a callable
    ``policy(module=, recurse=, nonwrapped_numel=) -> bool`` as in FSDP, or an FSDP policy
    object such as ``ModuleWrapPolicy``. A module shared by several parents is wrapped once.
    Returns ``None``.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    >>> apply_activation_checkpointing(model, offload_wrapper, lambda m: isinstance(m, nn.Linear))
    >>> [type(m).__name__ for m in model.modules()]
    ['Sequential', 'OffloadWrapperLinear', 'Sequential', 'OffloadWrapperLinear', 'Tanh']
    >>> sum(isinstance(m, nn.Linear) for m in model.modules())
    2
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"apply_activation_checkpointing: model must be an nn.Module, got "
            f"{type(model).__qualname__} ({_short_repr(model)})."
        )
    chooser = "auto_wrap_policy"
    if auto_wrap_policy is None:
        if not callable(check_fn):
            raise TypeError(
                f"apply_activation_checkpointing: check_fn must be a callable "
                f"module -> bool, got {_short_repr(check_fn)}."
            )
        auto_wrap_policy, chooser = _auto_wrap.check_fn_policy(check_fn), "check_fn"
    if not callable(checkpoint_wrapper_fn):
        raise TypeError(
            f"apply_activation_checkpointing: checkpoint_wrapper_fn must be a callable "
            f"module -> wrapped module (e.g. checkpoint_wrapper or offload_wrapper), got "
            f"{_short_repr(checkpoint_wrapper_fn)}."
        )
    wrapped = _auto_wrap.wrap_submodules(model, auto_wrap_policy, checkpoint_wrapper_fn)
    _auto_wrap.warn_if_nothing_wrapped(model, auto_wrap_policy, chooser, wrapped)


# --- private helpers ----------------------------------------------------------------------


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pack_kwargs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """Flatten ``(args, kwargs)`` into positional values plus the keyword names."""
    return (*args, *kwargs.values()), tuple(kwargs)


def _unpack_kwargs(flat: tuple[Any, ...], keys: tuple[str, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if not keys:
        return flat, {}
    split = len(flat) - len(keys)
    return flat[:split], dict(zip(keys, flat[split:]))
