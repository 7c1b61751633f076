"""``python -m ckpt_compile demo``: a small model trained with and without checkpointing.

Prints, side by side, the activation bytes autograd saved for backward, the median step
time and the final loss (identical: dropout is replayed exactly in the recomputation).
"""
from __future__ import annotations

import functools
import statistics
import time

import torch

import ckpt_compile as cc


class _TinyGPT(torch.nn.Module):
    def __init__(self, vocab: int, d_model: int, heads: int, blocks: int, seq: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Parameter(torch.zeros(seq, d_model))
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.1, batch_first=True, norm_first=True)
            for _ in range(blocks)
        )
        self.head = torch.nn.Linear(d_model, vocab)
        self.mask = torch.nn.Transformer.generate_square_subsequent_mask(seq)
        self.region = None  # how each block is run: None = plainly, else a checkpoint call

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            run = functools.partial(block, src_mask=self.mask, is_causal=True)
            h = run(h) if self.region is None else self.region(run, h)
        return self.head(h)


_SAC_MODES: list = []


def _save_matmuls():
    forward, recompute = cc.create_selective_checkpoint_contexts(
        [torch.ops.aten.mm.default, torch.ops.aten.addmm.default])
    _SAC_MODES.append(forward)  # so the demo can count the cache's bytes too
    return forward, recompute


def _saved_bytes(model, tokens) -> int:
    """Bytes autograd saved, plus selective checkpointing's cache (which autograd never sees)."""
    from ckpt_compile._selective import _cached_storages

    storages: dict[int, int] = {}
    _SAC_MODES.clear()

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens)
    for mode in _SAC_MODES:
        storages.update(_cached_storages(mode))
    _SAC_MODES.clear()
    return sum(storages.values())


def _variants():
    return {
        "no checkpointing": None,
        "ckpt_compile.checkpoint (non-reentrant)": functools.partial(cc.checkpoint, use_reentrant=False),
        "ckpt_compile.checkpoint (selective: save matmuls)": functools.partial(
            cc.checkpoint, use_reentrant=False, context_fn=_save_matmuls),
    }


def run_eager_demo(steps: int = 5, *, vocab: int = 256, d_model: int = 128, heads: int = 4,
                   blocks: int = 4, seq: int = 64, batch: int = 8, out=print) -> list[dict]:
    """Train the same model under each variant; print and return one row per variant."""
    rows = []
    data = torch.randint(0, vocab, (steps, batch, seq + 1), generator=torch.Generator().manual_seed(0))
    for name, region in _variants().items():
        torch.manual_seed(0)
        model = _TinyGPT(vocab, d_model, heads, blocks, seq)
        model.region = region
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        saved = _saved_bytes(model, data[0, :, :-1])
        times, loss = [], None
        for step in range(steps):
            tokens, targets = data[step, :, :-1], data[step, :, 1:]
            start = time.perf_counter()
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        rows.append({"variant": name, "saved_bytes": saved, "step_s": statistics.median(times), "loss": loss.item()})
    width = max(len(r["variant"]) for r in rows)
    out(f"Eager: {blocks}-block GPT (d_model {d_model}, seq {seq}, batch {batch}), {steps} SGD steps each")
    out(f"{'variant':<{width}}  {'saved activations':>17}  {'step time':>9}  {'final loss':>10}")
    base = rows[0]
    for r in rows:
        ratio = f"({r['saved_bytes'] / base['saved_bytes']:.0%})"
        out(f"{r['variant']:<{width}}  {r['saved_bytes'] / 2**20:9.2f} MiB {ratio:>6}  "
            f"{r['step_s'] * 1000:7.1f}ms  {r['loss']:10.6f}")
    return rows
