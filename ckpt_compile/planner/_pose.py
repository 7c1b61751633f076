"""Pose: from what each choice saves (sets of storages) to the solver's :class:`Table`.
Knows no torch: storages are opaque hashable keys with a byte size.

A storage saved by two choices is one allocation, so totals are sizes of a *union* of
sets. The solver handles the union exactly where it matters in a chain of blocks:

* keys saved outside the blocks (embeddings, head) are always saved: ``base``;
* a key only one block can save is part of that option's bytes;
* a key two neighbouring blocks can save (block ``i``'s output that block ``i + 1`` saves
  as its input) is counted by both options and given back once through ``overlap``;
* a key that blocks further apart can save (a tensor handed to every block, such as an
  attention mask): when some block saves it under every option it is always saved and
  moves to ``base``; otherwise it also moves to ``base``, which can only over-estimate the
  bytes of a plan, never under-estimate them (:func:`union_bytes` gives the exact figure
  of the chosen plan afterwards).

>>> sizes = {"x": 4, "h": 8, "a": 16}
>>> table = pose(sizes, outside={"x"}, saved=[[{"x", "a", "h"}, {"x"}], [{"h"}, {"h"}]])
>>> table.base, table.options[0], table.overlap
(4, ((24, (0,)), (0, (0,))), (((8, 8), (0, 0)),))
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence, Set

from ._solve import Table

__all__ = ["pose", "always_saved", "union_bytes"]


def pose(
    sizes: Mapping[Hashable, int],
    outside: Set[Hashable],
    saved: Sequence[Sequence[Set[Hashable]]],
    costs: Sequence[Sequence[tuple[int, ...]]] | None = None,
) -> Table:
    """``saved[i][a]``: the keys option ``a`` of block ``i`` saves; ``costs[i][a]`` its
    cost (zeros when None)."""
    always = always_saved(outside, saved)
    base = sum(sizes[k] for k in always)
    options = []
    for i, per_block in enumerate(saved):
        row = []
        for a, keys in enumerate(per_block):
            cost = tuple(costs[i][a]) if costs is not None else (0,)
            row.append((sum(sizes[k] for k in keys - always), cost))
        options.append(tuple(row))
    overlap = []
    for i in range(len(saved) - 1):
        overlap.append(tuple(
            tuple(sum(sizes[k] for k in (here & there) - always) for there in saved[i + 1])
            for here in saved[i]
        ))
    return Table(base, tuple(options), tuple(overlap))


def always_saved(outside: Set[Hashable], saved: Sequence[Sequence[Set[Hashable]]]) -> set[Hashable]:
    """The keys :func:`pose` counts in ``base``: saved outside the blocks, or by blocks that
    are not neighbours."""
    where: dict[Hashable, set[int]] = {}
    for i, options in enumerate(saved):
        for keys in options:
            for key in keys - outside:
                where.setdefault(key, set()).add(i)
    always = set(outside)
    for key, blocks in where.items():
        if len(blocks) == 2 and max(blocks) - min(blocks) == 1:
            continue
        if len(blocks) > 1:
            always.add(key)  # see the module docstring: exact when some block always saves it
    return always


def union_bytes(sizes: Mapping[Hashable, int], outside: Set[Hashable], chosen: Sequence[Set[Hashable]]) -> int:
    """Exact bytes of the union of ``outside`` and the chosen options' keys."""
    keys = set(outside)
    for block in chosen:
        keys |= block
    return sum(sizes[k] for k in keys)
