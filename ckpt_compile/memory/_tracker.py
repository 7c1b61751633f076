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
(recomputation in backward runs them again); for backward, as in torch's
``torch.utils.module_tracker``, a multi-grad hook on a module's outputs marks its backward
as started and one on its inputs as finished.

One allocation bypasses the dispatcher: ``torch.get_rng_state()``, which checkpoint
regions call to replay randomness (5056 bytes on CPU per region, alive until the region is
recomputed). While the tracker runs, ``torch.get_rng_state`` is wrapped to count it when
the step runs on the CPU (on CUDA the state lives in host memory, not on the device).
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
_CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to 512 bytes


def _cpu_conv_backward(args) -> int:
    # Measured with the profiler's memory timeline (torch 2.13, oneDNN): while CPU
    # convolution_backward computes the weight gradient it holds copies of grad_output,
    # input and weight reordered into oneDNN's blocked layouts, alive together with its
    # outputs. Its scratchpad (shape- and thread-dependent) is not modelled.
    grad_output, inputs, weight = args[0], args[1], args[2]
    if grad_output.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return 0
    return sum(t.numel() * t.element_size() for t in (grad_output, inputs, weight))


# Operator -> bytes of scratch memory it holds at its peak, beyond its inputs and outputs
# (what fake tensors cannot see).
_WORKSPACES = {torch.ops.aten.convolution_backward.default: _cpu_conv_backward}


class _Tracker(TorchDispatchMode):
    """Live bytes per category; ``phase`` is set by the driver, categories follow it."""

    def __init__(self, names: dict[int, str], device: torch.device):
        super().__init__()
        self._names = names  # id(module) -> qualified name
        self._round = _CUDA_BLOCK if device.type == "cuda" else 1
        self._entries: dict[int, list] = {}  # id(storage) -> [bytes, category index, weakref]
        self.totals = [0] * len(CATEGORIES)
        self.offsets = [0] * len(CATEGORIES)  # bytes the fake step does not hold (FSDP sharding)
        self._phase: str | None = None
        self._stack: list[str | None] = []
        self._ops = 0
        self.timeline: list[TimelinePoint] = []
        self.peak = -1
        self.peak_point: TimelinePoint | None = None
        self._handles: list[Any] = []
        self._backward: list[str] = []  # modules whose backward is running, innermost last
        self._grad_hooks: list[Any] = []
        self._made_loss: list[str] = []  # modules that returned the last scalar, innermost first
        self._count_rng = device.type == "cpu"
        self._get_rng_state = None

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

    @property
    def phase(self) -> str | None:
        return self._phase

    @phase.setter
    def phase(self, phase: str) -> None:
        self._phase = phase

    # ------------------------------------------------------------ where

    def _module(self) -> str | None:
        for name in reversed(self._stack):
            if name is not None:
                return name
        return self._backward[-1] if self._backward and self._phase == "backward" else None

    def _grad_hook(self, values, name: str, enter: bool) -> None:
        tensors = [t for t in tree_leaves(values) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not tensors or not torch.is_grad_enabled():
            return

        def hook(*_):
            if enter:
                self._backward.append(name)
            elif name in self._backward:
                del self._backward[len(self._backward) - 1 - self._backward[::-1].index(name)]

        self._grad_hooks.append(torch.autograd.graph.register_multi_grad_hook(tensors, hook))

    def _pre(self, module, args):
        name = self._names.get(id(module))
        self._stack.append(name)
        if name is not None and self._phase in ("forward", "loss"):
            self._grad_hook(args, name, enter=False)

    def _post(self, module, args, output):
        if self._stack:
            name = self._stack.pop()
            if name is not None and self._phase in ("forward", "loss"):
                self._grad_hook(output, name, enter=True)
                # Backward starts from the loss without computing a gradient for it, so
                # the hook above never fires for the modules that returned the loss.
                scalar = isinstance(output, torch.Tensor) and output.numel() == 1
                if scalar and self._made_loss and self._made_loss_ref() is output:
                    self._made_loss.append(name)
                elif scalar:
                    self._made_loss, self._made_loss_ref = [name], weakref.ref(output)

    def start_backward(self, loss: torch.Tensor) -> None:
        self._phase = "backward"
        if self._made_loss and self._made_loss_ref() is loss:
            self._backward.extend(reversed(self._made_loss))

    def _rng_state(self, *args, **kwargs):
        state = self._get_rng_state(*args, **kwargs)
        self._track(state, _INDEX["temporary"] if self.phase in ("backward", "optimizer") else _INDEX["activations"])
        return state

    # ------------------------------------------------------------ timeline

    def sample(self, scratch: int = 0) -> None:
        """One timeline point; ``scratch`` bytes of an operator's workspace count as temporary."""
        values = [t + o for t, o in zip(self.totals, self.offsets)]
        values[_INDEX["temporary"]] += scratch
        total = sum(values)
        point = TimelinePoint(self._ops, self.phase, self._module(), tuple(values))
        last = self.timeline[-1] if self.timeline else None
        if last is None or last.bytes != point.bytes or last.phase != point.phase:
            self.timeline.append(point)
        if total > self.peak:
            self.peak, self.peak_point = total, point

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._ops += 1
        index = _INDEX["temporary"] if self.phase in ("backward", "optimizer") else _INDEX["activations"]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, index)
        workspace = _WORKSPACES.get(func)
        self.sample(workspace(args) if workspace is not None else 0)
        return out

    def __enter__(self):
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._pre),
            nn.modules.module.register_module_forward_hook(self._post, always_call=True),
        ]
        if self._count_rng:
            self._get_rng_state, torch.get_rng_state = torch.get_rng_state, self._rng_state
        return super().__enter__()

    def __exit__(self, *exc):
        if self._get_rng_state is not None:
            torch.get_rng_state, self._get_rng_state = self._get_rng_state, None
        for handle in self._handles + self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        self._handles = []
        return super().__exit__(*exc)
