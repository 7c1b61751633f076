"""What a recomputation must replay: RNG states, autocast state, the ``torch.device`` context.

Captured once when a checkpointed forward starts (:meth:`_ReplayState.capture`) and entered
around every recomputation (:meth:`_ReplayState.replay`), so that dropout draws the same
mask, autocast picks the same dtypes and factory functions the same device.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["DefaultDeviceType", "get_device_states", "set_device_states"]


class DefaultDeviceType:
    """The device type whose RNG state checkpointing saves when no input is on an accelerator.

    Defaults to the current accelerator's type (``"cuda"`` on a CUDA machine) and to
    ``"cpu"`` where there is none, as in PyTorch 2.13.

    >>> from ckpt_compile import DefaultDeviceType
    >>> DefaultDeviceType.get_device_type() in ("cpu", "cuda", "xpu", "mps")
    True
    """

    _default_device_type: str | None = None

    @staticmethod
    def set_device_type(device: str = "cuda") -> None:
        """Set the default device type for checkpointing (default ``"cuda"``)."""
        DefaultDeviceType._default_device_type = device

    @staticmethod
    def get_device_type() -> str:
        """The default device type for checkpointing."""
        if not DefaultDeviceType._default_device_type:
            acc = torch.accelerator.current_accelerator(True)
            DefaultDeviceType._default_device_type = acc.type if acc is not None else "cpu"
        return DefaultDeviceType._default_device_type


def _device_module(device_type: str):
    return getattr(torch, device_type)


def _accelerator_tensors(args: tuple) -> list[torch.Tensor]:
    # Fast path for the common flat case; pytree only when an argument is a container.
    if all(isinstance(a, torch.Tensor) or a is None or isinstance(a, (int, float, bool)) for a in args):
        leaves = args
    else:
        leaves = tree_leaves(args)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta")]


def _infer_device_type(tensors: list[torch.Tensor]) -> str:
    """CUDA wins, else the first accelerator seen, else :class:`DefaultDeviceType`."""
    if not tensors:
        return DefaultDeviceType.get_device_type()
    types = [t.device.type for t in tensors]
    distinct = set(types)
    if len(distinct) > 1:
        warnings.warn(
            "Tensor arguments, excluding CPU tensors, are detected on at least two types of "
            "devices. Device state will only be saved for devices of a single device type, "
            "and the remaining devices will be ignored. Consequently, if any checkpointed "
            "functions involve randomness, this may result in incorrect gradients. (Note that "
            "if CUDA devices are among the devices detected, it will be prioritized; otherwise, "
            f"the first device encountered will be selected.)\nDevice types: {sorted(distinct)} "
            f"first device type: {types[0]}",
            stacklevel=4,
        )
    return "cuda" if "cuda" in distinct else types[0]


def get_device_states(*args: Any) -> tuple[list[int], list[torch.Tensor]]:
    """The device ids of the accelerator tensors in ``args`` (nested containers included,
    one id per tensor) and the RNG state of each, as ``torch.utils.checkpoint.get_device_states``.

    CPU and meta tensors are skipped; the device type is inferred as checkpoint infers it
    (CUDA first, else the first accelerator seen, else :class:`DefaultDeviceType`).

    >>> import torch, ckpt_compile as cc
    >>> cc.get_device_states(torch.ones(2), [torch.zeros(1)])  # CPU only: nothing to stash
    ([], [])
    """
    tensors = _accelerator_tensors(args)
    ids = [t.get_device() for t in tensors]
    module = _device_module(_infer_device_type(tensors))
    states = []
    for device_id in ids:
        with module.device(device_id):
            states.append(module.get_rng_state())
    return ids, states


def set_device_states(devices: list[int], states: list[torch.Tensor], *, device_type: str | None = None) -> None:
    """Set the RNG state of each device id in ``devices`` to the matching entry of ``states``.

    ``device_type`` defaults to :meth:`DefaultDeviceType.get_device_type`; ``"meta"`` does
    nothing. Same contract as ``torch.utils.checkpoint.set_device_states``.

    >>> import torch, ckpt_compile as cc
    >>> cc.set_device_states([], [])  # no accelerator tensors were stashed
    """
    if device_type is None:
        device_type = DefaultDeviceType.get_device_type()
    if device_type == "meta":
        return
    module = _device_module(device_type)
    for device_id, state in zip(devices, states):
        with module.device(device_id):
            module.set_rng_state(state)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype, bool] | None:
    if not torch.amp.is_autocast_available(device_type):
        return None
    return (
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
        torch.is_autocast_cache_enabled(),
    )


def _current_device_context():
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext

    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, DeviceContext):
            return mode
    return None


class _ReplayState:
    """Everything a recomputation replays, captured at the start of a checkpointed forward."""

    __slots__ = (
        "device_type", "preserve_rng", "cpu_rng", "device_ids", "device_rngs",
        "autocast", "cpu_autocast", "device_ctx",
    )

    @classmethod
    def capture(cls, args: tuple, preserve_rng_state: bool) -> "_ReplayState":
        self = cls()
        accel = _accelerator_tensors(args)
        self.device_type = _infer_device_type(accel)
        self.preserve_rng = preserve_rng_state
        self.autocast = _autocast_state(self.device_type)
        self.cpu_autocast = _autocast_state("cpu")
        self.device_ctx = _current_device_context()
        self.cpu_rng = None
        self.device_ids: list[int] | None = None
        self.device_rngs: list[torch.Tensor] = []
        if preserve_rng_state:
            self.cpu_rng = torch.get_rng_state()
            # Never initialise an accelerator context by accident: its RNG state is stashed
            # only if it was initialised before the forward (as PyTorch does).
            module = _device_module(self.device_type) if self.device_type != "meta" else None
            if module is not None and getattr(module, "_initialized", False):
                self.device_ids = [t.get_device() for t in accel]
                for device_id in self.device_ids:
                    with module.device(device_id):
                        self.device_rngs.append(module.get_rng_state())
        return self

    def check_no_device_init_in_forward(self) -> None:
        """PyTorch's rule: an accelerator first initialised inside the region is an error."""
        if not self.preserve_rng or self.device_ids is not None or self.device_type == "meta":
            return
        if getattr(_device_module(self.device_type), "_initialized", False):
            raise RuntimeError(
                "PyTorch's device state was initialized in the forward pass "
                "of a Checkpoint, which is not allowed. Please open an issue "
                "if you need this feature."
            )

    @contextlib.contextmanager
    def replay(self, extra_context: Any = None) -> Iterator[None]:
        """Run the recomputation with the forward's RNG, autocast and device context."""
        with contextlib.ExitStack() as stack:
            if self.preserve_rng:
                stack.enter_context(self._rng_restored())
            states = [(self.device_type, self.autocast)]
            if self.device_type != "cpu":
                states.append(("cpu", self.cpu_autocast))
            for device_type, state in states:
                if state is None:
                    continue
                enabled, dtype, cache = state
                # Entering a disabled autocast is pure overhead unless the backward itself
                # runs under an enabled one, which must then be switched off.
                if enabled or torch.is_autocast_enabled(device_type):
                    stack.enter_context(
                        torch.amp.autocast(device_type, enabled=enabled, dtype=dtype, cache_enabled=cache)
                    )
            if self.device_ctx is not None:
                stack.enter_context(self.device_ctx)
            if extra_context is not None:
                stack.enter_context(extra_context)
            yield

    @contextlib.contextmanager
    def _rng_restored(self) -> Iterator[None]:
        # Fork: set the forward's states, restore the surrounding ones afterwards.
        outer_cpu = torch.get_rng_state()
        module = None
        outer_device: list[torch.Tensor] = []
        if self.device_ids:
            module = _device_module(self.device_type)
            for device_id in self.device_ids:
                with module.device(device_id):
                    outer_device.append(module.get_rng_state())
        torch.set_rng_state(self.cpu_rng)
        if module is not None:
            for device_id, state in zip(self.device_ids, self.device_rngs):
                with module.device(device_id):
                    module.set_rng_state(state)
        try:
            yield
        finally:
            torch.set_rng_state(outer_cpu)
            if module is not None:
                for device_id, state in zip(self.device_ids, outer_device):
                    with module.device(device_id):
                        module.set_rng_state(state)
