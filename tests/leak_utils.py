"""Shared by the leak and fault tests: every way of checkpointing a model, ours and torch's,
a probe that injects faults inside a checkpointed block, and a count of what is alive.

"Alive" is what the garbage collector tracks after ``gc.collect()``: ``torch.Tensor``
objects, and autograd ``Node`` objects visible from Python (``grad_fn`` objects and custom
``Function`` contexts). A step that leaks leaves more of them behind every time.
"""
from __future__ import annotations

import copy
import functools
import gc
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy

import ckpt_compile as cc
from ckpt_compile import composable, policies, wrappers

D_MODEL = 32
_INPUT = torch.randn(4, D_MODEL, generator=torch.Generator().manual_seed(0))


class InjectedFault(RuntimeError):
    """Raised by the probe; its text is what the tests look for."""


class Probe(nn.Module):
    """Identity inside a block that can fail on purpose during one step.

    ``fault``: None, ``"forward"`` (raise in the forward), ``"interrupt"``
    (KeyboardInterrupt in the forward), ``"recompute"`` (raise when the block runs again in
    the backward), ``"hook"`` (raise from a gradient hook in the backward).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fault: str | None = None
        self.calls = 0
        self.hooked = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        first = self.calls == 1  # the forward; a later call is a recomputation
        if self.fault == "forward" and first:
            raise InjectedFault("injected fault in the forward")
        if self.fault == "interrupt" and first:
            raise KeyboardInterrupt("injected interrupt in the forward")
        if self.fault == "recompute" and not first:
            raise InjectedFault("injected fault in the recomputation")
        if self.fault == "hook" and h.requires_grad and not self.hooked:
            # Reentrant checkpointing runs its forward without grad: the hook goes on the
            # recomputed tensor, the one its backward goes through.
            self.hooked = True
            h.register_hook(_raise_in_hook)
        return h


def _raise_in_hook(grad):
    raise InjectedFault("injected fault in a backward hook")


class Block(nn.Module):
    def __init__(self, probe: bool = True) -> None:
        super().__init__()
        self.lin1 = nn.Linear(D_MODEL, D_MODEL)
        self.lin2 = nn.Linear(D_MODEL, D_MODEL)
        self.probe = Probe() if probe else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = cc.checkpoint_name(self.lin1(x), "h1")
        return x + self.lin2(torch.relu(self.probe(h)))


class Model(nn.Module):
    """Two blocks; ``region(block, h)`` runs a block (a checkpoint function, or a plain
    call for wrapped blocks); ``between`` runs, eagerly, between the two blocks."""

    def __init__(self, probe_inside: bool = True, probe_between: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(probe_inside), Block(probe_inside)])
        self.region = _plain
        self.between = Probe() if probe_between else None
        # Not checkpointed, on another shape: its saved tensors show whether a failed
        # region left its saved-tensor hooks behind (a stale region would take them).
        self.head = nn.Linear(2 * D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.region(self.blocks[0], x)
        if self.between is not None:
            h = _eager_probe(self.between, h)
        h = self.region(self.blocks[1], h)
        return torch.tanh(self.head(h.reshape(h.shape[0] // 2, 2 * D_MODEL)))


def _plain(block, h):
    return block(h)


@torch._dynamo.disable
def _eager_probe(probe: Probe, h: torch.Tensor) -> torch.Tensor:
    # A graph break: the probe runs eagerly between two compiled graphs.
    return probe(h)


def _offload_mm(ctx, op, *args, **kwargs):
    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
        return CheckpointPolicy.MUST_CPU_OFFLOAD
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective(api, policy):
    return functools.partial(api.create_selective_checkpoint_contexts, policy)


def _with(api, **kwargs):
    def region(block, h):
        return api.checkpoint(block, h, **kwargs)

    return region


def _torch_wrappers():
    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers

    return torch_wrappers


def _torch_composable():
    from torch.distributed._composable import checkpoint

    return checkpoint


# Each setup takes the plain Model, checkpoints it one way (ours or torch's) in place, and
# returns the model to step.
def _set_region(api, **kwargs):
    def setup(model):
        model.region = _with(api, **kwargs)
        return model

    return setup


def _setup_selective(policy):
    def for_api(api):
        def setup(model):
            model.region = _with(api, use_reentrant=False, context_fn=_selective(api, policy))
            return model

        return setup

    return for_api


def _setup_wrapper(which: str, side: str):
    def setup(model):
        api = wrappers if side == "ours" else _torch_wrappers()
        for i, block in enumerate(model.blocks):
            model.blocks[i] = getattr(api, which)(block)
        return model

    return setup


def _setup_segment(side: str):
    """Both blocks as one segment (what ``cc.plan`` applies): ours only; torch has no
    segment over blocks its parent calls one by one, so its side is one checkpoint over
    both blocks, called as one module."""
    def setup(model):
        if side == "ours":
            from ckpt_compile.eager._segment import Segment

            segment = Segment(len(model.blocks))
            for i, block in enumerate(model.blocks):
                model.blocks[i] = wrappers.checkpoint_wrapper(block, checkpoint_fn=segment.link(i))
            return model
        model.region = _plain
        blocks = list(model.blocks)
        model.blocks = nn.ModuleList([_Sequential(blocks), nn.Identity()])
        return model

    return setup


class _Sequential(nn.Module):
    """torch's checkpoint over the blocks in turn, as one module."""

    def __init__(self, blocks) -> None:
        super().__init__()
        self.inner = nn.Sequential(*blocks)

    def forward(self, h):
        return torch.utils.checkpoint.checkpoint(self.inner, h, use_reentrant=False)


