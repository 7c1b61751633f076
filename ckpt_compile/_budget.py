"""``memory_budget``: one meaning everywhere, parsed and validated here only.

The backend's options (``torch.compile(..., backend="ckpt", options={"memory_budget": b})``,
``cc.backend_with``, ``cc.explain(..., memory_budget=b)``), ``cc.plan(memory_budget=b)`` and
the CLI's ``--memory-budget`` all call :func:`parse_memory_budget`. A budget limits the
*activation* bytes saved for the backward: bytes the forward allocates and leaves alive
for the backward. Parameters, buffers and the model's inputs never count, wherever they
are saved (they are alive anyway).

Accepted spellings:

- a float in (0, 1]: that fraction of the activation bytes saved with no checkpointing;
- an int >= 2: bytes;
- a size string: a number, optional spaces, then a unit, case-insensitive: ``B``; decimal
  ``kB``/``KB``, ``MB``, ``GB``, ``TB`` (powers of 1000); binary ``KiB``, ``MiB``, ``GiB``,
  ``TiB`` (powers of 1024), e.g. ``"4GiB"``, ``"512MiB"``, ``"8GB"``, ``"1.5 GiB"``; at
  least 2 bytes, like an int, so that every budget reads back from its ``value``;
- a string of a bare number means the same as the number (``"0.5"``, ``"1048576"``): what
  a command line passes on.

The int ``0`` or ``1`` (and ``True`` / ``False``) is ambiguous (a fraction or bytes?) and is
a ``ValueError`` that says how to write either.

>>> parse_memory_budget(0.5)
MemoryBudget(fraction=0.5, nbytes=None)
>>> parse_memory_budget("1.5 GiB").nbytes == 3 * 2**29
True
>>> parse_memory_budget("8GB").bytes_of(no_checkpoint_bytes=10**12)
8000000000
>>> parse_memory_budget(1)
Traceback (most recent call last):
...
ValueError: memory_budget=1 is ambiguous: write 1.0 for all the activation bytes saved with no checkpointing, or a size such as '512MiB' for bytes
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

__all__ = ["MemoryBudget", "parse_memory_budget", "parse_size", "ACCEPTED", "SIZES_ACCEPTED"]

# Said in every error, so a user sees all the spellings at once.
ACCEPTED = (
    "a float in (0, 1] (a fraction of the activation bytes saved with no checkpointing), "
    "an int >= 2 (bytes), or a size such as '4GiB', '512MiB', '8GB', '1.5 GiB' "
    "(units B, kB/KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024)"
)

# A peak (``peak_memory``, ``--peak-memory``) is a size only: a fraction of what?
SIZES_ACCEPTED = (
    "an int >= 2 (bytes) or a size such as '8GiB', '512MiB', '8GB', '1.5 GiB' "
    "(units B, kB/KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024)"
)

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """A parsed ``memory_budget``: exactly one of ``fraction`` (in (0, 1]) and ``nbytes``
    (>= 2) is set."""

    fraction: float | None = None
    nbytes: int | None = None

    @property
    def value(self) -> float | int:
        """The budget as the user would write it in Python: the float or the int of bytes."""
        return self.fraction if self.fraction is not None else self.nbytes

    def bytes_of(self, no_checkpoint_bytes: int) -> int:
        """The budget in bytes, given the activation bytes saved with no checkpointing."""
        if self.fraction is not None:
            return math.floor(self.fraction * no_checkpoint_bytes)
        return self.nbytes

    def __str__(self) -> str:
        return repr(self.fraction) if self.fraction is not None else f"{self.nbytes} bytes"


def parse_memory_budget(value: Any, *, name: str = "memory_budget") -> MemoryBudget:
    """Validate ``value`` (spellings in the module docstring) into a :class:`MemoryBudget`.

    ``name`` is how the caller's user wrote the argument (``"memory_budget"``,
    ``"--memory-budget"``): errors start with it. Raises ``TypeError`` for a type that is
    never a budget, ``ValueError`` for a bad or ambiguous value; both say what was received
    and what is accepted.
    """
    if isinstance(value, MemoryBudget):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is ambiguous: a budget is not a flag; write {ACCEPTED}")
    if isinstance(value, int):
        return _from_int(value, name)
    if isinstance(value, float):
        return _from_float(value, name)
    if isinstance(value, str):
        return _from_str(value, name)
    raise TypeError(f"{name} must be {ACCEPTED}; got {type(value).__name__} {value!r}")


def _from_int(value: int, name: str) -> MemoryBudget:
    if value in (0, 1):
        what = ("1.0 for all the activation bytes saved with no checkpointing, or a size such as "
                "'512MiB' for bytes") if value == 1 else "a positive fraction such as 0.5, or a size such as '512MiB'"
        raise ValueError(f"{name}={value} is ambiguous: write {what}")
    if value < 0:
        raise ValueError(f"{name}={value}: a budget in bytes must be positive; write {ACCEPTED}")
    return MemoryBudget(nbytes=value)


def _from_float(value: float, name: str) -> MemoryBudget:
    if math.isfinite(value) and 0.0 < value <= 1.0:
        return MemoryBudget(fraction=value)
    hint = ""
    if math.isfinite(value) and value >= 2 and value.is_integer():
        hint = f" (for {int(value)} bytes pass the int {int(value)})"
    raise ValueError(f"{name}={value!r}: a float is a fraction and must be in (0, 1]{hint}; write {ACCEPTED}")


def _from_str(text: str, name: str) -> MemoryBudget:
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in _UNITS):
        raise ValueError(f"{name}={text!r} is not a budget; write {ACCEPTED}")
    number = match.group(1)
    if not unit:  # a bare number, as a command line passes it on
        is_int = re.fullmatch(r"[0-9]+", number) is not None
        return _from_int(int(number), name) if is_int else _from_float(float(number), name)
    nbytes = math.floor(float(number) * _UNITS[unit])
    if nbytes < 2:  # as for ints: the value must read back as bytes (an int 1 would not)
        raise ValueError(f"{name}={text!r} is under 2 bytes; write {ACCEPTED}")
    return MemoryBudget(nbytes=nbytes)


def parse_size(value: Any, *, name: str = "peak_memory") -> int:
    """Bytes of a size: an int >= 2 or a size string as for :func:`parse_memory_budget`
    (a bare number in a string is bytes). Fractions are refused: a peak is absolute.

    >>> parse_size("8GiB") == 8 * 2**30, parse_size(1_000_000)
    (True, 1000000)
    >>> parse_size(0.5)
    Traceback (most recent call last):
    ...
    ValueError: peak_memory=0.5: a peak is a size, not a fraction; write an int >= 2 (bytes) or a size such as '8GiB', '512MiB', '8GB', '1.5 GiB' (units B, kB/KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024)
    """
    if isinstance(value, (float, bool)) or (isinstance(value, str) and re.fullmatch(r"\s*[0-9]*\.[0-9]*\s*", value)):
        raise ValueError(f"{name}={value!r}: a peak is a size, not a fraction; write {SIZES_ACCEPTED}")
    if not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be {SIZES_ACCEPTED}; got {type(value).__name__} {value!r}")
    try:
        parsed = parse_memory_budget(value, name=name)
    except ValueError as e:
        raise ValueError(f"{name}={value!r} is not a size; write {SIZES_ACCEPTED}") from e
    if parsed.nbytes is None:
        raise ValueError(f"{name}={value!r}: a peak is a size, not a fraction; write {SIZES_ACCEPTED}")
    return parsed.nbytes
