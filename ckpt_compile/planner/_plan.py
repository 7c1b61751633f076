"""``plan()`` and the plan it returns: measure, pose, solve, then a frozen ``CheckpointPlan``
whose ``apply`` is a dumb loop over its rows.

>>> import torch, ckpt_compile as cc
>>> from torch import nn
>>> class MLP(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
...                                     for _ in range(4))
...     def forward(self, x):
...         for layer in self.layers:
...             x = x + layer(x)
...         return x
>>> model = MLP()
>>> x = torch.randn(32, 64)
>>> p = cc.plan(model, x, memory_budget=0.5)
>>> p.predicted_saved_bytes <= 0.5 * p.baseline_saved_bytes
True
>>> p.baseline_saved_bytes // 1024   # activations only: the weights the Linears save are alive anyway
280
>>> model = p.apply(model)          # in place; its forward now saves predicted_saved_bytes of activations
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ckpt_compile.eager._misuse import check_needs_grad
from ckpt_compile._budget import parse_memory_budget, parse_size

from ._blocks import find_blocks
from ._measure import Option, measure, options_for, wrap, wrap_segment
from ._peak import PeakInfeasible, chosen_keys, plan_peak
from ._pose import pose, union_bytes
from ._solve import Infeasible, solve

__all__ = ["plan", "CheckpointPlan", "BlockChoice"]


@dataclasses.dataclass(frozen=True)
class BlockChoice:
    """What the plan does with one block. ``saved_bytes``: the activation storages this
    block's choice saves (its input too when it saves it; a storage two blocks save appears in both rows
    but once in the plan's total); ``no_checkpoint_bytes``: the same without checkpointing."""

    name: str
    cls: str
    choice: str
    kind: str
    policy: str | None
    policy_args: tuple[str, ...]
    saved_bytes: int
    no_checkpoint_bytes: int
    recompute_flops: int
    forward_flops: int
    # A block of a segment (one checkpoint over consecutive blocks, planned for a peak):
    # the names of its first and last blocks; its choice reads "segment blocks.0-3".
    segment: tuple[str, str] | None = None

    @property
    def option(self) -> Option:
        return Option(self.choice, self.kind, self.policy, self.policy_args)


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """The per-block decision of :func:`ckpt_compile.plan`, as plain data.

    Bytes are *activation* bytes saved for the backward by one forward of the whole model:
    the distinct storages autograd saves (selective checkpointing's cache included), less
    the parameters, buffers and example inputs, however they are saved (a weight, its
    transpose), since those are alive whether or not anything is checkpointed, plus the
    CPU RNG state each checkpointed block stashes when the model runs on the CPU; bytes
    offloaded to CPU do not count (the budget is device memory). That is what a real
    forward leaves allocated for the backward beyond its own output (``torch.profiler``'s
    memory timeline; equal on the tests' models). ``budget_bytes`` is the budget in those
    bytes (None when planned for a peak). FLOPs are ``torch.utils.flop_counter``'s.

    Planned with ``peak_memory=``: ``predicted_peak_bytes`` is the step's peak of live
    device bytes (parameters, gradients, optimizer state, activations, temporaries) that
    ``cc.estimate_memory`` estimates for the applied plan, ``peak_phase`` / ``peak_module``
    where it sits and ``peak_breakdown`` what holds it there.
    """

    blocks: tuple[BlockChoice, ...]
    budget_bytes: int | None
    baseline_saved_bytes: int
    predicted_saved_bytes: int
    predicted_recompute_flops: int
    outside_saved_bytes: int
    forward_flops: int
    planning_seconds: float
    # Planned for a step peak (``peak_memory=``): the budget, the plan's step peak as
    # ``cc.estimate_memory`` estimates it, where it sits and what holds it. None otherwise.
    peak_budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    peak_phase: str | None = None
    peak_module: str | None = None
    peak_breakdown: dict[str, int] | None = None

    def apply(self, model: nn.Module) -> nn.Module:
        """Apply the plan to ``model`` in place (the model it was planned on, or one built the
        same way) and return it. Checkpointed blocks become ``CheckpointWrapper`` /
        ``OffloadWrapper`` in their parent (the blocks of a segment: ``CheckpointWrapper``
        s that share one checkpoint); parameter and state-dict names do not change."""
        for row in self.blocks:
            try:
                module = model.get_submodule(row.name)
            except AttributeError as e:
                raise ValueError(f"CheckpointPlan.apply: the model has no submodule {row.name!r}; apply a plan to the model it was planned for") from e
            from ckpt_compile.modules.wrappers import ActivationWrapper

            if isinstance(module, ActivationWrapper):
                raise ValueError(f"CheckpointPlan.apply: {row.name!r} is already a {type(module).__name__}; apply a plan once, to an unwrapped model")
            if type(module).__name__ != row.cls:
                raise ValueError(f"CheckpointPlan.apply: {row.name!r} is a {type(module).__name__}, the plan was made for a {row.cls}")
        replacements = []
        for row in self.blocks:
            if row.segment is not None:
                if row.name == row.segment[0]:
                    names = [r.name for r in self.blocks if r.segment == row.segment]
                    replacements.extend(zip(names, wrap_segment([model.get_submodule(n) for n in names])))
            elif row.kind != "none":
                replacements.append((row.name, wrap(model.get_submodule(row.name), row.option)))
        for name, replacement in replacements:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replacement)
        return model

    def summary(self) -> str:
        from ckpt_compile.diagnostics._graph_stats import format_bytes

        counts = Counter(row.choice for row in self.blocks)
        mix = ", ".join(f"{choice} x{n}" for choice, n in counts.most_common())
        share = self.predicted_recompute_flops / self.forward_flops if self.forward_flops else 0.0
        saved = f"saved {format_bytes(self.baseline_saved_bytes)} -> {format_bytes(self.predicted_saved_bytes)}"
        if self.peak_budget_bytes is None:
            fit = f"{saved} (budget {format_bytes(self.budget_bytes)})"
        else:
            where = _where(self.peak_phase, self.peak_module)
            fit = (f"step peak {format_bytes(self.predicted_peak_bytes)} (budget {format_bytes(self.peak_budget_bytes)}, "
                   f"estimated, at the {where}), {saved}")
        return (
            f"{fit}, +{share:.0%} of the forward's FLOPs recomputed: {mix} "
            f"(the fewest recompute FLOPs of all {'per-block choices and segments' if self.peak_budget_bytes is not None else 'per-block choices'} "
            f"that fit, planned in {self.planning_seconds:.2f} s)"
        )

    def _peak_lines(self) -> list[str]:
        from ckpt_compile.diagnostics._graph_stats import format_bytes

        if self.peak_breakdown is None:
            return []
        held = " + ".join(f"{name.replace('_', ' ')} {format_bytes(b)}" for name, b in self.peak_breakdown.items() if b)
        where = _where(self.peak_phase, self.peak_module)
        return [f"step peak {format_bytes(self.predicted_peak_bytes)} at the {where}: {held}"]

    def __str__(self) -> str:
        from ckpt_compile.diagnostics._graph_stats import format_bytes

        header = ("block", "class", "choice", "saved", "no checkpoint", "recompute FLOPs")
        rows = [(r.name, r.cls, r.choice, format_bytes(r.saved_bytes), format_bytes(r.no_checkpoint_bytes),
                 f"{r.recompute_flops:,}") for r in self.blocks]
        rows.append(("(outside blocks)", "", "", format_bytes(self.outside_saved_bytes), format_bytes(self.outside_saved_bytes), "0"))
        rows.append(("total", "", "", format_bytes(self.predicted_saved_bytes), format_bytes(self.baseline_saved_bytes),
                     f"{self.predicted_recompute_flops:,}"))
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(v).ljust(w) if i < 3 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
                 for row in [header, *rows]]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines + self._peak_lines() + [self.summary()])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: every field, blocks as a list of dicts, and ``summary``."""
        out = dataclasses.asdict(self)
        for row in out["blocks"]:
            row["policy_args"] = list(row["policy_args"])
        out["summary"] = self.summary()
        return json.loads(json.dumps(out))


def plan(model: nn.Module, *example_inputs: Any, memory_budget: float | int | str | None = None,
         peak_memory: int | str | None = None, optimizer: Any = None, loss_fn: Callable | None = None,
         world_size: int = 1, blocks: Any = None, **example_kwargs: Any) -> CheckpointPlan:
    """The checkpoint plan with the fewest recompute FLOPs that fits ``memory_budget`` (saved
    activations) or ``peak_memory`` (the training step's peak), for
    ``model(*example_inputs, **example_kwargs)``. Give exactly one of the two.

    Args:
        model: the model; measured on fake tensors (no real compute; parameters may live on
            ``device="meta"``). Unchanged: call ``.apply(model)`` on the returned plan.
        memory_budget: the activation bytes the plan may save for the backward (parameters,
            buffers and inputs never count), as everywhere in this package: a float in
            (0, 1] is that fraction of what the model saves with no checkpointing; a size
            such as ``"4GiB"``, ``"512MiB"``, ``"8GB"`` (binary and decimal units as
            written) or an int >= 2 is bytes. ``0`` and ``1`` are ambiguous: a
            ``ValueError`` says to write ``1.0`` or a size.
        peak_memory: the peak of live device bytes one steady-state training step may
            reach (parameters, gradients, optimizer state, activations, temporaries), as
            ``cc.estimate_memory`` estimates it and ``cc.measure_memory`` measures it: a
            size (``"8GiB"``) or an int of bytes.
        optimizer, loss_fn, world_size: the step ``peak_memory`` is about, as for
            ``cc.estimate_memory`` (an optimizer class or a callable ``params ->
            optimizer``; None: no optimizer step). Only with ``peak_memory``.
        blocks: the submodules that may be checkpointed: an ``nn.Module`` class, a tuple of
            classes, or a predicate ``module -> bool`` (outermost matches only). Default: the
            repeated blocks, the same-class children of the model's largest
            ``nn.ModuleList`` / ``nn.Sequential``.

    Per block the plan chooses no checkpoint, full checkpoint, a selective policy
    (``policies.save_matmuls``, ``save_matmuls_without_batch_dims``, and
    ``save_only_these_names`` for names the block marks with ``cc.checkpoint_name``), or,
    for models on an accelerator, CPU offload: 0 device bytes (the budget is device memory;
    what the block saves waits in host memory) and no recompute, but its transfers are
    costed as FLOPs (``_OFFLOAD_FLOPS_PER_BYTE``), so the solver picks it only where
    recomputation cannot reach the budget. The choice is exact: a dynamic programme over
    the blocks minimising (recompute FLOPs, recomputed elementwise outputs) subject to total
    saved bytes <= budget, bytes outside the blocks (embeddings, head) included. For a
    peak, the constraint holds at every moment of the step (``_solve_peak``: the forward
    of each block, the loss and the start of the backward, each block's backward and
    recomputation with the saved bytes of the blocks before it, the optimizer step), and
    the chosen plan is verified with ``cc.estimate_memory`` (re-solved under a tighter
    budget while over), so its estimated peak never exceeds ``peak_memory``. For a peak the
    plan may also put consecutive blocks in one segment: one checkpoint over them that saves
    the first block's inputs only and, in backward, recomputes them all at once (each block
    after the first must take the previous block's output as it is; ``str(plan)`` shows
    ``segment blocks.0-3`` on each of its rows, ``BlockChoice.segment`` names its first and
    last blocks). A segment recomputes at least what full checkpointing of its blocks
    does, so it is chosen only where nothing cheaper fits. None with ``world_size > 1``
    (FSDP2 reshards a block's parameters after its forward; a segment reruns earlier blocks
    inside a later one's backward) or with ``memory_budget``.

    Hugging Face models: pass ``use_cache=False`` (or set it in the config), as for any
    checkpointing: a KV cache changes between the calls the planner measures.

    Raises:
        TypeError / ValueError: a missing, bad or ambiguous budget, both budgets, a bad
            ``blocks``, or blocks that match nothing; ``ValueError`` naming the smallest
            feasible budget when none fits (for a peak: what holds it); ``ValueError`` when
            nothing requires grad, or when the model fails on the example inputs (naming
            their dtypes, shapes and devices; the model's error is chained).
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"ckpt_compile.plan(model, ...): model must be an nn.Module, got {type(model).__name__}")
    if (memory_budget is None) == (peak_memory is None):
        got = "both" if memory_budget is not None else "neither"
        raise TypeError(
            f"ckpt_compile.plan(model, *example_inputs, memory_budget=... | peak_memory=...): give exactly one, got {got}: "
            f"memory_budget limits the saved activations (a fraction such as 0.5 of what the model saves with no "
            f"checkpointing, or a size such as '4GiB'); peak_memory limits the training step's peak (a size such as '8GiB')")
    if peak_memory is None and (optimizer is not None or loss_fn is not None or world_size != 1):
        raise TypeError("ckpt_compile.plan: optimizer, loss_fn and world_size describe the training step of "
                        "peak_memory=...; memory_budget counts saved activations only and takes none of them")
    try:
        if peak_memory is not None:
            peak_budget = parse_size(peak_memory, name="peak_memory")
        else:
            parsed = parse_memory_budget(memory_budget)
    except (TypeError, ValueError) as e:
        raise type(e)(f"ckpt_compile.plan: {e}") from e
    check_needs_grad("ckpt_compile.plan", model, example_inputs, example_kwargs)
    found = find_blocks(model, blocks)
    offload = _on_accelerator(model, example_inputs, example_kwargs)
    measured = measure(model, example_inputs, example_kwargs, found, lambda names: options_for(names, offload))
    saved = [b.saved for b in measured.blocks]
    costs = [[_cost(b, a, measured.sizes, measured.outside) for a in range(len(b.options))] for b in measured.blocks]
    table = pose(measured.sizes, measured.outside, saved, costs)
    baseline = union_bytes(measured.sizes, measured.outside, [s[0] for s in saved])
    peak_fields: dict[str, Any] = {}
    if peak_memory is not None:
        from ckpt_compile.memory import estimate_memory

        def estimate(m: nn.Module, with_optimizer: bool = True):
            return estimate_memory(m, *example_inputs, optimizer=optimizer if with_optimizer else None,
                                   loss_fn=loss_fn, world_size=world_size, **example_kwargs)

        try:
            # No segments under FSDP2: it reshards a block's parameters after its forward,
            # and a segment's recomputation reruns earlier blocks inside a later one's backward.
            result = plan_peak(model, measured, table, peak_budget, estimate, segments=world_size == 1,
                               sharded=world_size > 1)
        except PeakInfeasible as e:
            raise ValueError(_infeasible_peak_message(peak_memory, peak_budget, e, measured, optimizer)) from None
        options, segments, budget, step = result.options, result.segments, None, result.estimate
        peak_fields = dict(peak_budget_bytes=peak_budget, predicted_peak_bytes=step.peak_bytes,
                           peak_phase=step.peak_phase, peak_module=step.peak_module,
                           peak_breakdown=dict(step.breakdown))
    else:
        budget, segments = parsed.bytes_of(baseline), ()
        try:
            options = solve(table, budget).options
        except Infeasible as e:
            raise ValueError(
                f"ckpt_compile.plan: memory_budget={memory_budget!r} allows {budget} bytes of activations, but no "
                f"plan saves that little; the smallest feasible budget is {e.smallest} bytes "
                f"({e.smallest / max(baseline, 1):.4f} of the {baseline} activation bytes saved with no checkpointing)"
            ) from None
    outside = measured.outside
    chosen = chosen_keys(measured, options, segments)
    names = [b.name for b in measured.blocks]
    spans = {k: (names[first], names[last]) for first, last in segments for k in range(first, last + 1)}
    rows = tuple(
        BlockChoice(
            name=b.name, cls=b.cls, choice=_segment_label(*spans[k]) if k in spans else b.options[a].label,
            kind=b.options[a].kind, policy=b.options[a].policy, policy_args=b.options[a].policy_args,
            saved_bytes=sum(measured.sizes[key] for key in keys - outside),
            no_checkpoint_bytes=sum(measured.sizes[key] for key in b.saved[0] - outside),
            # A segment's blocks but its last rerun their whole forward (the next one needs the output).
            recompute_flops=b.forward_flops if k in spans and b.name != spans[k][1] else b.recompute_flops[a],
            forward_flops=b.forward_flops, segment=spans.get(k),
        )
        for k, (b, a, keys) in enumerate(zip(measured.blocks, options, chosen))
    )
    return CheckpointPlan(
        blocks=rows,
        budget_bytes=budget,
        baseline_saved_bytes=baseline,
        predicted_saved_bytes=union_bytes(measured.sizes, outside, chosen),
        predicted_recompute_flops=sum(r.recompute_flops for r in rows),
        outside_saved_bytes=sum(measured.sizes[k] for k in outside),
        forward_flops=measured.forward_flops,
        planning_seconds=time.perf_counter() - start,
        **peak_fields,
    )


def _segment_label(first: str, last: str) -> str:
    """"segment blocks.0-3" for the segment of blocks.0 .. blocks.3."""
    prefix, _, rest = last.rpartition(".")
    if prefix and first.startswith(prefix + "."):
        return f"segment {first}-{rest}"
    return f"segment {first}-{last}"


def _where(phase: str | None, module: str | None) -> str:
    """Where a peak sits, as the step reads: "backward in blocks.0", "start of the backward"."""
    if module:
        return f"{phase} in {module}"
    return "start of the backward" if phase == "backward" else str(phase)


def _infeasible_peak_message(peak_memory, budget: int, e: PeakInfeasible, measured, optimizer) -> str:
    """What the smallest peak is, what holds it that no block choice changes, what to do."""
    from ckpt_compile.diagnostics._graph_stats import format_bytes

    step = e.smallest
    parts = step.breakdown
    state = f"{getattr(optimizer, '__name__', None) or getattr(getattr(optimizer, 'func', None), '__name__', 'optimizer')} state"
    fixed = [f"parameters {format_bytes(parts['parameters'])}"]
    if parts["gradients"]:
        fixed.append(f"gradients {format_bytes(parts['gradients'])}")
    if parts["optimizer_state"]:
        fixed.append(f"{state} {format_bytes(parts['optimizer_state'])}")
    names = {b.name for b in measured.blocks}
    module = step.peak_module
    in_block = module is not None and any(module == n or module.startswith(n + ".") for n in names)
    where = _where(step.peak_phase, module)
    moving = parts["activations"] + parts["temporary"]
    if in_block:
        held = f"activations and temporaries {format_bytes(moving)} inside block {module} (its own working set)"
    elif step.peak_phase in ("loss", "backward"):
        keys = set().union(*chosen_keys(measured, e.options, e.segments)) - measured.outside
        by_blocks = min(sum(measured.sizes[k] for k in keys), moving)
        held = (f"the blocks' saved activations at their least {format_bytes(by_blocks)} + the loss and the head "
                f"{format_bytes(moving - by_blocks)} (logits, their gradient, what the head saves)")
    else:
        held = f"activations and temporaries {format_bytes(moving)}"
    blocks = measured.blocks
    starts = dict(e.segments)
    inside = {k for first, last in e.segments for k in range(first + 1, last + 1)}
    chosen = ", ".join(_segment_label(b.name, blocks[starts[k]].name) if k in starts else f"{b.name}: {b.options[a].label}"
                       for k, (b, a) in enumerate(zip(blocks, e.options)) if k not in inside)
    return (
        f"ckpt_compile.plan: peak_memory={peak_memory!r} ({format_bytes(budget)}) is below the smallest feasible step "
        f"peak, {format_bytes(step.peak_bytes)} ({step.peak_bytes} bytes, estimated by cc.estimate_memory, with {chosen}), "
        f"held at the {where} by {' + '.join(fixed)} + {held}, which no checkpoint choice lowers. "
        f"To go lower: a smaller batch or sequence, a chunked loss (when the peak sits in the loss or the head), "
        f"sharding (FSDP2: world_size=N), a lighter optimizer state, or lower-precision parameters"
    )


# CPU offload recomputes nothing but moves every byte it saves twice over the host link.
# Its cost is counted as FLOPs at this many per byte moved (an accelerator doing ~400
# TFLOP/s beside a ~25 GB/s host link: 16,000), so offload wins only when recompute
# would cost more, usually only when nothing else fits the budget.
_OFFLOAD_FLOPS_PER_BYTE = 16_000


def _cost(block, a: int, sizes: dict[int, int], outside: frozenset[int]) -> tuple[int, int]:
    """(recompute FLOPs, recomputed elementwise outputs): what the solver minimises."""
    if block.options[a].kind == "offload":
        moved = 2 * sum(sizes[k] for k in block.saved[0] - outside)  # about: parameters stay
        return (moved * _OFFLOAD_FLOPS_PER_BYTE, 0)
    return (block.recompute_flops[a], block.recompute_elements[a])


def _on_accelerator(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Offload is an option only where device memory is not host memory."""
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    tensors += list(model.parameters())[:1]
    return any(t.device.type not in ("cpu", "meta") for t in tensors)