def _setup_composable(side: str):
    def setup(model):
        checkpoint = composable.checkpoint if side == "ours" else _torch_composable()
        for block in model.blocks:
            checkpoint(block)
        return model

    return setup


def _setup_compiled(side: str, inner: str = "eager"):
    def setup(model):
        torch._dynamo.reset()  # each test's model compiles afresh (no recompile limit)
        if side == "ours":
            model.region = _with(cc, use_reentrant=False)
            return torch.compile(model, backend="ckpt", options={"inner": inner})
        model.region = _with(torch.utils.checkpoint, use_reentrant=False)
        return torch.compile(model, backend="aot_eager" if inner == "eager" else "inductor")

    return setup


_API = {"ours": cc, "torch": torch.utils.checkpoint}
VARIANTS = (
    "non_reentrant", "reentrant", "selective", "offload_policy", "offload_these_names",
    "checkpoint_wrapper", "offload_wrapper", "composable", "segment", "compiled",
)
# Variants whose checkpointed block runs again in the backward (a recomputation to fail in).
RECOMPUTING = frozenset(VARIANTS) - {"offload_wrapper", "compiled"}


def build(variant: str, side: str = "ours", *, inner: str = "eager"):
    """(model to step, plain unwrapped model with the same weights), seeded."""
    torch.manual_seed(0)
    compiled = variant == "compiled"
    # Compiled: the probe runs between the blocks (a graph break), except under inductor
    # (one graph, half the compile time), where no fault is injected.
    model = Model(probe_inside=not compiled, probe_between=compiled and inner == "eager")
    reference = copy.deepcopy(model)
    api = _API[side]
    setups = {
        "non_reentrant": _set_region(api, use_reentrant=False),
        "reentrant": _set_region(api, use_reentrant=True),
        "selective": _setup_selective(policies.save_matmuls)(api),
        "offload_policy": _setup_selective(_offload_mm)(api),
        "offload_these_names": _setup_selective(policies.offload_these_names("h1"))(api),
        "checkpoint_wrapper": _setup_wrapper("checkpoint_wrapper", side),
        "offload_wrapper": _setup_wrapper("offload_wrapper", side),
        "composable": _setup_composable(side),
        "segment": _setup_segment(side),
        "compiled": _setup_compiled(side, inner),
    }
    return setups[variant](model), reference


def probes(model: nn.Module) -> list[Probe]:
    return [m for m in model.modules() if isinstance(m, Probe)]


def step(model: nn.Module) -> list[torch.Tensor]:
    """One training step (grads reset first, as an optimizer's zero_grad does); the grads."""
    for probe in probes(model):
        probe.calls, probe.hooked = 0, False
    model.zero_grad(set_to_none=True)
    x = _INPUT.clone().requires_grad_()
    model(x).sum().backward()
    return [p.grad for p in model.parameters()] + [x.grad]


def failing_step(model: nn.Module, fault: str) -> str:
    """One step with ``fault`` injected in the first block (or between the blocks); the
    text of what it raised. Nothing of the exception is kept (no traceback, no frames)."""
    first = probes(model)[0]
    first.fault = fault
    try:
        step(model)
    except (InjectedFault, KeyboardInterrupt, RuntimeError) as e:
        return _chain_text(e)
    finally:
        first.fault = None
    raise AssertionError(f"the step with fault {fault!r} raised nothing")


def _chain_text(e: BaseException) -> str:
    texts = []
    while e is not None:
        texts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return " <- ".join(texts)


def live() -> tuple[int, int]:
    """(torch.Tensor objects, autograd nodes) alive after a gc collection.

    Nodes: the ``torch.autograd.graph.Node`` objects gc tracks (custom ``Function``
    contexts, ``grad_fn`` objects Python holds) and every node reachable from a live
    tensor's ``grad_fn`` (a graph kept alive only from C++ shows there).
    """
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch objects warns
        objects = gc.get_objects()
        # Sorted out by type once (isinstance on each object is slow: Node is an ABC).
        kinds = {type(o) for o in objects}
        tensor_kinds = {k for k in kinds if issubclass(k, torch.Tensor)}
        node_kinds = {k for k in kinds if issubclass(k, torch.autograd.graph.Node)}
        tensors = [o for o in objects if type(o) in tensor_kinds]
        nodes = {o for o in objects if type(o) in node_kinds}
    del objects
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(tensors), len(nodes)
