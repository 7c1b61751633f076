"""Wrapper classes made per wrapped class, so a wrapper is also an instance of what it wraps.

Private helper of :mod:`ckpt_compile.wrappers`. ``CheckpointWrapper(block)`` builds (once
per pair, then cached) the class ``CheckpointWrapperBlock(CheckpointWrapper, Block)`` and
makes the wrapper an instance of it: ``isinstance(wrapper, Block)`` holds, so code that
walks ``modules()`` by class (FSDP's ``ModuleWrapPolicy``, LoRA or quantization injection,
``model.apply(init_fn)``) finds the wrapped layers. The naming follows FSDP2's
``fully_shard`` (``FSDPBlock``). The wrapper classes come first in the method order:
``forward``, ``state_dict`` and the other behaviour they define win over the layer's.

Such classes cannot be pickled by reference (they live in no module), so a wrapper pickles
as a *recipe*: the wrapper base class and the wrapped class, rebuilt through the cache.
Also here: which attribute assignments on a wrapper belong to the wrapped module, and
reading state dicts that carry PyTorch's ``_checkpoint_wrapped_module.`` prefix.

>>> from torch import nn
>>> class Wrapper(nn.Module):
...     pass
>>> cls = specialised(Wrapper, nn.Linear)
>>> cls.__name__, issubclass(cls, nn.Linear), specialised(Wrapper, nn.Linear) is cls
('WrapperLinear', True, True)
>>> rebuild(class_recipe(cls)) is cls
True
"""
from __future__ import annotations

import warnings
from typing import Any

__all__: list[str] = []

# (wrapper base class, wrapped class) -> the class of that wrapper around that class.
_CACHE: dict[tuple[type, type], type] = {}
_BASE = "_ckpt_compile_wrapper_base"
_WRAPPED_CLASS = "_ckpt_compile_wrapped_class"
_PREFIX = "_checkpoint_wrapped_module."  # what PyTorch's wrapper adds to names


def wrapper_base(cls: type) -> type:
    """The wrapper class a (possibly specialised) wrapper class was made from."""
    return getattr(cls, _BASE, cls)


def specialised(base: type, wrapped: type) -> type:
    """``base`` made a subclass of ``wrapped`` too (cached); ``base`` itself if impossible."""
    key = (base, wrapped)
    cls = _CACHE.get(key)
    if cls is None:
        name = f"{base.__name__}{wrapped.__name__}"
        namespace = {
            "__module__": base.__module__,
            "__qualname__": name,
            "__doc__": f"{base.__name__} around a {wrapped.__qualname__}; made by {base.__name__}(module).",
            _BASE: base,
            _WRAPPED_CLASS: wrapped,
        }
        meta = type(base)
        if not issubclass(meta, type(wrapped)) and not issubclass(type(wrapped), meta):
            # The layer has its own metaclass: derive one from both (ABCMeta and it).
            meta = type(f"{meta.__name__}{type(wrapped).__name__}", (meta, type(wrapped)), {})
        try:
            cls = meta(name, (base, wrapped), namespace)
        except TypeError as error:  # a metaclass or instance-layout conflict
            warnings.warn(
                f"{base.__name__}: cannot make a class that is both {base.__name__} and "
                f"{wrapped.__qualname__} ({error}); the wrapper will not be an instance of "
                f"{wrapped.__qualname__}, so code that finds modules by class will not see it.",
                stacklevel=4,
            )
            cls = base
        _CACHE[key] = cls
    return cls


def class_recipe(cls: type) -> Any:
    """What to pickle instead of a specialised class: ``(base, recipe of wrapped class)``."""
    if _BASE in cls.__dict__:
        return (cls.__dict__[_BASE], class_recipe(cls.__dict__[_WRAPPED_CLASS]))
    return cls


def rebuild(recipe: Any) -> type:
    """The class a :func:`class_recipe` describes (made again through the cache)."""
    if isinstance(recipe, tuple):
        base, wrapped = recipe
        return specialised(base, rebuild(wrapped))
    return recipe


def new_wrapper(recipe: Any) -> Any:
    """An empty instance of the class ``recipe`` describes; unpickling fills its state."""
    return object.__new__(rebuild(recipe))


def forwards_attribute(wrapper: Any, name: str, value: Any, root: type) -> bool:
    """Whether setting ``name`` on ``wrapper`` (classes up to ``root``) is the wrapped module's."""
    from torch import nn

    if name.startswith("__") or name in wrapper.__dict__:
        return False  # Python's own (__class__, ...) or the wrapper's own attribute
    if isinstance(value, (nn.Parameter, nn.Module)) or any(
        name in wrapper.__dict__[d] for d in ("_parameters", "_buffers", "_modules")
    ):
        return False  # nn.Module files these in the dicts both share
    # What the wrapper classes declare (properties, methods) stays on the wrapper, and so do
    # new attributes (as in PyTorch); the layer's own attributes go to the layer.
    mro = type(wrapper).__mro__
    if any(name in cls.__dict__ for cls in mro[: mro.index(root) + 1]):
        return False
    wrapped = wrapper.__dict__["_checkpoint_wrapped_module"]
    return name in wrapped.__dict__ or hasattr(type(wrapped), name)


def strip_wrapped_prefix(state_dict: dict[str, Any], prefix: str, error_msgs: list[str]) -> None:
    """Rename ``{prefix}_checkpoint_wrapped_module.[...]name`` keys to ``{prefix}name``."""
    marked = prefix + _PREFIX
    for key in [k for k in state_dict if k.startswith(marked)]:
        rest = key[len(prefix) :]
        while rest.startswith(_PREFIX):  # nested PyTorch wrappers stack prefixes
            rest = rest[len(_PREFIX) :]
        clean = prefix + rest
        if clean in state_dict:
            error_msgs.append(
                f"state_dict has both {key!r} and {clean!r} for the same tensor of a wrapped "
                f"module; keep one of them."
            )
            continue
        state_dict[clean] = state_dict.pop(key)
