"""Options of the ``backend="ckpt"`` torch.compile backend, validated once.

``torch.compile(model, backend="ckpt", options={...})`` hands the dict to the backend as
its ``options=`` keyword; :meth:`BackendOptions.from_mapping` turns it into a frozen
dataclass at that boundary, so nothing downstream re-reads or re-checks a raw dict.

>>> BackendOptions.from_mapping({"memory_budget": 0.5, "inner": "eager"})
BackendOptions(memory_budget=0.5, inner='eager', report=False)
>>> BackendOptions.from_mapping({"budget": 0.5})
Traceback (most recent call last):
...
ValueError: backend="ckpt": unknown option 'budget'. Valid options: memory_budget (a fraction in (0, 1] of the no-checkpoint activation bytes, or bytes: '512MiB', '8GB' or an int; default 1.0), inner ('inductor' or 'eager', default 'inductor'), report (False, True, or a path to write JSON, default False).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Union

from torch._dynamo.exc import BackendCompilerFailed

from ckpt_compile._budget import MemoryBudget, parse_memory_budget

_INNER_CHOICES = ("inductor", "eager")

# One line per option, used verbatim in every validation error so a user sees all of them.
_VALID = (
    "memory_budget (a fraction in (0, 1] of the no-checkpoint activation bytes, or bytes: "
    "'512MiB', '8GB' or an int; default 1.0), "
    "inner ('inductor' or 'eager', default 'inductor'), "
    "report (False, True, or a path to write JSON, default False)"
)


class BackendValueError(BackendCompilerFailed, ValueError):
    """A user's mistake found by ``backend="ckpt"`` (bad options, an infeasible budget),
    raised so that ``torch.compile`` shows it as it is: our message on the first line, and
    ``except ValueError`` catches it.

    Dynamo wraps whatever a backend raises in ``BackendCompilerFailed`` ("backend='ckpt'
    raised: ...", not a ``ValueError``) but re-raises a ``BackendCompilerFailed`` untouched
    (``torch/_dynamo/output_graph.py``, ``call_user_compiler``); being both keeps
    ``except BackendCompilerFailed`` working too.
    """

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.backend_name = "ckpt"
        self.inner_exception = None
        self.first_useful_frame = None  # nothing of Dynamo's to strip: the traceback is ours


def _error(message: str) -> ValueError:
    return ValueError(f'backend="ckpt": {message}. Valid options: {_VALID}.')


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Validated options of ``backend="ckpt"``.

    - ``memory_budget``: what the partitioner may save for the backward, in activation
      bytes (graph inputs, so parameters, buffers and the model's inputs, never count): a
      float in (0, 1] is a fraction of what the same graph saves with no checkpointing
      (1.0 is the plain min-cut), a size (``"512MiB"``, ``"8GB"``) or an int >= 2 is bytes,
      per compiled graph (each graph of a model with graph breaks gets the whole budget).
      Spellings: :mod:`ckpt_compile._budget`. Stored as written in Python (the float, or
      the int of bytes), so options print and serialise as they were given.
    - ``inner``: ``"inductor"`` compiles the partitioned forward and backward with
      inductor; ``"eager"`` runs the partitioned FX graphs as they are.
    - ``report``: ``False``; ``True`` logs graph sizes and saved bytes on the
      ``"ckpt_compile"`` logger; a path (``str`` or ``os.PathLike``) writes them as JSON.
    """

    memory_budget: Union[float, int] = 1.0
    inner: str = "inductor"
    report: Union[bool, str] = False

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "BackendOptions":
        """Validate ``options`` (``None`` or a mapping) into a :class:`BackendOptions`."""
        if options is None:
            return cls()
        if isinstance(options, BackendOptions):
            return options
        if not isinstance(options, Mapping):
            raise _error(f"options must be a dict, got {type(options).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in fields:
                raise _error(f"unknown option {key!r}")
        values = dict(options)
        if "memory_budget" in values:
            values["memory_budget"] = _check_budget(values["memory_budget"])
        if "inner" in values and values["inner"] not in _INNER_CHOICES:
            raise _error(f"option 'inner' must be one of {_INNER_CHOICES}, got {values['inner']!r}")
        if "report" in values:
            values["report"] = _check_report(values["report"])
        return cls(**values)

    @property
    def budget(self) -> MemoryBudget:
        """``memory_budget`` parsed (a fraction or bytes)."""
        return parse_memory_budget(self.memory_budget)

    def fingerprint(self) -> str:
        """A stable string of the options that change compiled code (cache keys)."""
        return f"memory_budget={self.memory_budget!r};inner={self.inner}"


def _check_budget(value: Any) -> Union[float, int]:
    try:
        return parse_memory_budget(value, name="option memory_budget").value
    except (TypeError, ValueError) as e:
        raise _error(str(e)) from e


def _check_report(value: Any) -> Union[bool, str]:
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not path:
            raise _error("option 'report' got an empty path")
        _check_writable(path)
        return path
    raise _error(f"option 'report' must be a bool or a path, got {type(value).__name__} {value!r}")


def _check_writable(path: str) -> None:
    # Checked here, before the compile: a bad folder found only when the report is written
    # would cost the user a whole (possibly minutes-long) compile.
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise _error(f"option 'report' must be a file path (JSON is written there), got the folder {path!r}")
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise _error(f"option 'report' is {path!r}, but its folder {folder!r} {what}; "
                     "pass a file path in an existing folder")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise _error(f"option 'report' is {path!r}, which is not writable; pass a writable file path")
