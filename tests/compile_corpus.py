"""A corpus of models for comparing ``backend="ckpt"`` with stock ``torch.compile``.

Shared by ``tests/test_compile_corpus.py`` (small sizes) and ``benchmarks/compile.py``
(the sizes of issue 14). Every model is built from code or a config (no weights, nothing
downloaded) as a stack of blocks; :func:`build` wraps each block with one of :data:`WRAPS`
(the checkpoint region the user asked for), so the same model and the same regions can be
compiled with either backend.

Saved bytes are what autograd holds for backward after the compiled forward: unique
storages seen by a ``saved_tensors_hooks`` pack hook, parameters and inputs excluded.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as tuc
from torch.utils.checkpoint import CheckpointPolicy

import ckpt_compile as cc

_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "convolution")


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op.overloadpacket.__name__ in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


# ---------------------------------------------------------------- regions


class _Region(nn.Module):
    """Calls ``fn(block, *args, **kwargs)``: one checkpoint region per block."""

    def __init__(self, block: nn.Module, fn):
        super().__init__()
        self.block, self.fn = block, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.block, *args, **kwargs)


def _ours(block, *args, **kwargs):
    return cc.checkpoint(block, *args, use_reentrant=False, **kwargs)


def _torch(block, *args, **kwargs):
    return tuc.checkpoint(block, *args, use_reentrant=False, **kwargs)


def _selective(block, *args, **kwargs):
    ctx = functools.partial(cc.create_selective_checkpoint_contexts, _save_matmuls)
    return cc.checkpoint(block, *args, use_reentrant=False, context_fn=ctx, **kwargs)


WRAPS = {
    "none": lambda block: block,
    "ckpt_checkpoint": lambda block: _Region(block, _ours),
    "torch_checkpoint": lambda block: _Region(block, _torch),
    "checkpoint_wrapper": lambda block: cc.checkpoint_wrapper(block),
    "selective": lambda block: _Region(block, _selective),
}


# ---------------------------------------------------------------- models


class MMBlock(nn.Module):
    """``x + tanh(mm(sin(mm(x, w1)), w2))``: the smallest block with two matmuls."""

    def __init__(self, d: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, x):
        return x + torch.tanh(torch.mm(torch.sin(torch.mm(x, self.w1)), self.w2))


class MLPBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln, self.l1, self.l2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.l2(F.gelu(self.l1(self.ln(x))))


class ConvBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.n1 = nn.GroupNorm(4, c)

    def forward(self, x):
        return x + self.c2(F.relu(self.n1(self.c1(x))))


class GPTBlock(nn.Module):
    """Pre-LN GPT block with SDPA attention; the causal mask comes from outside."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, mask):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Stack(nn.Module):
    """Blocks applied in turn, then the mean square as a loss."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.float().pow(2).mean()


class GPT(nn.Module):
    """Token and position embeddings, blocks, final norm and tied head; mask as a buffer."""

    def __init__(self, blocks: int, d: int, heads: int, seq: int, vocab: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        self.register_buffer("mask", torch.ones(seq, seq, dtype=torch.bool).tril(), persistent=False)
        self.register_buffer("positions", torch.arange(seq), persistent=False)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(self.positions[: ids.shape[1]])
        for block in self.blocks:
            x = block(x, self.mask)
        logits = self.ln(x) @ self.tok.weight.t()
        return logits.float().pow(2).mean()


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM (built from a config) with a scalar loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        extra = {} if hasattr(self.model, "bert") else {"use_cache": False}
        return self.model(input_ids=ids, **extra).logits.float().pow(2).mean()

    @property
    def blocks(self):
        if hasattr(self.model, "transformer"):
            return self.model.transformer.h
        if hasattr(self.model, "bert"):
            return self.model.bert.encoder.layer
        return self.model.model.layers


def _hf(kind: str, layers: int, hidden: int, dropout: float = 0.0):
    """A Hugging Face model from a config; ``dropout`` 0.1 is GPT-2's and BERT's default."""
    import transformers

    common = dict(vocab_size=256, attn_implementation="sdpa")
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, n_positions=256,
                                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **common)
        return HFCausalLM(transformers.GPT2LMHeadModel(config))
    if kind == "bert":
        config = transformers.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=4,
                                         intermediate_size=2 * hidden, max_position_embeddings=64,
                                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **common)
        return HFCausalLM(transformers.BertForMaskedLM(config))
    config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      **common)
    return HFCausalLM(transformers.LlamaForCausalLM(config))


# name -> sizes at "test" and "issue" scale; each entry: (builder(sizes), input(sizes)).
SIZES = {
    "mm_stack": {"test": dict(blocks=4, d=64, n=32), "issue": dict(blocks=4, d=64, n=128)},
    "mlp": {"test": dict(blocks=2, d=32, n=16), "issue": dict(blocks=4, d=256, n=512)},
    "conv": {"test": dict(blocks=2, c=8, hw=8, n=2), "issue": dict(blocks=4, c=32, hw=32, n=8)},
    "gpt": {"test": dict(blocks=2, d=64, heads=4, seq=32, n=2), "issue": dict(blocks=4, d=256, heads=4, seq=128, n=4)},
    "hf_gpt2": {"test": dict(blocks=2, d=64, seq=32, n=2), "issue": dict(blocks=4, d=128, seq=64, n=4)},
    "hf_llama": {"test": dict(blocks=2, d=64, seq=32, n=2), "issue": dict(blocks=4, d=128, seq=64, n=4)},
    # With their default dropout (0.1): compared under inductor's fallback_random (eager's
    # random numbers) and a seed per step, see DROPOUT_MODELS.
    "hf_gpt2_dropout": {"test": dict(blocks=2, d=64, seq=32, n=2), "issue": dict(blocks=4, d=128, seq=64, n=4)},
    "hf_bert_dropout": {"test": dict(blocks=2, d=64, seq=32, n=2), "issue": dict(blocks=4, d=128, seq=64, n=4)},
}
MODELS = tuple(SIZES)
HF_MODELS = ("hf_gpt2", "hf_llama", "hf_gpt2_dropout", "hf_bert_dropout")
DROPOUT_MODELS = ("hf_gpt2_dropout", "hf_bert_dropout")


def _model(name: str, s: dict) -> nn.Module:
    if name == "mm_stack":
        return Stack(MMBlock(s["d"]) for _ in range(s["blocks"]))
    if name == "mlp":
        return Stack(MLPBlock(s["d"]) for _ in range(s["blocks"]))
    if name == "conv":
        return Stack(ConvBlock(s["c"]) for _ in range(s["blocks"]))
    if name == "gpt":
        return GPT(s["blocks"], s["d"], s["heads"], s["seq"])
    kind = name.removeprefix("hf_").removesuffix("_dropout")
    return _hf(kind, s["blocks"], s["d"], dropout=0.1 if name in DROPOUT_MODELS else 0.0)


def _input(name: str, s: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name == "mm_stack":
        return torch.randn(s["n"], s["d"], generator=g, requires_grad=True)
    if name == "mlp":
        return torch.randn(s["n"], s["d"], generator=g, requires_grad=True)
    if name == "conv":
        return torch.randn(s["n"], s["c"], s["hw"], s["hw"], generator=g, requires_grad=True)
    return torch.randint(0, 256, (s["n"], s["seq"]), generator=g)


def build(name: str, wrap: str, scale: str = "test", seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(model, input)``: the corpus model ``name`` with each block wrapped by ``WRAPS[wrap]``.
    The same ``seed`` gives the same parameters whatever the wrap."""
    sizes = SIZES[name][scale]
    torch.manual_seed(seed)
    model = _model(name, sizes)
    blocks = model.blocks
    for k in range(len(blocks)):
        blocks[k] = WRAPS[wrap](blocks[k])
    return model, _input(name, sizes)


# ---------------------------------------------------------------- measuring


def saved_bytes(model: nn.Module, fn, x: torch.Tensor) -> int:
    """Unique storages autograd saves during ``fn(x)``; parameters, buffers and ``x`` excluded."""
    exclude = {t.untyped_storage().data_ptr() for t in (x, *model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x)
    del loss
    return sum(storages.values())


def step(model: nn.Module, fn, x: torch.Tensor, seed: int = 0):
    """(loss, gradients of the parameters and of a float input) of one step, the RNG seeded
    with ``seed`` first (dropout draws the same numbers in every variant)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_() if x.is_floating_point() else x
    torch.manual_seed(seed)
    loss = fn(x)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    if x.is_floating_point():
        grads.append(x.grad)
    return loss.detach(), grads


def retained_after_forward(forward) -> int:
    """Bytes that ``forward()`` leaves allocated on the CPU when it returns, less its own
    output: what it keeps for the backward (``torch.profiler``'s memory timeline, which
    sees every allocation and free; tensors alive before the call, such as parameters and
    inputs, are taken off). Keeps the output alive until the timeline is read."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        out = forward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    own = sum(t.untyped_storage().nbytes() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    return sum(sizes[-1]) - sum(sizes[0]) - own
