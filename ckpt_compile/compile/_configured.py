"""``cc.backend_with(**options)``: ``backend="ckpt"`` with its options checked where
they are written.

``torch.compile(model, backend="ckpt", options={...})`` hands the options to the backend
only at the first call of the compiled model (torch.compile checks no options itself);
``torch.compile(model, backend=cc.backend_with(...))`` reports a mistake on the line that
makes it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch.fx as fx

from ckpt_compile.compile._backend import backend
from ckpt_compile.compile._options import BackendOptions, BackendValueError

__all__ = ["backend_with"]


def backend_with(**options: Any) -> "ConfiguredBackend":
    """``backend="ckpt"`` with its options checked now, where they are written, rather
    than at the first call of the compiled model: a ``ValueError`` naming the bad option
    and the valid ones (a ``report`` path in a missing folder included).

    >>> import torch, ckpt_compile as cc
    >>> compiled = torch.compile(torch.nn.Linear(4, 4), backend=cc.backend_with(inner="eager"))
    >>> cc.backend_with(memory_budget=1)
    Traceback (most recent call last):
    ...
    ValueError: backend="ckpt": option memory_budget=1 is ambiguous: write 1.0 for all the activation bytes ...
    """
    return ConfiguredBackend(BackendOptions.from_mapping(options))


class ConfiguredBackend:
    """What :func:`backend_with` returns: ``backend`` with its options bound."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.__name__ = "ckpt"  # torch.compile names the backend after it

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *, options=None, mode=None):
        if options:
            raise BackendValueError(
                f"backend_with(...) already holds the options; torch.compile(options={options!r}) "
                "must be left out (or use backend=\"ckpt\" with options=)"
            )
        return backend(gm, example_inputs, options=self.options, mode=mode)

    def __eq__(self, other: object) -> bool:  # equal options: Dynamo reuses compiled code
        return isinstance(other, ConfiguredBackend) and other.options == self.options

    def __hash__(self) -> int:
        return hash(self.options)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        return f"backend_with({fields})"
