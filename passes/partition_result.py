"""The partitioner's decision, :class:`Partition`: plain data that the backend and diagnostics can print.

Example::

    >>> partition = Partition(saved=("relu",), recomputed=("add",), banned=(("mm", "expensive op"),),
    ...     offloaded=(), deferred=(), saved_bytes=1024, recompute_flops=256, memory_budget=1.0, regions={})
    >>> print(partition.summary())
    saved 1 values (1024 bytes), recomputed 1 nodes (256 FLOPs), budget 1.0
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegionPartition:
    """Figures of one checkpoint region (``ac_graph_id``)."""

    saved: tuple[str, ...]
    recomputed: tuple[str, ...]
    saved_bytes: int
    recompute_flops: int


@dataclass(frozen=True)
class Partition:
    """What to save and what to recompute, node names in graph order.

    ``saved`` lists every value the forward hands to the backward (tensors, SymInts and
    graph inputs); ``saved_bytes`` counts activations only (graph inputs are alive anyway;
    size hints stand in for symbolic sizes). ``banned`` pairs a forward value that may not
    be recomputed with the reason. ``offloaded`` values travel through CPU memory.
    ``deferred`` values feed only the backward and are computed there, once (not a recompute).
    ``why`` pairs each saved activation with the reason it is saved (a key of
    ``ckpt_compile.passes.saving.WHY``: boundary, policy, random, budget, needed by backward...).
    """

    saved: tuple[str, ...]
    recomputed: tuple[str, ...]
    banned: tuple[tuple[str, str], ...]
    offloaded: tuple[str, ...]
    deferred: tuple[str, ...]
    saved_bytes: int
    recompute_flops: int
    memory_budget: float
    regions: dict[int, RegionPartition]
    why: tuple[tuple[str, str], ...] = ()

    def summary(self) -> str:
        return (
            f"saved {len(self.saved)} values ({self.saved_bytes} bytes), recomputed "
            f"{len(self.recomputed)} nodes ({self.recompute_flops} FLOPs), budget {self.memory_budget}"
        )
