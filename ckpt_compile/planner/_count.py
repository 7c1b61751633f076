"""The planner's operation counter: FLOPs and moved elements of what a block runs."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

__all__: list[str] = []


class _Counter(TorchDispatchMode):
    """FLOPs (``torch.utils.flop_counter``'s formulas, as ``FlopCounterMode`` counts them,
    without its module tracker: that one's backward hooks reject ``autograd.grad`` on leaf
    inputs) and the output elements of every other op."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.elements = 0
        self.names: set[str] = set()  # given to cc.checkpoint_name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet not in flop_registry and func is not torch.ops.prim.device.default and func is not _name_op():
            with self:  # as FlopCounterMode: count a composite op through its decomposition
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in flop_registry:
            self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
        elif func is _name_op():
            self.names.add(args[1])
        elif func not in _FREE:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.elements += t.numel()
        return out


# Views and bookkeeping move no data.
_FREE = {torch.ops.aten.detach.default, torch.ops.aten.t.default, torch.ops.aten.view.default,
         torch.ops.aten._unsafe_view.default, torch.ops.aten.transpose.int, torch.ops.aten.permute.default,
         torch.ops.aten.expand.default, torch.ops.aten.alias.default, torch.ops.aten.slice.Tensor,
         torch.ops.aten.select.int, torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim}


def _name_op():
    from ckpt_compile.policies import NAME_OP

    return NAME_OP

