"""Measure: what each block saves and recomputes under each option, on fake tensors.

One forward of the whole model runs under ``FakeTensorMode`` (no real compute; a model
whose parameters live on ``device="meta"`` works too). A pack hook records every storage
autograd saves (the figure :func:`ckpt_compile.saved_tensor_bytes` measures on a real
step); storages saved outside the candidate blocks (embeddings, head) are the part of the
model no plan changes; only activations cost bytes (parameters, buffers, inputs weigh 0; a CPU
checkpoint adds its stashed RNG state). At each block, after its real call, it runs once more
per option (no checkpoint, full checkpoint, each selective policy, CPU offload) on the same
inputs, through the very wrappers ``CheckpointPlan.apply`` installs; each run records the
storages it saves (selective checkpointing's cache included) and, with a backward, its
forward + backward FLOPs. Recompute FLOPs of an option are its total minus the total with
no checkpoint (``torch.utils.flop_counter``; elementwise ops count 0 FLOPs there, so the
outputs they recompute are counted separately as a tie-breaker).

Storages are keyed so that the same tensor has the same key in every run: a block's
output in an option run takes the key of the real call's output, inputs and parameters
are the very same (fake) tensors.

May import: torch, ``ckpt_compile.eager`` (the selective cache), ``ckpt_compile.modules``
(the wrappers) and ``ckpt_compile.policies``.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from ckpt_compile import policies
from ckpt_compile.eager._misuse import model_call_error

from ._count import _Counter

__all__ = ["Option", "BlockMeasure", "Measurement", "measure", "options_for", "wrap", "wrap_segment"]


# Option kinds, and the policies an option may name (each to the policy it builds from its arguments).
KINDS = ("none", "checkpoint", "offload")
_POLICIES: dict[str, Callable[..., Callable]] = {
    "save_matmuls": lambda: policies.save_matmuls,
    "save_matmuls_without_batch_dims": lambda: policies.save_matmuls_without_batch_dims,
    "save_only_these_names": lambda *names: policies.save_only_these_names(*names),
}


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to run a block: ``kind`` is one of :data:`KINDS`; a checkpoint with
    ``policy`` set is selective: the ``ckpt_compile.policies`` function of that name (a key
    of ``_POLICIES``), called with ``policy_args`` if any (``save_only_these_names("attn")``).
    A misspelt kind or policy is an error when the option is made."""

    label: str
    kind: str
    policy: str | None = None
    policy_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"planner Option {self.label!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.policy is not None and (self.kind != "checkpoint" or self.policy not in _POLICIES):
            raise ValueError(
                f"planner Option {self.label!r}: policy must be None or, with kind 'checkpoint', one of "
                f"{sorted(_POLICIES)}; got policy={self.policy!r} with kind={self.kind!r}"
            )

    def selective_policy(self) -> Callable:  # the policy function (``policy`` must be set)
        return _POLICIES[self.policy](*self.policy_args)


NONE = Option("none", "none")
FULL = Option("full", "checkpoint")
OFFLOAD = Option("offload", "offload")
# The selective save sets worth trying on every block: all matmul/conv/attention outputs,
# and only the plain matmuls (attention outputs, typically the largest, recomputed).
SELECTIVE = (
    Option("save_matmuls", "checkpoint", "save_matmuls"),
    Option("save_matmuls_without_batch_dims", "checkpoint", "save_matmuls_without_batch_dims"),
)


@dataclasses.dataclass(frozen=True)
class BlockMeasure:
    """Per option of one block: the storage keys it saves, recompute FLOPs and the
    outputs of elementwise ops it recomputes."""

    name: str
    cls: str
    options: tuple[Option, ...]
    saved: tuple[frozenset[int], ...]
    recompute_flops: tuple[int, ...]
    recompute_elements: tuple[int, ...]
    forward_flops: int
    # The storage keys of the inputs that are, by identity, what the block called just
    # before it returned (``x = block(x)`` in the parent's loop): a segment recomputes them.
    chained: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class Measurement:
    sizes: dict[int, int]  # storage key -> activation bytes (0: parameters, buffers, inputs)
    outside: frozenset[int]
    blocks: tuple[BlockMeasure, ...]
    forward_flops: int


