"""Eager checkpointing: ckpt_compile against torch.utils.checkpoint, measured in the same run.

An 8-block transformer (d_model 512, 8 heads, seq 256, batch 8 by default; flags for
smaller sizes). For each variant: median forward+backward step time, the per-round ratio
ours/torch (runs alternate A B A B so both see the same machine load), and the bytes
autograd saved for backward (a saved-tensors hook over unique storages) plus, for selective
checkpointing, the storages held in the policy's cache of saved operator outputs (which
autograd never sees), counted the same way for ours and torch's.

    python benchmarks/eager.py                 # full size
    python benchmarks/eager.py --d-model 128 --seq 64 --batch 4 --rounds 5
"""
from __future__ import annotations

import functools
import statistics
import sys
import time

import torch
import torch.utils.checkpoint as tuc

import ckpt_compile as cc
from _transformer import make_model, size_arguments

SAVE_MATMULS = [
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
]


_CACHES: list = []


def _selective_contexts(impl):
    forward_mode, recompute_mode = impl.create_selective_checkpoint_contexts(SAVE_MATMULS)
    _CACHES.append(forward_mode.storage)  # both implementations keep their cache in .storage
    return forward_mode, recompute_mode


def _cache_storages(storage) -> dict[int, int]:
    found = {}
    for entries in storage.values():
        for entry in entries.values():
            for leaf in torch.utils._pytree.tree_leaves(entry):
                value = getattr(leaf, "value", getattr(leaf, "val", None))  # ours / torch's wrapper
                if isinstance(value, torch.Tensor):
                    found[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return found


def forward(model, x, impl, reentrant: bool, selective: bool):
    h = x
    for block in model:
        if impl is None:
            h = block(h)
        elif selective:
            ctx = functools.partial(_selective_contexts, impl)
            h = impl.checkpoint(block, h, use_reentrant=False, context_fn=ctx)
        else:
            h = impl.checkpoint(block, h, use_reentrant=reentrant)
    return h


def saved_bytes(model, x, impl, reentrant, selective) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    _CACHES.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(model, x, impl, reentrant, selective)
    for cache in _CACHES:
        storages.update(_cache_storages(cache))
    _CACHES.clear()
    del out
    return sum(storages.values())


def step_time(model, x, impl, reentrant, selective) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    forward(model, x, impl, reentrant, selective).sum().backward()
    return time.perf_counter() - start


VARIANTS = {
    # name: (ours, torch, reentrant, selective)
    "non-reentrant": (cc, tuc, False, False),
    "reentrant": (cc, tuc, True, False),
    "selective (save matmuls)": (cc, tuc, False, True),
}


def bookkeeping_ratio(rounds: int, regions: int = 200) -> tuple[float, float, float]:
    """Chain of tiny checkpointed regions (16x16 Linear + ReLU): the time is bookkeeping."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(16, 16, requires_grad=True)

    def region(t):
        return lin(t).relu()

    def run(impl):
        start = time.perf_counter()
        h = x
        for _ in range(regions):
            h = impl.checkpoint(region, h, use_reentrant=False)
        h.sum().backward()
        return time.perf_counter() - start

    run(cc), run(tuc)
    ours, theirs, ratios = [], [], []
    for r in range(rounds):
        pair = (run(cc), run(tuc)) if r % 2 else tuple(reversed((run(tuc), run(cc))))
        ours.append(pair[0])
        theirs.append(pair[1])
        ratios.append(pair[0] / pair[1])
    return statistics.median(ours), statistics.median(theirs), statistics.median(ratios)


def main(argv=None) -> int:
    p = size_arguments(__doc__)
    args = p.parse_args(argv)

    model = make_model(args.blocks, args.d_model, args.heads)
    x = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)

    baseline_bytes = saved_bytes(model, x, None, False, False)
    runs = {"none": []}
    for name in VARIANTS:
        runs[name, "ours"], runs[name, "torch"] = [], []
    ratios = {name: [] for name in VARIANTS}
    for r in range(args.warmup + args.rounds):
        keep = r >= args.warmup
        t = step_time(model, x, None, False, False)
        if keep:
            runs["none"].append(t)
        for name, (ours, theirs, reentrant, selective) in VARIANTS.items():
            # alternate which one goes first, so neither always sees a warmer cache
            order = [("ours", ours), ("torch", theirs)] if r % 2 == 0 else [("torch", theirs), ("ours", ours)]
            times = {}
            for who, impl in order:
                times[who] = step_time(model, x, impl, reentrant, selective)
            if keep:
                runs[name, "ours"].append(times["ours"])
                runs[name, "torch"].append(times["torch"])
                ratios[name].append(times["ours"] / times["torch"])

    med = statistics.median
    print(f"# eager benchmark: {args.blocks} blocks, d_model {args.d_model}, heads {args.heads}, "
          f"seq {args.seq}, batch {args.batch}; {args.rounds} rounds; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads")
    print()
    print("| variant | ours step (s) | torch step (s) | ratio ours/torch (median of rounds) | vs no-ckpt (ours) "
          "| saved MiB ours | saved MiB torch |")
    print("|---|---|---|---|---|---|---|")
    t_none = med(runs["none"])
    print(f"| no checkpoint | {t_none:.3f} | {t_none:.3f} | 1.00 | 1.00 | {baseline_bytes / 2**20:.1f} "
          f"| {baseline_bytes / 2**20:.1f} |")
    for name, (ours, theirs, reentrant, selective) in VARIANTS.items():
        b_ours = saved_bytes(model, x, ours, reentrant, selective)
        b_torch = saved_bytes(model, x, theirs, reentrant, selective)
        print(f"| {name} | {med(runs[name, 'ours']):.3f} | {med(runs[name, 'torch']):.3f} | "
              f"{med(ratios[name]):.3f} | {med(runs[name, 'ours']) / t_none:.2f} | {b_ours / 2**20:.1f} | "
              f"{b_torch / 2**20:.1f} |")
    t_ours, t_torch, ratio = bookkeeping_ratio(max(args.rounds, 5) * 3)
    print(f"| bookkeeping: 200 tiny non-reentrant regions | {t_ours:.4f} | {t_torch:.4f} | {ratio:.3f} | - | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
