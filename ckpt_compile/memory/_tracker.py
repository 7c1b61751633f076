"""Follow every storage's bytes over a step: a ``TorchDispatchMode`` under ``FakeTensorMode``.

Each operator's outputs are looked up by storage (views and in-place results add nothing);
a new storage is counted with the category of the phase that made it, and a weak
reference takes its bytes off when it dies (torch keeps a storage's Python object alive as
long as the storage itself, so the callback fires when the memory would be freed). After
every operator the live total is one point of the timeline, so the peak is the largest sum
of live bytes at an operator boundary: inputs and outputs of that operator alive together,
which is what an allocator sees (op-internal scratch buffers are invisible to fake tensors;
the ones we model are listed in ``_estimate``).

Where the peak sits: forward hooks keep a stack of the running module's qualified names
(recomputation in backward runs them again), and each autograd node made under a module
carries that name in its ``metadata``, read back through
``torch._C._current_autograd_node()`` while backward runs it.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ckpt_compile.memory._step import CATEGORIES, TimelinePoint

__all__: list[str] = []

_INDEX = {name: i for i, name in enumerate(CATEGORIES)}
_MODULE_KEY = "ckpt_compile.memory.module"
_CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to 512 bytes


class _Tracker(TorchDispatchMode):
    """Live bytes per category; ``phase`` is set by the driver, categories follow it."""

    def __init__(self, names: dict[int, str], device: torch.device):
        super().__init__()
        self._names = names  # id(module) -> qualified name
        self._round = _CUDA_BLOCK if device.type == "cuda" else 1
        self._entries: dict[int, list] = {}  # id(storage) -> [bytes, category index, weakref]
        self.totals = [0] * len(CATEGORIES)
        self.phase: str | None = None
        self._stack: list[str | None] = []
        self._ops = 0
        self.timeline: list[TimelinePoint] = []
        self.peak = -1
        self.peak_point: TimelinePoint | None = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------ storages

    def _bytes(self, storage) -> int:
        n = storage.nbytes()
        return math.ceil(n / self._round) * self._round

    def adopt(self, tensor: torch.Tensor, category: str) -> None:
        """Count ``tensor``'s storage as ``category`` (moving it there if already counted)."""
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        entry = self._entries.get(id(storage))
        index = _INDEX[category]
        if entry is None:
            self._add(storage, index)
        elif entry[1] != index:
            self.totals[entry[1]] -= entry[0]
            self.totals[index] += entry[0]
            entry[1] = index

    def _add(self, storage, index: int) -> None:
        n = self._bytes(storage)
        key = id(storage)
        self._entries[key] = [n, index, weakref.ref(storage, functools.partial(self._free, key))]
        self.totals[index] += n

    def _free(self, key: int, _ref) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]

    def _track(self, tensor: torch.Tensor, index: int) -> None:
        storage = tensor.untyped_storage()
        entry = self._entries.get(id(storage))
        if entry is None:
            self._add(storage, index)
        elif (n := self._bytes(storage)) != entry[0]:  # resized in place
            self.totals[entry[1]] += n - entry[0]
            entry[0] = n

    # ------------------------------------------------------------ where

    def _module(self) -> str | None:
        for name in reversed(self._stack):
            if name is not None:
                return name
        node = torch._C._current_autograd_node()
        if node is not None:
            return node.metadata.get(_MODULE_KEY)
        return None

    def _pre(self, module, args):
        self._stack.append(self._names.get(id(module)))

    def _post(self, module, args, output):
        if self._stack:
            self._stack.pop()

    # ------------------------------------------------------------ timeline

    def sample(self) -> None:
        total = sum(self.totals)
        point = TimelinePoint(self._ops, self.phase, self._module(), tuple(self.totals))
        last = self.timeline[-1] if self.timeline else None
        if last is None or last.bytes != point.bytes or last.phase != point.phase:
            self.timeline.append(point)
        if total > self.peak:
            self.peak, self.peak_point = total, point

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._ops += 1
        index = _INDEX["temporary"] if self.phase in ("backward", "optimizer") else _INDEX["activations"]
        module = self._stack[-1] if self._stack and self.phase in ("forward", "loss") else None
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, index)
                if module is not None and t.grad_fn is not None:
                    t.grad_fn.metadata.setdefault(_MODULE_KEY, module)
        self.sample()
        return out

    def __enter__(self):
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._pre),
            nn.modules.module.register_module_forward_hook(self._post, always_call=True),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return super().__exit__(*exc)
