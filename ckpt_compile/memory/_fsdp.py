"""One rank's step peak under FSDP2: ``fully_shard`` of each block and of the root.

The step runs on fake tensors as without sharding (same activations: the example inputs
are one rank's batch); what FSDP2 changes is added to the tracker's figures as offsets:

- parameters: every parameter is held as its shard (dim 0 padded to a multiple of the
  world size, as FSDP2 does); a unit's full parameters are alive while it is all-gathered:
  a block from its pre-forward to its post-forward (``reshard_after_forward=True``) and
  from its pre-backward to its post-backward, plus the next block of backward (FSDP2's
  implicit backward prefetch); the root's from the start of forward to the end of
  backward (FSDP2 does not reshard the root after forward);
- gradients: a unit's gradients are full-size until its post-backward reduce-scatter,
  sharded after;
- optimizer state: sharded (state tensors shaped like their parameter).

Not modelled: communication buffers beyond the all-gather outputs, and the optimizer
step's temporaries, which are counted at full size (an overestimate, small next to the
state). The blocks are the children of the model's largest ``nn.ModuleList`` /
``nn.Sequential``, as ``cc.plan`` finds them.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ckpt_compile.memory._step import CATEGORIES

__all__ = ["sharding_for"]

_P, _G, _O = (CATEGORIES.index(c) for c in ("parameters", "gradients", "optimizer_state"))


def sharding_for(model: nn.Module, world_size: int) -> "_Sharding":
    """What ``_estimate`` needs to account one rank of ``world_size`` under FSDP2."""
    blocks = _blocks(model)
    if not blocks:
        raise ValueError("ckpt_compile.estimate_memory: world_size > 1 shards each block and the root, but the "
                         "model has no nn.ModuleList / nn.Sequential of blocks to shard")
    return _Sharding(model, blocks, world_size)


def _blocks(model: nn.Module) -> list[nn.Module]:
    containers = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1]
    if not containers:
        return []
    best = max(containers, key=lambda c: sum(p.numel() for p in c.parameters()))
    return list(best)


def _shard_bytes(t: torch.Tensor, n: int) -> int:
    if t.dim() == 0:
        return t.element_size()
    return math.ceil(t.shape[0] / n) * (t.numel() // max(t.shape[0], 1)) * t.element_size()


class _Sharding:
    """Offsets for the tracker, moved by hooks on the (fake-state) model while it runs."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], n: int):
        self.n = n
        self.blocks = blocks
        self.model = model
        self.handles: list = []

    # The step calls these with the fake parameters in place.
    def install(self, tracker, params: list[torch.Tensor], opt) -> None:
        self.tracker = tracker
        owner: dict[int, int] = {}
        for k, block in enumerate(self.blocks):
            for p in block.parameters():
                owner.setdefault(id(p), k)
        self.unit_params: list[list[torch.Tensor]] = [[] for _ in self.blocks] + [[]]  # last: the root
        seen = set()
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                self.unit_params[owner.get(id(p), len(self.blocks))].append(p)
        full = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
        shard = lambda ps: sum(_shard_bytes(p, self.n) for p in ps)  # noqa: E731
        self.full = [full(ps) for ps in self.unit_params]
        self.shard = [shard(ps) for ps in self.unit_params]
        offsets = tracker.offsets
        offsets[_P] += sum(self.shard) - sum(self.full)
        if opt is not None:
            for p in params:
                for v in opt.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        offsets[_O] += _shard_bytes(v, self.n) - v.numel() * v.element_size()
        self.gathered: set[int] = set()
        self.reduced: set[int] = set()
        root = len(self.blocks)
        self.handles.append(self.model.register_forward_pre_hook(lambda m, a: self._gather(root)))
        for k, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, k=k: self._gather(k)))
            self.handles.append(block.register_forward_hook(lambda m, a, o, k=k: self._forward_done(k, a, o)))

    def _gather(self, k: int) -> None:
        if k not in self.gathered:
            self.gathered.add(k)
            self.tracker.offsets[_P] += self.full[k]

    def _reshard(self, k: int) -> None:
        if k in self.gathered:
            self.gathered.discard(k)
            self.tracker.offsets[_P] -= self.full[k]

    def _forward_done(self, k: int, args, output) -> None:
        if self.tracker.phase == "backward":
            return  # a recomputation inside the block's backward: it stays gathered
        self._reshard(k)
        outs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        ins = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.requires_grad]
        if outs:
            self.handles.append(torch.autograd.graph.register_multi_grad_hook(outs, lambda *_: self._backward_start(k)))
        if ins:
            self.handles.append(torch.autograd.graph.register_multi_grad_hook(ins, lambda *_: self._backward_done(k)))

    def _backward_start(self, k: int) -> None:
        self._gather(k)
        if k > 0:
            self._gather(k - 1)  # FSDP2's implicit backward prefetch of the next block

    def _backward_done(self, k: int) -> None:
        self._reshard(k)
        self._reduce(k)

    def _reduce(self, k: int) -> None:
        if k not in self.reduced:
            self.reduced.add(k)
            self.tracker.offsets[_G] -= self.full[k] - self.shard[k]

    def backward_finished(self) -> None:
        """The root's post-backward: everything resharded, every gradient reduce-scattered."""
        for k in range(len(self.unit_params)):
            self._reshard(k)
            if any(p.grad is not None for p in self.unit_params[k]):
                self._reduce(k)
        self.tracker.sample()

    def step_finished(self) -> None:
        """After ``zero_grad(set_to_none=True)`` no gradient, sharded or not, is left."""
        self.tracker.offsets[_G] = 0
        self.tracker.sample()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
