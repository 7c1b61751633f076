"""Saved-tensor hooks that park a module's activations in CPU memory until backward.

Private helper of :class:`ckpt_compile.wrappers.OffloadWrapper`. It differs from
``torch.autograd.graph.save_on_cpu(pin_memory=True)`` in two ways, both about not doing
needless work:

* tensors that share storage with the module's own parameters or buffers (for example the
  ``weight.t()`` view that ``nn.Linear`` saves) are kept by reference: they stay alive in
  the module anyway, so a CPU copy would only add a device-to-host transfer and host
  memory per step;
* tensors already on the CPU are kept as they are, and only CUDA tensors are staged in
  pinned memory (``save_on_cpu`` copies every saved tensor, CPU ones included, into a
  fresh pinned buffer).

>>> import torch
>>> lin = torch.nn.Linear(4, 4)
>>> x = torch.randn(2, 4, requires_grad=True)
>>> with offload_saved_tensors(lin) as stats:
...     y = lin(x).sin()
>>> stats.kept_module_tensors, stats.copied
(1, 0)
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import warnings
from collections.abc import Iterator

import torch
from torch import nn

__all__: list[str] = []


@dataclasses.dataclass
class OffloadStats:
    """What the pack hook did during one forward (read by tests and diagnostics)."""

    packed: int = 0  # every tensor autograd asked to save
    kept_module_tensors: int = 0  # parameters / buffers (or views of them) kept by reference
    copied: int = 0  # tensors moved from an accelerator to CPU memory
    pinned: int = 0  # of those, how many landed in pinned memory


def _storage_pointer(tensor: torch.Tensor) -> int | None:
    """Data pointer of the storage behind ``tensor``, or None where there is no plain one."""
    to_local = getattr(tensor, "to_local", None)
    if callable(to_local):  # a DTensor (FSDP2-sharded parameter): its local shard has the storage
        tensor = to_local()
    try:
        return tensor.untyped_storage().data_ptr() or None  # zero-size tensors alias nothing
    except (RuntimeError, NotImplementedError):
        # Tensor subclasses and sparse tensors may have no plain storage: treat them as
        # activations, the conservative choice.
        return None


def _module_storages(module: nn.Module) -> set[int]:
    """Data pointers of the storages behind ``module``'s parameters and buffers."""
    pointers = (_storage_pointer(t) for t in itertools.chain(module.parameters(), module.buffers()))
    return {p for p in pointers if p is not None}


def _shares_storage(tensor: torch.Tensor, pointers: set[int]) -> bool:
    pointer = _storage_pointer(tensor)
    return pointer is not None and pointer in pointers


@contextlib.contextmanager
def offload_saved_tensors(module: nn.Module, warn_on_cpu: bool = False) -> Iterator[OffloadStats]:
    """Within the block, tensors saved for backward live on the CPU.

    Each one comes back to its original device when backward unpacks it. Yields an
    :class:`OffloadStats` that counts what was kept, copied and pinned. ``warn_on_cpu``:
    warn when every activation was in host memory already (nothing to offload to).
    """
    stats = OffloadStats()
    module_storages = _module_storages(module)

    def pack(tensor: torch.Tensor) -> tuple[torch.device | None, torch.Tensor]:
        stats.packed += 1
        if _shares_storage(tensor, module_storages):
            stats.kept_module_tensors += 1
            return None, tensor
        if tensor.device.type == "cpu":
            return None, tensor
        stats.copied += 1
        if tensor.is_cuda and not tensor.is_sparse:
            # Pinned host memory makes the copy back in backward asynchronous.
            host = torch.empty(
                tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True
            )
            host.copy_(tensor)
            stats.pinned += 1
            return tensor.device, host
        return tensor.device, tensor.to("cpu")

    def unpack(packed: tuple[torch.device | None, torch.Tensor]) -> torch.Tensor:
        device, tensor = packed
        if device is None:
            return tensor
        return tensor.to(device, non_blocking=tensor.is_pinned())

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats
    if warn_on_cpu and stats.copied == 0 and stats.packed > stats.kept_module_tensors:
        # A CPU-only machine: it works but saves nothing (issue 22). Shown once per wrapped
        # class: the warnings registry drops a repeated message from the same line.
        warnings.warn(
            f"offload_wrapper({type(module).__name__}): every activation it saves is already on CPU, "
            f"so there is nothing to offload to; they are kept as they are. On a CPU-only machine, "
            f"checkpoint_wrapper is what saves memory.",
            UserWarning,
            stacklevel=1,
        )
