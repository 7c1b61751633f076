"""The model and size flags shared by the eager and compile benchmarks."""
from __future__ import annotations

import argparse

import torch


def make_model(blocks: int, d_model: int, heads: int) -> torch.nn.ModuleList:
    """``blocks`` transformer encoder layers (ffn 4x, dropout 0.1), seeded."""
    torch.manual_seed(0)
    return torch.nn.ModuleList(
        torch.nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.1, batch_first=True)
        for _ in range(blocks)
    )


def size_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the benchmark sizes (8 blocks, d_model 512, 8 heads, seq 256, batch 8)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    return p
