"""offload_wrapper: what is moved to CPU, what is kept, and that it comes back intact.

The reference for "what autograd saves" is a plain counting ``saved_tensors_hooks`` on the
unwrapped module; the reference for copies is PyTorch's ``offload_wrapper`` (built on
``save_on_cpu(pin_memory=True)``), which copies every saved tensor, parameters included.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ckpt_compile.modules._offload import offload_saved_tensors
from ckpt_compile.wrappers import checkpoint_wrapper, offload_wrapper

# The reference implementation; absent on torch builds without distributed.
torch_wrappers = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_mlp(device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 8)).to(device)


def saved_by_autograd(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(tensors saved for backward, how many of them alias a parameter or buffer)."""
    storages = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x)
    return len(saved), sum(t.untyped_storage().data_ptr() in storages for t in saved)


class CopiesOfParameters(TorchDispatchMode):
    """Counts copy operators whose source shares storage with the given parameters."""

    COPY_OPS = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}

    def __init__(self, params) -> None:
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in params}
        self.copies = 0
        self.all_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.COPY_OPS:
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            self.all_copies += 1
            self.copies += source.untyped_storage().data_ptr() in self.storages
        return func(*args, **(kwargs or {}))


def test_pack_hook_sees_every_saved_tensor_and_keeps_parameters_by_reference():
    module = make_mlp()
    x = torch.randn(4, 16, requires_grad=True)
    expected_saved, expected_aliases = saved_by_autograd(module, x)
    with offload_saved_tensors(module) as stats:
        out = module(x)
    assert stats.packed == expected_saved
    assert stats.kept_module_tensors == expected_aliases == 4  # 2 x weight.t(), LayerNorm weight, bias
    assert (stats.copied, stats.pinned) == (0, 0)  # CPU source: nothing to move
    out.sum().backward()


def test_unpacked_tensors_equal_the_saved_ones():
    module = make_mlp()
    x = torch.randn(4, 16, requires_grad=True)
    plain_grads = torch.autograd.grad(module(x).sum(), [x, *module.parameters()])
    with offload_saved_tensors(module):
        out = module(x)
    for got, expected in zip(torch.autograd.grad(out.sum(), [x, *module.parameters()]), plain_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_parameters_are_never_copied_unlike_pytorch():
    ours, theirs = offload_wrapper(make_mlp()), torch_wrappers.offload_wrapper(make_mlp())
    x = torch.randn(4, 16, requires_grad=True)
    counts = []
    for wrapped in (ours, theirs):
        with CopiesOfParameters(wrapped.parameters()) as counter:
            wrapped(x).sum().backward()
        counts.append((counter.copies, counter.all_copies))
    # PyTorch copies the 4 parameter views (and every other saved tensor) into fresh
    # host buffers even on CPU; we copy nothing that already lives on the CPU.
    assert counts[0] == (0, 0)
    assert counts[1][0] == 4 and counts[1][1] > 4


def test_offload_around_checkpoint_packs_only_the_region_inputs_like_torch_checkpoint():
    module = make_mlp()
    x = torch.randn(4, 16, requires_grad=True)
    packed = []
    for wrapped in (
        checkpoint_wrapper(module),
        torch_wrappers.checkpoint_wrapper(module),  # the reference engine
    ):
        with offload_saved_tensors(module) as stats:
            out = wrapped(x)
        packed.append(stats.packed)
        out.sum().backward()
    # Inside the region the checkpoint swaps saved tensors for its own placeholders; the
    # outer hook only sees the region's input, kept for the recomputation.
    assert packed == [1, 1]


@requires_cuda
def test_cuda_activations_go_to_pinned_cpu_memory_and_come_back():
    module = make_mlp("cuda")
    x = torch.randn(4, 16, device="cuda", requires_grad=True)
    expected_saved, expected_aliases = saved_by_autograd(module, x)
    plain_grads = torch.autograd.grad(module(x).sum(), [x, *module.parameters()])
    with offload_saved_tensors(module) as stats:
        out = module(x)
    assert stats.packed == expected_saved
    assert stats.kept_module_tensors == expected_aliases
    assert stats.copied == stats.pinned == expected_saved - expected_aliases > 0
    grads = torch.autograd.grad(out.sum(), [x, *module.parameters()])
    for got, expected in zip(grads, plain_grads):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, expected)


@requires_cuda
def test_cuda_offload_wrapper_moves_no_parameter_and_frees_device_memory():
    module = make_mlp("cuda")
    wrapped = offload_wrapper(module)
    x = torch.randn(512, 16, device="cuda", requires_grad=True)
    with CopiesOfParameters(module.parameters()) as counter:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = wrapped(x)
        held_offloaded = torch.cuda.memory_allocated() - before
        out.sum().backward()
    assert counter.copies == 0
    del out
    x.grad = None
    module.zero_grad(set_to_none=True)
    before = torch.cuda.memory_allocated()
    out = module(x)
    held_plain = torch.cuda.memory_allocated() - before
    assert held_offloaded < held_plain