def options_for(names: tuple[str, ...], offload: bool) -> tuple[Option, ...]:
    """The options tried on a block that marks ``names`` with ``cc.checkpoint_name``."""
    options = [NONE, FULL, *SELECTIVE]
    if names:
        options.append(Option("save_names(" + ",".join(names) + ")", "checkpoint", "save_only_these_names", names))
        if len(names) > 1:
            options.extend(Option(f"save_names({n})", "checkpoint", "save_only_these_names", (n,)) for n in names)
    if offload:
        options.append(OFFLOAD)
    return tuple(options)


def wrap(module: nn.Module, option: Option) -> nn.Module:
    """``module`` as the option runs it (the module itself for ``"none"``)."""
    from ckpt_compile.modules.wrappers import checkpoint_wrapper, offload_wrapper

    if option.kind == "none":
        return module
    if option.kind == "offload":
        return offload_wrapper(module)
    if option.policy is None:
        return checkpoint_wrapper(module)
    from ckpt_compile.eager._selective import create_selective_checkpoint_contexts

    context_fn = functools.partial(create_selective_checkpoint_contexts, option.selective_policy())
    return checkpoint_wrapper(module, context_fn=context_fn)


def wrap_segment(modules: list[nn.Module]) -> list[nn.Module]:
    """Consecutive blocks as one segment (``eager._segment``): one checkpoint that saves the
    first block's inputs only; each block becomes a ``CheckpointWrapper``."""
    from ckpt_compile.eager._segment import Segment
    from ckpt_compile.modules.wrappers import checkpoint_wrapper

    segment = Segment(len(modules))
    return [checkpoint_wrapper(m, checkpoint_fn=segment.link(p)) for p, m in enumerate(modules)]


