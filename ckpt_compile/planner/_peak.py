"""Plan for a step's peak: pose the peak of every moment of the chain, solve, verify, tighten.

Pose: the fixed parts of the step (parameters, gradients, optimizer state, the loss and the
head, each block's own working set) come from ``cc.estimate_memory`` runs of the whole step
on fake tensors: one with no checkpoint, and one or two more in which the blocks of each
kind try the other options (:func:`pose_peaks`: identical blocks measured once). Each point of a run's timeline belongs to a block (the module running, in
forward, in backward or in a checkpointed block's recomputation) or lies between blocks,
when a known prefix of the chain holds its saved bytes (blocks whose forward ran, in the
forward; blocks whose backward has not started, in the backward; none in the optimizer
step). Less that prefix's saved bytes (the measured storage sets of ``_measure``) it gives
``within[k][option]`` or ``after[j]`` of :class:`~._solve_peak.PeakTable`. The model is exact when blocks do not interact beyond what they save; where they
do (a storage two neighbours share, a temporary that outlives a block), the plan's
estimate says so and the solver is run again under a budget lowered by the excess
(``_TIGHTEN`` times at most), so that a returned plan is never over its budget as
``cc.estimate_memory`` estimates it (:func:`_with_optimizer_of`: without re-running the
optimizer step, which no plan changes). Segments (one checkpoint over consecutive blocks,
``eager._segment``) are posed from the same figures as :class:`~._solve_peak.Span` items
(:func:`_spans`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ckpt_compile.memory import CATEGORIES

from ._measure import Measurement, wrap, wrap_segment
from ._pose import always_saved
from ._solve import Table
from ._solve_peak import PeakChoice, PeakTable, Span, prefixes, smallest_peak, solve_peak

__all__ = ["PeakResult", "plan_peak", "PeakInfeasible", "chosen_keys"]

_TIGHTEN = 6
# Whether plans may use segments (tests and benchmarks turn it off to compare).
_SEGMENTS = True


@dataclasses.dataclass(frozen=True)
class PeakResult:
    options: tuple[int, ...]
    estimate: Any  # the StepMemory of the applied plan
    segments: tuple[tuple[int, int], ...] = ()  # (first, last) block of each segment


class PeakInfeasible(ValueError):
    """No plan's step peak fits; ``smallest`` is the StepMemory of the lowest plan found."""

    def __init__(self, budget: int, smallest: Any, options: tuple[int, ...],
                 segments: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__(f"no plan peaks at most {budget} bytes; the smallest peak is {smallest.peak_bytes} bytes")
        self.budget = budget
        self.smallest = smallest
        self.options = options
        self.segments = segments


def wrapped(model: nn.Module, measured: Measurement, options: Sequence[int],
            segments: Sequence[tuple[int, int]] = ()) -> list[tuple[str, nn.Module]]:
    """(name, what replaces it) of each block that the plan runs otherwise than as it is:
    block ``k`` by option ``options[k]``, blocks ``first .. last`` as one segment."""
    blocks = measured.blocks
    out = []
    members = {k for first, last in segments for k in range(first, last + 1)}
    for first, last in segments:
        names = [blocks[k].name for k in range(first, last + 1)]
        out.extend(zip(names, wrap_segment([model.get_submodule(name) for name in names])))
    for k, (block, a) in enumerate(zip(blocks, options)):
        if k not in members and block.options[a].kind != "none":
            out.append((block.name, wrap(model.get_submodule(block.name), block.options[a])))
    return out


def chosen_keys(measured: Measurement, options: Sequence[int],
                segments: Sequence[tuple[int, int]] = ()) -> list[frozenset[int]]:
    """The storage keys each block saves under the plan (a segment's later blocks: not the
    input they chain from their predecessor)."""
    later = {k for first, last in segments for k in range(first + 1, last + 1)}
    return [b.saved[a] - b.chained if k in later else b.saved[a] for k, (b, a) in enumerate(zip(measured.blocks, options))]


@contextlib.contextmanager
def applied(model: nn.Module, measured: Measurement, options: Sequence[int],
            segments: Sequence[tuple[int, int]] = ()):
    """``model`` run as :func:`wrapped` says, put back as it was afterwards."""
    swapped = []
    try:
        for name, replacement in wrapped(model, measured, options, segments):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swapped.append((parent, child, getattr(parent, child)))
            setattr(parent, child, replacement)
        yield model
    finally:
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)


