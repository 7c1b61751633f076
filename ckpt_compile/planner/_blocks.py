"""Which submodules ``cc.plan`` may checkpoint: ``blocks=`` checked and matched, or the repeated blocks."""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from torch import nn

__all__ = ["find_blocks"]


def find_blocks(model: nn.Module, blocks: Any) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the candidate blocks, in ``named_modules`` order."""
    if blocks is None:
        return _repeated_blocks(model)
    if isinstance(blocks, nn.Module):
        raise TypeError(
            f"ckpt_compile.plan(blocks=...): expected an nn.Module class, a tuple of classes or a predicate "
            f"module -> bool, got an instance of {type(blocks).__name__}; pass the class: blocks={type(blocks).__name__}"
        )
    if isinstance(blocks, (list, set, frozenset)):
        raise TypeError(
            f"ckpt_compile.plan(blocks=...): expected an nn.Module class, a tuple of classes or a predicate "
            f"module -> bool, got a {type(blocks).__name__}; pass a tuple: blocks=({', '.join(getattr(c, '__name__', repr(c)) for c in blocks)},)"
        )
    if isinstance(blocks, type) and issubclass(blocks, nn.Module):
        match: Callable[[nn.Module], bool] = lambda m: isinstance(m, blocks)  # noqa: E731
    elif isinstance(blocks, tuple) and blocks and all(isinstance(c, type) and issubclass(c, nn.Module) for c in blocks):
        match = lambda m: isinstance(m, blocks)  # noqa: E731
    elif callable(blocks) and not isinstance(blocks, type):
        match = blocks
    else:
        raise TypeError(
            f"ckpt_compile.plan(blocks=...): expected an nn.Module class, a tuple of classes or a "
            f"predicate module -> bool, got {blocks!r}"
        )
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(outer + ".") for outer, _ in found):
            continue
        if match(module):
            found.append((name, module))
    if not found:
        raise ValueError(f"ckpt_compile.plan(blocks={blocks!r}): no submodule of the {type(model).__name__} matches")
    return found


def _repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    best: list[tuple[str, nn.Module]] = []
    for name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.named_children())
        classes = Counter(type(child) for _, child in children)
        if not classes:
            continue
        cls, n = classes.most_common(1)[0]
        if n >= 2 and n > len(best):
            prefix = f"{name}." if name else ""
            best = [(prefix + child_name, child) for child_name, child in children if type(child) is cls]
    if not best:
        raise ValueError(
            f"ckpt_compile.plan: found no repeated blocks in the {type(model).__name__} (no nn.ModuleList or "
            f"nn.Sequential with two or more children of one class); pass blocks=<a class, a tuple of classes or a predicate>"
        )
    return best