def measure(
    model: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    blocks: list[tuple[str, nn.Module]],
    options: Callable[[tuple[str, ...]], tuple[Option, ...]],
) -> Measurement:
    """Run ``model(*args, **kwargs)`` on fake tensors and measure every block's options;
    ``options(names)`` says which to try on a block that marks ``names`` (the first is
    :data:`NONE`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    recorder = _Recorder()
    failed: list[str] = []  # blocks whose measurement failed (their error says so already)
    found: list[BlockMeasure] = []
    depth = [0]

    # Only the real calls move `depth`: an option run's recomputation may stop early (an
    # exception inside the forward), skipping the forward hook.
    def pre_hook(module, hook_args, hook_kwargs):
        if not recorder.busy:
            depth[0] += 1

    def post_hook(name: str, module, hook_args, hook_kwargs, output):
        if recorder.busy:
            return None
        depth[0] -= 1
        recorder.busy = True
        try:
            chained = _chained(recorder, hook_args, hook_kwargs, output)
            found.append(dataclasses.replace(
                _measure_block(recorder, name, module, hook_args, hook_kwargs, output, options), chained=chained))
        except Exception as e:
            failed.append(name)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise RuntimeError(
                f"ckpt_compile.plan: measuring block {name!r} ({type(module).__name__}) failed: "
                f"{type(e).__name__}: {first} The planner calls each block again on the same inputs; "
                f"a block that keeps state between calls breaks that (Hugging Face models: pass "
                f"use_cache=False)."
            ) from e
        finally:
            recorder.busy = False
        return None

    handles = []
    for name, block in blocks:
        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(block.register_forward_hook(functools.partial(post_hook, name), with_kwargs=True))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    outside: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = recorder.key(t)
        if depth[0] == 0:
            outside.add(key)
        return t

    try:
        with fake_mode:
            fake_args, fake_kwargs = tree_map(lambda v: fake_mode.from_tensor(v) if torch.is_tensor(v) else v, (args, kwargs))
            # Fake parameters and buffers too: an in-place update in the forward (batch norm's
            # running statistics) must not touch the user's model.
            state = {name: fake_mode.from_tensor(t) for name, t in
                     [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
            with _Counter() as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                try:
                    torch.func.functional_call(model, state, fake_args, fake_kwargs, tie_weights=True, strict=False)
                except Exception as e:
                    if failed:
                        raise
                    # The user's model on these inputs (issue 22): say which call, with what.
                    raise model_call_error("ckpt_compile.plan", model, args, kwargs, e) from e
            alive_anyway = {recorder.key(t) for t in tree_leaves((state, fake_args, fake_kwargs)) if isinstance(t, torch.Tensor)}
    finally:
        for handle in handles:
            handle.remove()
    order = {name: i for i, (name, _) in enumerate(blocks)}
    missing = [name for name, _ in blocks if name not in {b.name for b in found}]
    if missing:
        raise ValueError(f"ckpt_compile.plan: blocks {missing} never ran in model(*example_inputs); plan only blocks the forward calls")
    if len(found) != len(blocks):
        called = [b.name for b in found]
        raise ValueError(f"ckpt_compile.plan: each block must run once per forward; calls were {called}")
    found.sort(key=lambda b: order[b.name])
    sizes = {key: 0 if key in alive_anyway else nbytes for key, nbytes in recorder.sizes.items()}
    return Measurement(sizes, frozenset(outside), tuple(found), counter.flops - recorder.counted)


# ---------------------------------------------------------------- one block


def _measure_block(recorder, name, module, args, kwargs, output, options) -> BlockMeasure:
    real_outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    # A storage's role in the block: an input, an output, a parameter or buffer, or its own.
    inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    state = [*module.parameters(), *module.buffers()]
    role_of: dict[int, tuple] = {}
    for kind, tensors in (("in", inputs), ("out", real_outputs), ("state", state)):
        for i, t in enumerate(tensors):
            role_of.setdefault(recorder.key(t), (kind, i))
    # Repeated blocks (same class, configuration, shapes) save and recompute the same
    # things: measure the first, give the others its figures with their own storages.
    signature = _signature(module, args, kwargs, inputs, state, recorder)
    if signature not in recorder.measured:
        measured = _measure_options(recorder, module, args, kwargs, real_outputs, options)
        options_, saved, flops, elements, forward = measured
        roles = [frozenset(role_of.get(k, ("own", k, recorder.sizes[k])) for k in keys) for keys in saved]
        recorder.measured[signature] = (options_, roles, flops, elements, forward)
    else:
        options_, roles, flops, elements, forward = recorder.measured[signature]
    by_role = {"in": inputs, "out": real_outputs, "state": state}
    fresh: dict[int, int] = {}

    def key(role: tuple) -> int:
        if role[0] == "own":
            if role[1] not in fresh:
                fresh[role[1]] = recorder.new_key(role[2])
            return fresh[role[1]]
        return recorder.key(by_role[role[0]][role[1]])

    return BlockMeasure(
        name=name,
        cls=type(module).__name__,
        options=tuple(options_),
        saved=tuple(frozenset(key(r) for r in roles_) for roles_ in roles),
        recompute_flops=tuple(max(f - flops[0], 0) for f in flops),
        recompute_elements=tuple(max(e - elements[0], 0) for e in elements),
        forward_flops=forward,
    )


def _measure_options(recorder, module, args, kwargs, real_outputs, options):
    # No checkpoint first: it finds the names the block marks, which decide the options.
    keys, forward, total, extra, names = _run_option(recorder, module, NONE, args, kwargs, real_outputs)
    saved, flops, elements = [frozenset(keys)], [total], [extra]
    options = options(tuple(sorted(names)))
    assert options[0] == NONE, options
    for option in options[1:]:
        keys, _, total, extra, _ = _run_option(recorder, module, option, args, kwargs, real_outputs)
        saved.append(frozenset(keys))
        flops.append(total)
        elements.append(extra)
    recorder.counted += sum(flops)
    return options, saved, flops, elements, forward


def _signature(module, args, kwargs, inputs, state, recorder) -> tuple:
    """What decides a block's measurement: its class and configuration (``repr``, training
    flags), its parameters' and inputs' metadata, which inputs share storage, and the
    non-tensor arguments."""
    def meta(t):
        return (tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type, t.requires_grad)

    first = {}
    sharing = tuple(first.setdefault(recorder.key(t), i) for i, t in enumerate(inputs))
    leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    others = tuple(repr(v) for v in leaves if not isinstance(v, torch.Tensor))
    return (type(module), repr(module), tuple(m.training for m in module.modules()),
            tuple(meta(t) for t in state), tuple(meta(t) for t in inputs), sharing, str(spec), others)


def _run_option(recorder, module, option, args, kwargs, real_outputs):
    """(keys saved, forward FLOPs, forward + backward FLOPs, elementwise outputs) of one
    option run."""
    from ckpt_compile.eager import _selective

    storages: list = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages.append(t.untyped_storage())
        return t

    # Fresh autograd roots on the same storages: the option's backward stays inside the block.
    args, kwargs = tree_map(
        lambda v: v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v, (args, kwargs))
    runner = wrap(module, option)
    with _Counter() as counter:
        with _Counter() as forward, _selective._observe_caches() as modes, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with warnings.catch_warnings():
                # The offload hook asks storages for their address to spot parameters;
                # fake storages have none (and none is needed: nothing is copied here).
                warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
                # Our counting hook is not the user's: selective regions (ours and torch's,
                # 2.14+) warn about any saved_tensors_hooks block around them.
                warnings.filterwarnings("ignore", message="A saved_tensors_hooks context", category=FutureWarning)
                out = runner(*args, **kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        # The same tensor as the real call's output, so it gets the same key (before any
        # saved storage is keyed: the block may save its own output).
        for mine, real in zip(outputs, real_outputs):
            recorder.alias(mine, real)
        for mode in modes:
            storages.extend(t.untyped_storage() for t in _selective._cached_tensors(mode))
        grad_of = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
        grad_of += [p for p in module.parameters() if p.requires_grad]
        differentiable = [t for t in outputs if t.requires_grad]
        if differentiable and grad_of:
            torch.autograd.grad(differentiable, grad_of, [torch.ones_like(t) for t in differentiable], allow_unused=True)
    keys = {recorder.key(s) for s in storages}
    tensors = [t for t in tree_leaves((args, kwargs, [*module.parameters()][:1])) if isinstance(t, torch.Tensor)]
    if option.kind == "checkpoint" and all(t.device.type in ("cpu", "meta") for t in tensors):
        keys.add(recorder.new_key(torch.get_rng_state().nbytes))  # the stashed CPU RNG state: device memory there
    return keys, forward.flops, counter.flops, counter.elements, forward.names


def _chained(recorder, args, kwargs, output) -> frozenset[int]:
    """Keys of the inputs that are the previous block call's outputs, unmodified; remembers
    this call's outputs for the next (what ``eager._segment`` chains at run time)."""
    previous, recorder.last_outputs = recorder.last_outputs, [
        (t, t._version) for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    inputs = [*args, *kwargs.values()]
    return frozenset(recorder.key(a) for a in inputs if isinstance(a, torch.Tensor)
                     and any(a is t and a._version == v for t, v in previous))


# ---------------------------------------------------------------- helpers


class _Recorder:
    """Storage keys: one int per distinct storage, stable for the whole measurement (the
    storages are kept alive, so no key is reused)."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}
        self._keys: dict[int, int] = {}
        self._alive: list = []
        self._aliases: dict[int, int] = {}
        self.busy = False
        self.counted = 0  # FLOPs of the option runs (nested inside the model's forward)
        self.measured: dict[tuple, tuple] = {}  # block signature -> its figures
        self.last_outputs: list = []  # (tensor, version) returned by the last block call

    def new_key(self, nbytes: int) -> int:
        """A key for a storage of a repeated block that was not run (see _measure_block)."""
        key = len(self.sizes) + len(self._aliases) + 10**9
        while key in self.sizes:
            key += 1
        self.sizes[key] = nbytes
        return key

    def key(self, value) -> int:
        """Key of a tensor's storage (or of an untyped storage)."""
        storage = value.untyped_storage() if isinstance(value, torch.Tensor) else value
        raw = storage._cdata
        if raw in self._aliases:
            return self._aliases[raw]
        if raw not in self._keys:
            self._keys[raw] = len(self._keys)
            self._alive.append(storage)
            self.sizes[self._keys[raw]] = storage.nbytes()
        return self._keys[raw]

    def alias(self, mine: torch.Tensor, real: torch.Tensor) -> None:
        target = self.key(real)
        raw = mine.untyped_storage()._cdata
        if raw != real.untyped_storage()._cdata:
            self._alive.append(mine.untyped_storage())
            self._aliases[raw] = target
