"""Partitioner benchmark: ours vs torch's ``min_cut_rematerialization_partition``.

Joint graphs of transformer stacks (attention + MLP blocks, small d_model: sizes barely
matter to a partitioner), with and without per-block ``torch.utils.checkpoint``. Both
partitioners get deep copies of the same joint graph, interleaved (ours, torch's, ours, ...)
and timed in the same run; the table reports medians and the ratio ours/torch. Saved bytes
and recompute FLOPs are measured on the graphs each returns, with the same estimator
(:func:`ckpt_compile.passes.problem.node_flops`).

    python benchmarks/partition.py                 # 4, 16, 64 blocks
    python benchmarks/partition.py --blocks 256 --no-budgets   # the big one, times and bytes
    python benchmarks/partition.py --flow          # time networkx max-flow algorithms

Writes ``benchmarks/partition_plot.svg`` (saved bytes vs recompute FLOPs at each budget).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo.backends.common
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

from ckpt_compile.passes import partition
from ckpt_compile.passes.problem import build_problem, node_flops, value_nbytes

BUDGETS = (0.75, 0.5, 0.25)


class Block(torch.nn.Module):
    def __init__(self, d: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Stack(torch.nn.Module):
    def __init__(self, blocks: int, checkpointed: bool):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(blocks))
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x


def joint_graph(blocks: int, checkpointed: bool):
    """(joint module, joint inputs, partition keywords) captured through AOTAutograd."""
    captured = {}

    def capture(gm, joint_inputs, **kwargs):
        captured.update(gm=copy.deepcopy(gm), inputs=joint_inputs, kwargs=kwargs)
        return default_partition(gm, joint_inputs, **kwargs)

    torch._dynamo.reset()
    backend = torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda gm, _: gm.forward, partition_fn=capture)
    model = Stack(blocks, checkpointed)
    torch.compile(model, backend=backend)(torch.randn(2, 16, 32, requires_grad=True))
    return captured["gm"], captured["inputs"], captured["kwargs"]


def measure(fw, bw, joint, num_fwd_outputs):
    """(saved activation bytes, recompute FLOPs) of a forward/backward pair."""
    forward = build_problem(joint, num_fwd_outputs=num_fwd_outputs).forward
    forward_names = {n.name for n in forward if n.op != "placeholder"}
    outs = fw.graph.output_node().args[0][num_fwd_outputs:]
    saved = sum(value_nbytes(n.meta.get("val")) for n in outs if n.op != "placeholder")
    flops = sum(node_flops(n) for n in bw.graph.nodes if n.name in forward_names)
    return saved, flops


def run_ours(joint, inputs, kwargs, budget=1.0):
    return partition(joint, inputs, memory_budget=budget, **kwargs)


def run_torch(joint, inputs, kwargs, budget=1.0):
    # Torch's rng functionalisation (SDPA counts as random on CPU) needs the fake mode that
    # AOTAutograd would have active.
    fake_mode = torch._guards.detect_fake_mode(torch.utils._pytree.tree_leaves(inputs))
    with torch._functorch.config.patch(activation_memory_budget=budget), fake_mode:
        return min_cut_rematerialization_partition(joint, inputs, compiler="inductor", **kwargs)


def timed(fn, joint, *args):
    joint = copy.deepcopy(joint)  # each run gets its own copy; copying is not timed
    start = time.perf_counter()
    result = fn(joint, *args)
    return time.perf_counter() - start, result


def bench_case(blocks, checkpointed, rounds, budgets=BUDGETS):
    joint, inputs, kwargs = joint_graph(blocks, checkpointed)
    n_fwd = kwargs["num_fwd_outputs"]
    ours_t, torch_t = [], []
    for _ in range(rounds):  # interleaved: ours, torch's, ours, torch's ...
        t, ours = timed(run_ours, joint, inputs, kwargs)
        ours_t.append(t)
        t, theirs = timed(run_torch, joint, inputs, kwargs)
        torch_t.append(t)
    row = {
        "blocks": blocks, "checkpointed": checkpointed, "nodes": len(joint.graph.nodes),
        "ours_s": statistics.median(ours_t), "torch_s": statistics.median(torch_t),
        "ratios": [a / b for a, b in zip(ours_t, torch_t)],
        "ours": measure(*ours, joint, n_fwd), "torch": measure(*theirs, joint, n_fwd), "budgets": {},
    }
    for budget in budgets:
        try:
            mine = measure(*run_ours(copy.deepcopy(joint), inputs, kwargs, budget), joint, n_fwd)
        except ValueError as e:  # budget below the smallest feasible one
            mine = (None, str(e).rsplit(" ", 1)[-1])
        theirs = measure(*run_torch(copy.deepcopy(joint), inputs, kwargs, budget), joint, n_fwd)
        # Same memory, compared fairly: ours at the bytes torch's plan ended up saving.
        matched = None
        if row["ours"][0] and theirs[0] <= row["ours"][0]:
            try:
                budget_at_torch = max(theirs[0] / row["ours"][0], 1e-9)
                matched = measure(*run_ours(copy.deepcopy(joint), inputs, kwargs, budget_at_torch), joint, n_fwd)
            except ValueError:
                matched = None
        row["budgets"][budget] = {"ours": mine, "torch": theirs, "ours_at_torch_bytes": matched}
    return row


def print_table(rows):
    print("| blocks | ckpt | joint nodes | ours (s) | torch (s) | ours/torch | saved bytes ours / torch | recompute MFLOPs ours / torch |")
    print("|---:|:---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['blocks']} | {'yes' if r['checkpointed'] else 'no'} | {r['nodes']} | {r['ours_s']:.3f} | "
            f"{r['torch_s']:.3f} | {statistics.median(r['ratios']):.2f} | {r['ours'][0]} / {r['torch'][0]} | "
            f"{r['ours'][1] / 1e6:.2f} / {r['torch'][1] / 1e6:.2f} |"
        )
    print()
    print("| blocks | ckpt | budget | saved bytes ours / torch | recompute MFLOPs ours / torch | ours at torch's bytes (bytes, MFLOPs) |")
    print("|---:|:---:|---:|---:|---:|---:|")
    for r in rows:
        for budget, b in r["budgets"].items():
            o, t, m = b["ours"], b["torch"], b["ours_at_torch_bytes"]
            ours_f = f"{o[1] / 1e6:.2f}" if o[0] is not None else f"infeasible (min {o[1]})"
            match = f"{m[0]}, {m[1] / 1e6:.2f}" if m else "n/a"
            print(
                f"| {r['blocks']} | {'yes' if r['checkpointed'] else 'no'} | {budget} | {o[0]} / {t[0]} | "
                f"{ours_f} / {t[1] / 1e6:.2f} | {match} |"
            )


def write_svg(rows, path: Path):
    """Saved bytes (x) vs recompute FLOPs (y), ours (blue) and torch's (orange), one panel
    per case; a hand-written SVG so the benchmark needs no plotting library."""
    panels = [r for r in rows if r["ours"][0]]
    width, height, pad = 320, 240, 44
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(panels)}" height="{height + 30}" font-family="sans-serif" font-size="10">']
    for k, r in enumerate(panels):
        pts = {"ours": [r["ours"]], "torch": [r["torch"]]}
        for b in r["budgets"].values():
            if b["ours"][0] is not None:
                pts["ours"].append(b["ours"])
            pts["torch"].append(b["torch"])
        xs = [p[0] for v in pts.values() for p in v]
        ys = [p[1] for v in pts.values() for p in v]
        xmax, ymax = max(xs) or 1, max(ys) or 1
        ox = k * width

        def at(p):
            return ox + pad + p[0] / xmax * (width - 2 * pad), height - pad + 10 - p[1] / ymax * (height - 2 * pad)

        parts.append(f'<text x="{ox + pad}" y="14">{r["blocks"]} blocks, {"per-block checkpoint" if r["checkpointed"] else "no checkpoint"}</text>')
        parts.append(f'<line x1="{ox + pad}" y1="{height - pad + 10}" x2="{ox + width - pad}" y2="{height - pad + 10}" stroke="black"/>')
        parts.append(f'<line x1="{ox + pad}" y1="{pad - 10}" x2="{ox + pad}" y2="{height - pad + 10}" stroke="black"/>')
        parts.append(f'<text x="{ox + pad}" y="{height - pad + 24}">saved bytes (max {xmax})</text>')
        parts.append(f'<text x="{ox + 4}" y="{pad - 14}">recompute FLOPs (max {ymax / 1e6:.1f}M)</text>')
        for name, colour in (("ours", "#1f77b4"), ("torch", "#ff7f0e")):
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(at, sorted(pts[name])))
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}"/>')
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in map(at, pts[name]))
        parts.append(f'<text x="{ox + width - 120}" y="{pad}" fill="#1f77b4">ours</text><text x="{ox + width - 120}" y="{pad + 12}" fill="#ff7f0e">torch</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def bench_flow(blocks):
    """Time each networkx max-flow algorithm on the b=1 cut of the same problems."""
    import networkx.algorithms.flow as flow

    from ckpt_compile.passes import mincut

    for checkpointed in (False, True):
        joint, _, kwargs = joint_graph(blocks, checkpointed)
        problem = build_problem(joint, num_fwd_outputs=kwargs["num_fwd_outputs"]).problem
        for name in ("preflow_push", "boykov_kolmogorov", "dinitz", "edmonds_karp", "shortest_augmenting_path"):
            mincut.FLOW_FUNC = getattr(flow, name)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                cut = mincut.min_cut(problem)
                times.append(time.perf_counter() - start)
            print(f"{blocks} blocks ckpt={checkpointed} {name:26s} {statistics.median(times):.3f} s  saved={len(cut.saved)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flow", action="store_true", help="time networkx max-flow algorithms instead")
    parser.add_argument("--no-budgets", action="store_true", help="skip the memory-budget comparison (slow at 256 blocks)")
    parser.add_argument("--svg", type=Path, default=Path(__file__).with_name("partition_plot.svg"))
    args = parser.parse_args(argv)
    torch._inductor.config.force_disable_caches = True  # time partitioning, not cache hits
    if args.flow:
        for blocks in args.blocks:
            bench_flow(blocks)
        return
    rows = []
    for blocks in args.blocks:
        for checkpointed in (False, True):
            rows.append(bench_case(blocks, checkpointed, args.rounds, () if args.no_budgets else BUDGETS))
            print(f"done: {blocks} blocks ckpt={checkpointed}", file=sys.stderr, flush=True)
    print_table(rows)
    if not args.no_budgets:
        write_svg([r for r in rows if r["blocks"] == min(16, max(args.blocks))], args.svg)


if __name__ == "__main__":
    main()
