"""Measuring helpers shared by the eager tests: saved bytes, op counts, gradients."""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class SavedBytes:
    """Counts bytes autograd saves for backward (unique storages), via a saved-tensors hook."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def _pack(self, x: torch.Tensor):
        storage = x.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return x

    @contextlib.contextmanager
    def __call__(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x):
            yield self

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class OpCounter(TorchDispatchMode):
    """Counts aten operators (by overload packet name, e.g. "mm") run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def graph_size(out: torch.Tensor) -> int:
    """Number of autograd nodes reachable from ``out.grad_fn``."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return len(seen)


def grads_of(module: torch.nn.Module | None, *tensors: torch.Tensor) -> list[torch.Tensor]:
    out = [] if module is None else [p.grad.clone() for p in module.parameters() if p.grad is not None]
    return out + [t.grad.clone() for t in tensors if t.grad is not None]


def assert_all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs: max abs diff {(x - y).abs().max().item()}"


def mlp(width: int = 16, depth: int = 3, dropout: float = 0.0) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
        if dropout:
            layers.append(torch.nn.Dropout(dropout))
    return torch.nn.Sequential(*layers)
