"""The step-memory corpus: models, checkpoint entry points and the reference step, shared by
``tests/test_memory.py`` and ``benchmarks/memory.py``.

Models come from ``compile_corpus`` (plus a Hugging Face BERT here); every entry point of
ours and of torch's can be applied to their blocks. The reference is one real training
step after a first one (so the optimizer's state exists), measured by
``cc.measure_memory``; its loop drops the loss before the optimizer step, as the estimate
does, and its input needs no gradient (training data).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy

import ckpt_compile as cc
import compile_corpus

MODELS = ("mlp", "gpt", "hf_gpt2", "hf_llama", "bert", "conv")
# Conv sizes where oneDNN's unmodelled scratchpad stays well under the 3% tolerance.
CONV = dict(blocks=2, c=16, hw=32, n=4)
OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "sgd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
}


def _offload_matmuls(ctx, op, *args, **kwargs):
    if op.overloadpacket.__name__ in ("mm", "addmm", "bmm", "convolution"):
        return CheckpointPolicy.MUST_CPU_OFFLOAD
    return CheckpointPolicy.PREFER_RECOMPUTE


def _region(fn):
    return lambda block: compile_corpus._Region(block, fn)


def _offload_policy(block, *args, **kwargs):
    ctx = functools.partial(cc.create_selective_checkpoint_contexts, _offload_matmuls)
    return cc.checkpoint(block, *args, use_reentrant=False, context_fn=ctx, **kwargs)


def _torch_wrapper(block):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return checkpoint_wrapper(block)


def _composable(block):
    import ckpt_compile.composable

    return ckpt_compile.composable.checkpoint(block)


def _torch_composable(block):
    from torch.distributed._composable import checkpoint

    return checkpoint(block)


WRAPS = {
    **compile_corpus.WRAPS,
    "torch_checkpoint_wrapper": _torch_wrapper,
    "offload_wrapper": lambda block: cc.offload_wrapper(block),
    "offload_policy": _region(_offload_policy),
    "composable": _composable,
    "torch_composable": _torch_composable,
}
ALL_WRAPS = (*WRAPS, "plan")


def _bert(blocks: int, d: int) -> nn.Module:
    return compile_corpus._hf("bert", blocks, d)


def build(name: str, wrap: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(model, input)`` with each block wrapped by ``WRAPS[wrap]`` (or an applied plan at
    half the activation bytes)."""
    first = "none" if wrap == "plan" else wrap
    if name == "bert":
        torch.manual_seed(seed)
        model = _bert(2, 64)
        for k in range(len(model.blocks)):
            model.blocks[k] = WRAPS[first](model.blocks[k])
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    else:
        if name == "conv":
            compile_corpus.SIZES["conv"]["memory"] = CONV
        scale = "memory" if name == "conv" else "test"
        if first in compile_corpus.WRAPS:
            model, x = compile_corpus.build(name, first, scale, seed)
        else:
            model, x = compile_corpus.build(name, "none", scale, seed)
            for k in range(len(model.blocks)):
                model.blocks[k] = WRAPS[first](model.blocks[k])
        x = x.detach()
    if wrap == "plan":
        cc.plan(model, x, memory_budget=0.5).apply(model)
    return model, x


def measured(model: nn.Module, x: torch.Tensor, optimizer) -> cc.StepMemory:
    """The peak of one real step after a first one (CPU profiler memory timeline)."""
    from ckpt_compile.memory._measure import _measure_cpu

    opt = optimizer(model.parameters())

    def step():
        loss = model(x)
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return _measure_cpu(step)


def fsdp2_peak(rank: int, world_size: int, out_dir: str, name: str = "gpt", wrap: str = "none") -> dict:
    """A dist_utils scenario: one rank's measured step peak under ``fully_shard`` of each
    block and the root (AdamW), and the estimate for the same model and world size."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model, x = build(name, wrap)
    estimate = cc.estimate_memory(model, x, optimizer=torch.optim.AdamW, world_size=world_size)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    # torch's memory profiler intermittently fails to order the FSDP2 step's events
    # ("version mismatch" in torch/profiler/_memory_profiler.py) after the step has run. The
    # ranks decide together whether to measure again: a rank that retried alone would wait in
    # the next step's all-gather for a peer that had already returned (gloo's 120 s timeout).
    for attempt in range(3):
        failure = None
        try:
            real = measured(model, x, torch.optim.AdamW)
        except AssertionError as e:
            if "version mismatch" not in str(e):
                raise
            failure = e
        failed = torch.tensor([0 if failure is None else 1])
        dist.all_reduce(failed)
        if not failed.item():
            break
        if attempt == 2:
            raise failure or AssertionError("a peer rank's memory profile failed three times")
    return {"measured": real.peak_bytes, "estimate": estimate.peak_bytes,
            "measured_breakdown": real.breakdown, "estimate_breakdown": estimate.breakdown,
            "measured_phase": real.peak_phase, "estimate_phase": estimate.peak_phase}
