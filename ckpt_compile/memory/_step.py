"""``StepMemory``: the memory of one training step as plain data.

"Memory" here is the *step peak*: the largest sum of live tensor bytes on the device at any
moment of the step, everything alive counted (parameters, buffers, gradients, optimizer
state, activations, temporaries). It is not the saved-activation figure of ``cc.explain`` or
the backend's ``memory_budget`` (bytes autograd keeps for backward).

>>> s = StepMemory(peak_bytes=3072, start_bytes=1024, peak_phase="backward", peak_module="fc",
...                breakdown={"parameters": 1024, "gradients": 1024, "optimizer_state": 0,
...                           "activations": 512, "temporary": 512},
...                timeline=(TimelinePoint(0, "forward", None, (1024, 0, 0, 0, 0)),),
...                source="example", device="cpu", unit="op")
>>> s.to_dict()["peak_bytes"], s.phase_peaks()
(3072, {'forward': 1024})
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from ckpt_compile.diagnostics._graph_stats import format_bytes

__all__ = ["StepMemory", "TimelinePoint", "CATEGORIES", "PHASES"]

# The breakdown's keys, in drawing order (bottom to top of the picture).
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporary")
PHASES = ("forward", "loss", "backward", "optimizer")


class TimelinePoint(NamedTuple):
    """Live bytes per category (in :data:`CATEGORIES` order) from ``at`` on.

    ``at`` counts operators for an estimate (``unit="op"``) and microseconds since the
    first event for a measurement (``unit="us"``)."""

    at: int
    phase: str | None
    module: str | None
    bytes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.bytes)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Peak of live tensor bytes during one training step, where it sits and what holds it.

    ``peak_bytes``: the step peak; ``start_bytes``: live bytes when the step starts
    (parameters, buffers, optimizer state, inputs); ``peak_phase``: ``"forward"``,
    ``"loss"``, ``"backward"`` or ``"optimizer"`` (None where the source cannot tell);
    ``peak_module``: qualified name of the innermost module running at the peak, or None;
    ``breakdown``: bytes per category at the peak (keys :data:`CATEGORIES`; inputs count as
    activations, buffers as parameters); ``timeline``: :class:`TimelinePoint` rows;
    ``source``: how the figures were obtained.
    """

    peak_bytes: int
    start_bytes: int
    peak_phase: str | None
    peak_module: str | None
    breakdown: dict[str, int]
    timeline: tuple[TimelinePoint, ...]
    source: str
    device: str
    unit: str = "op"

    def phase_peaks(self) -> dict[str, int]:
        """Highest live bytes seen in each phase, in step order."""
        peaks: dict[str, int] = {}
        for point in self.timeline:
            if point.phase is not None:
                peaks[point.phase] = max(peaks.get(point.phase, 0), point.total)
        return peaks

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (``json.dumps`` takes it as is)."""
        return {
            "kind": "step_memory",
            "peak_bytes": self.peak_bytes,
            "start_bytes": self.start_bytes,
            "peak_phase": self.peak_phase,
            "peak_module": self.peak_module,
            "breakdown": dict(self.breakdown),
            "phase_peaks": self.phase_peaks(),
            "source": self.source,
            "device": self.device,
            "unit": self.unit,
            "categories": list(CATEGORIES),
            "timeline": [[p.at, p.phase, p.module, list(p.bytes)] for p in self.timeline],
        }

    def summary(self) -> str:
        where = f" in {self.peak_phase}" if self.peak_phase else ""
        where += f" at {self.peak_module}" if self.peak_module else ""
        return f"step peak {format_bytes(self.peak_bytes)}{where} (start of step {format_bytes(self.start_bytes)})"

    def __str__(self) -> str:
        rows = [(name.replace("_", " "), self.breakdown.get(name, 0)) for name in CATEGORIES]
        rows.append(("total", self.peak_bytes))
        width = max(len(name) for name, _ in rows)
        lines = [f"{self.summary()}; {self.source}, {self.device}", f"  {'at the peak':<{width}}  bytes"]
        lines += [f"  {name:<{width}}  {format_bytes(value)}" for name, value in rows]
        peaks = self.phase_peaks()
        if peaks:
            lines.append("  phase peaks: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in peaks.items()))
        return "\n".join(lines)