def plan_peak(model: nn.Module, measured: Measurement, table: Table, budget: int,
              estimate: Callable[..., Any], segments: bool = True, sharded: bool = False) -> PeakResult:
    """The cheapest per-block choice whose estimated step peak is <= ``budget``.
    ``estimate(model, with_optimizer=True)`` is ``cc.estimate_memory`` of one step of
    ``model`` as it is (without its optimizer step when False); ``segments``: whether
    consecutive blocks may share one checkpoint; ``sharded`` (FSDP2): check plans with
    whole estimates (its sharding moves bytes at the end of the backward)."""
    peaks, first = pose_peaks(model, measured, table, estimate, segments)
    target = budget
    # The plan's estimate: a step without the optimizer's, whose state and step do not
    # depend on the plan (about half of an estimate's time with AdamW), taken from the
    # first pose run (``_with_optimizer_of``): the same figures as ``estimate(model)``.
    tried: dict[tuple, Any] = {(tuple(0 for _ in measured.blocks), ()): first}

    def verify(plan) -> Any:
        if plan not in tried:
            with applied(model, measured, *plan):
                tried[plan] = estimate(model) if sharded else _with_optimizer_of(estimate(model, with_optimizer=False), first)
        return tried[plan]

    for _ in range(_TIGHTEN):
        choice = solve_peak(peaks, target)
        if choice is None:
            break
        step = verify((choice.options, choice.segments))
        if step.peak_bytes <= budget:
            return PeakResult(choice.options, step, choice.segments)
        target -= max(step.peak_bytes - budget, 1)
    lowest: PeakChoice = smallest_peak(peaks)
    verify((lowest.options, lowest.segments))
    (options, segments), step = min(tried.items(), key=lambda item: (item[1].peak_bytes, item[0]))
    raise PeakInfeasible(budget, step, options, segments)


def _with_optimizer_of(step: Any, first: Any) -> Any:
    """``step``, estimated without the optimizer step, as the estimate with it: the
    optimizer's state (``first.start_bytes - step.start_bytes``) alive throughout, then
    ``first``'s optimizer phase (what is alive then, parameters, gradients, state and the
    step's temporaries, does not depend on the plan), which begins where ``step`` ends.
    The peak is the first of the highest points, as the tracker keeps it (the optimizer
    phase's points keep ``first``'s operator counts, ``at``)."""
    state = first.start_bytes - step.start_bytes
    slot = CATEGORIES.index("optimizer_state")
    timeline = [point._replace(bytes=tuple(v + state if i == slot else v for i, v in enumerate(point.bytes)))
                for point in step.timeline]
    tail = [point for point in first.timeline if point.phase == "optimizer"]
    if tail and timeline and timeline[-1].bytes == tail[0].bytes:
        timeline.pop()  # the end of the backward, which the optimizer phase's first point is
    timeline += tail
    high = max(timeline, key=lambda point: point.total)  # max() keeps the first
    return dataclasses.replace(step, peak_bytes=high.total, start_bytes=first.start_bytes, peak_phase=high.phase,
                               peak_module=high.module, breakdown=dict(zip(CATEGORIES, high.bytes)),
                               timeline=tuple(timeline))


def pose_peaks(model: nn.Module, measured: Measurement, table: Table, estimate,
               segments: bool = True) -> tuple[PeakTable, Any]:
    """The :class:`PeakTable` of the module docstring, and the estimate of the step with no
    checkpoint (its first run, the only one that takes the optimizer step).

    Identical blocks are measured once: a block's peak under an option is its peak with no
    checkpoint (one run of the whole step, which also gives every moment between blocks)
    plus what the option adds to its working set (in forward, and in backward with its
    recomputation), the same for every block of its kind. Those differences come from as
    few extra runs as the options of a kind outnumber its blocks (usually one): each run
    gives every block of a kind another option.
    """
    blocks = measured.blocks
    n = len(blocks)
    index = {b.name: k for k, b in enumerate(blocks)}
    kinds: dict[tuple, list[int]] = {}
    for k, b in enumerate(blocks):
        kinds.setdefault((b.cls, b.options, b.recompute_flops, b.forward_flops), []).append(k)
    runs = [tuple(0 for _ in blocks)]
    extra = max((-(-(len(b.options) - 1) // len(ks)) for ks in kinds.values() for b in [blocks[ks[0]]]), default=0)
    for r in range(extra):
        options = [0] * n
        for ks in kinds.values():
            q = len(blocks[ks[0]].options) - 1
            for t, k in enumerate(ks):
                options[k] = 1 + (r * len(ks) + t) % q if q else 0
        runs.append(tuple(options))
    after: list[int | None] = [None] * (n + 1)
    # (forward, backward) residual of each block in each run
    per_run: list[list[list[int | None]]] = []
    # The optimizer's step and state do not depend on the plan: only the first run takes
    # the step (about half of an estimate's time with AdamW); the others count its state,
    # alive from start to end, as the difference of the start bytes.
    state_bytes = 0
    for r, options in enumerate(runs):
        with applied(model, measured, options):
            step = estimate(model, with_optimizer=r == 0)
        if r == 0:
            first = step
        else:
            state_bytes = first.start_bytes - step.start_bytes
        prefix = prefixes(table, options)
        residual: list[list[int | None]] = [[None, None] for _ in blocks]
        for k, j, backward, total in _moments(step.timeline, index, n):
            total += state_bytes
            if k is not None:
                value = total - prefix[k]
                old = residual[k][backward]
                residual[k][backward] = value if old is None else max(old, value)
            else:
                value = total - prefix[j]
                after[j] = value if after[j] is None else max(after[j], value)
        per_run.append(residual)
    # A moment no run saw (a block whose backward runs no op of its own) holds nothing extra.
    floor = min((v for v in after if v is not None), default=0)
    base = [[floor if v is None else v for v in row] for row in per_run[0]]
    # What option b adds to a kind's forward and backward peaks, the most any block showed.
    added: dict[tuple[int, int], list[int]] = {}
    for options, residual in zip(runs[1:], per_run[1:]):
        for kind, ks in enumerate(kinds.values()):
            for k in ks:
                got = [floor if v is None else v for v in residual[k]]
                delta = [got[0] - base[k][0], got[1] - base[k][1]]
                key = (kind, options[k])
                added[key] = [max(a, d) for a, d in zip(added.get(key, delta), delta)]
    # (forward, backward) peak of block k run by option b, less the prefix
    parts: list[list[tuple[int, int]]] = [[] for _ in blocks]
    for kind, ks in enumerate(kinds.values()):
        for k in ks:
            parts[k] = [(base[k][0] + added.get((kind, b), (0, 0))[0], base[k][1] + added.get((kind, b), (0, 0))[1])
                        for b in range(len(blocks[k].options))]
    after = [floor if v is None else v for v in after]
    within = tuple(tuple(max(f, b) for f, b in row) for row in parts)
    spans = _spans(measured, table, parts, after) if segments and _SEGMENTS else ()
    return PeakTable(table, within, tuple(after), spans), first


def _spans(measured: Measurement, table: Table, parts, after: list[int]) -> tuple[Span, ...]:
    """Every segment the chain allows: blocks ``i .. j`` each with a full checkpoint, each
    block after ``i`` fed by its predecessor's output (``BlockMeasure.chained``).

    A segment saves the first block's full-checkpoint set and, of each later block's, what
    is not its chained input. Its moments, above the prefix before it: block ``m``'s forward
    with the segment's saved bytes of the blocks before ``m``; and once its recomputation
    has begun (the last block's first unpack reruns them all), block ``m``'s recomputation
    and backward (the larger of its full-checkpoint and no-checkpoint backward figures) or
    the moment before it, with the whole segment's saved bytes and the no-checkpoint saved
    bytes of blocks ``i .. m - 1``, recomputed and waiting for their backward. Its cost: the
    last block's full-checkpoint recompute, and the whole forward of each block before it
    (whose output the next one needs)."""
    blocks = measured.blocks
    n = len(blocks)
    always = always_saved(measured.outside, [b.saved for b in blocks])
    sizes = measured.sizes

    def nbytes(keys) -> int:
        return sum(sizes[k] for k in keys if k not in always)

    full = [next((a for a, o in enumerate(b.options) if o.kind == "checkpoint" and o.policy is None), None) for b in blocks]
    spans = []
    for i in range(n):
        if full[i] is None:
            continue
        keys = set(blocks[i].saved[full[i]])
        shared = nbytes(keys & blocks[i].saved[0])  # the input the first block's own ops save too
        cost = table.options[i][full[i]][1]
        forward = parts[i][full[i]][0]
        # A block's full-checkpoint backward figure holds what it saves, counted in the
        # segment's saved bytes already.
        backward = max(parts[i][full[i]][1] - nbytes(keys), parts[i][0][1])
        recomputed = 0  # no-checkpoint saved bytes of blocks i .. j - 1
        for j in range(i + 1, n):
            if full[j] is None or not blocks[j].chained:
                break
            forward = max(forward, nbytes(keys) + parts[j][full[j]][0])
            recomputed += table.options[j - 1][0][0] - (table.overlap[j - 2][0][0] if j - 1 > i else 0)
            own = blocks[j].saved[full[j]] - blocks[j].chained
            here = max(after[j], parts[j][full[j]][1] - nbytes(own), parts[j][0][1])
            backward = max(backward, recomputed - shared + here)
            keys |= own
            # Block j - 1 now feeds block j: its recomputation runs to its end (a full
            # checkpoint stops at its last saved tensor, often before its last matmul).
            whole = (blocks[j - 1].forward_flops, *table.options[j - 1][full[j - 1]][1][1:])
            cost = tuple(x - y + z for x, y, z in zip(cost, table.options[j - 1][full[j - 1]][1], whole))
            cost = tuple(x + y for x, y in zip(cost, table.options[j][full[j]][1]))
            following = blocks[j + 1].saved if j + 1 < n else ()
            spans.append(Span(i, j, nbytes(keys), cost, max(forward, nbytes(keys) + backward), full[i],
                              tuple(nbytes(own & other) for other in following)))
    return tuple(spans)


def _moments(timeline, index: dict[str, int], n: int):
    """(block index or None, blocks holding saved bytes, in backward, live bytes) per
    timeline point."""
    done_forward = 0      # blocks whose forward has finished
    first_backward = n    # the lowest block whose backward has started
    for point in timeline:
        k = _block_of(point.module, index)
        if point.phase == "optimizer":
            yield None, 0, 1, point.total
        elif point.phase in ("forward", "loss", None):
            if k is not None:
                done_forward = max(done_forward, k + 1)
                yield k, k, 0, point.total
            else:
                yield None, done_forward, 0, point.total
        else:  # backward
            if k is not None:
                first_backward = min(first_backward, k)
                yield k, k, 1, point.total
            else:
                yield None, first_backward, 1, point.total


def _block_of(module: str | None, index: dict[str, int]) -> int | None:
    while module:
        if module in index:
            return index[module]
        module = module.rpartition(".")[0]
    return None
