"""cc.plan against the other ways to fit a memory budget, measured in the same run.

A GPT-style model (embedding + positions, 8 ``nn.TransformerEncoderLayer`` blocks from
``_transformer.py`` (ffn 4x, dropout 0.1), final LayerNorm, LM head; d_model 256, seq 128,
batch 4 by default, CPU), trained with a cross-entropy loss. Budgets are fractions of the
activation bytes the model saves for backward with no checkpointing (eager), the meaning of
``memory_budget`` everywhere. Rows per budget:

- ``plan (eager)``: ``cc.plan(model, ids, memory_budget=b).apply(model)``;
- ``plan + backend=ckpt``: the same planned model under ``torch.compile(backend="ckpt")``;
- ``uniform every k-th``: torchtitan-style full checkpointing of every k-th block, the
  fewest checkpointed blocks whose bytes fit the same budget;
- ``ckptplan``: PyPI ``ckptplan`` (per-block full-or-nothing), or why it could not run;
- ``torch.compile amb``: stock inductor with ``torch._functorch.config.activation_memory_budget=b``;
- ``backend=ckpt mb``: ``torch.compile(backend="ckpt", options={"memory_budget": b})``.

Columns: saved bytes (measured: what one forward leaves allocated for the backward, less
its output, from ``torch.profiler``'s memory timeline: activations only, parameters and the
input are alive before it; selective checkpointing's cache and the RNG states checkpoints
stash included);
recompute FLOPs (eager rows: ``FlopCounterMode`` over forward + backward minus the same
with no checkpointing; compiled rows: forward work repeated in the backward graph, from
the partition, ``torch.utils.flop_counter`` formulas); step time (forward + loss +
backward, median over interleaved rounds); planning / compile time (first call; a fresh
inductor cache folder per run, so nothing is reused from an earlier run).

    python benchmarks/plan.py --rounds 3
    python benchmarks/plan.py --blocks 4 --d-model 128 --seq 64 --rounds 3 --budgets 0.5
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
import time

# A fresh inductor cache per run (set before torch reads it): no stale partition is reused.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_plan_inductor_")

import torch  # noqa: E402
from torch import nn
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import ckpt_compile as cc  # noqa: E402
from _transformer import make_model, size_arguments  # noqa: E402


class GPT(nn.Module):
    def __init__(self, blocks: int, d_model: int, heads: int, seq: int, vocab: int) -> None:
        super().__init__()
        self.layers = make_model(blocks, d_model, heads)  # seeds itself
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def loss_fn(model, ids):
    logits = model(ids)
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())


def flops_of_step(model, ids) -> int:
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, ids).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def retained_bytes(forward) -> int:
    """Bytes ``forward()`` leaves allocated on the CPU, less its output (torch.profiler's
    memory timeline; tensors alive before the call are taken off). The same measure as
    ``retained_after_forward`` in ``tests/compile_corpus.py``, eager and compiled rows alike."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        out = forward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return sum(sizes[-1]) - sum(sizes[0]) - out.untyped_storage().nbytes()


def checkpoint_blocks(model, indices):
    for i in indices:
        model.layers[i] = cc.checkpoint_wrapper(model.layers[i])
    return model


# ---------------------------------------------------------------- compiled rows


class _RecordingPartitioner:
    """Stock torch's min-cut partitioner at an ``activation_memory_budget``, recording the
    partition's figures (inductor keeps everything else)."""

    def __new__(cls, budget):
        from torch._inductor.custom_graph_pass import CustomPartitionerFn

        class Recording(CustomPartitionerFn):
            def __init__(self):
                self.figures = []

            def __call__(self, gm, joint_inputs, **kwargs):
                from torch._functorch.partitioners import min_cut_rematerialization_partition

                from ckpt_compile.diagnostics._graph_stats import partition_figures

                with torch._functorch.config.patch(activation_memory_budget=budget):
                    fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
                self.figures.append(partition_figures(fw, bw, kwargs["num_fwd_outputs"]))
                return fw, bw

            def uuid(self):
                return f"bench-amb-{budget}-{time.time_ns()}"

        return Recording()


def compile_row(model, ids, kind, budget):
    """(step function, compile seconds, recompute FLOPs) of one compiled variant."""
    report = None
    if kind == "amb":
        recorder = _RecordingPartitioner(budget)
        fn = torch.compile(model, options={"custom_partitioner_fn": recorder})
    else:
        report = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
        options = {"report": report}
        if kind == "mb":
            options["memory_budget"] = budget
        fn = torch.compile(model, backend="ckpt", options=options)
    start = time.perf_counter()
    loss_fn(fn, ids).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    if kind == "amb":
        flops = sum(f["recompute_flops"] for f in recorder.figures)
    else:
        with open(report) as f:
            flops = json.load(f)["recompute_flops"]
        os.unlink(report)
    return fn, seconds, flops


def ckptplan_row(model, ids, budget_bytes):
    """PyPI ckptplan's plan, or the reason it cannot run here."""
    try:
        import ckptplan
    except ImportError as e:
        return None, f"not installed ({e}); pip install ckptplan (needs torch<2.14)"
    try:
        blocks = ckptplan.declare_blocks(model, [(f"layers.{i}", b) for i, b in enumerate(model.layers)])
        # ckptplan profiles blocks with their own inputs: the embedding output.
        with torch.no_grad():
            x = model.embed(ids) + model.pos[: ids.shape[1]]
        start = time.perf_counter()
        profiles = ckptplan.profile_blocks(blocks, (x,), device=ids.device)
        plan = ckptplan.plan_checkpoints(profiles, blocks, target_kind="activation_budget_bytes", target_value=budget_bytes)
        seconds = time.perf_counter() - start
        return (plan, seconds), None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"{type(e).__name__}: {first.split(';')[0]}"


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = size_arguments(__doc__)
    p.set_defaults(d_model=256, heads=4, seq=128, batch=4, rounds=3)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--skip-compile", action="store_true", help="eager rows only")
    args = p.parse_args(argv)
    # Every compiled row is the same GPT.forward code object: keep them all compiled.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    torch.manual_seed(0)
    base = GPT(args.blocks, args.d_model, args.heads, args.seq, args.vocab)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    baseline_bytes = retained_bytes(lambda: base(ids))
    baseline_flops = flops_of_step(copy.deepcopy(base), ids)
    print(f"GPT: {args.blocks} blocks, d_model {args.d_model}, seq {args.seq}, batch {args.batch}; "
          f"no checkpointing saves {baseline_bytes / 2**20:.2f} MiB; torch {torch.__version__}", flush=True)
    cc.plan(copy.deepcopy(base), ids, memory_budget=1.0)  # warm-up: first-use imports are not planning

    rows = []  # dicts: budget, name, step fn, bytes, flops, plan_s, compile_s, note
    for budget in args.budgets:
        limit = int(budget * baseline_bytes)
        start = time.perf_counter()
        plan = cc.plan(base, ids, memory_budget=budget)
        plan_s = time.perf_counter() - start
        planned = plan.apply(copy.deepcopy(base))
        row = dict(budget=budget, name="plan (eager)", model=planned, fn=planned, plan_s=plan_s,
                   note=", ".join(f"{c} x{n}" for c, n in _counts(plan)), predicted=plan.predicted_saved_bytes)
        rows.append(row)

        uniform = None
        for stride in range(args.blocks, 0, -1):  # every k-th block, fewest blocks first
            chosen = list(range(stride - 1, args.blocks, stride))
            trial = checkpoint_blocks(copy.deepcopy(base), chosen)
            if retained_bytes(lambda: trial(ids)) <= limit:
                uniform = (trial, stride, chosen)
                break
        if uniform is None:
            trial = checkpoint_blocks(copy.deepcopy(base), range(args.blocks))
            rows.append(dict(budget=budget, name="uniform every k-th", model=trial, fn=trial,
                             note="does not fit even with every block checkpointed"))
        else:
            trial, stride, chosen = uniform
            rows.append(dict(budget=budget, name="uniform every k-th", model=trial, fn=trial,
                             note=f"k={stride}: {len(chosen)} blocks"))

        result, why = ckptplan_row(copy.deepcopy(base), ids, limit)
        if result is None:
            rows.append(dict(budget=budget, name="ckptplan", note=why))
        else:
            cp, seconds = result
            chosen = [i for i, d in enumerate(cp.decisions) if d.checkpointed]
            trial = checkpoint_blocks(copy.deepcopy(base), chosen)
            rows.append(dict(budget=budget, name="ckptplan", model=trial, fn=trial, plan_s=seconds,
                             note=f"{len(chosen)} blocks full"))

        if not args.skip_compile:
            for name, kind, model in (("plan + backend=ckpt", "plan", plan.apply(copy.deepcopy(base))),
                                      ("torch.compile amb", "amb", copy.deepcopy(base)),
                                      ("backend=ckpt mb", "mb", copy.deepcopy(base))):
                fn, seconds, flops = compile_row(model, ids, kind, budget)
                extra = {"plan_s": plan_s} if kind == "plan" else {}
                rows.append(dict(budget=budget, name=name, model=model, fn=fn, compile_s=seconds, flops=flops, **extra))
                print(f"  compiled {name} at {budget}: {seconds:.1f} s", flush=True)

    for row in rows:
        if "fn" not in row:
            continue
        row["bytes"] = retained_bytes(lambda: row["fn"](ids))
        if "flops" not in row:
            row["flops"] = flops_of_step(row["model"], ids) - baseline_flops
    # Step times: every variant once per round, rounds interleaved.
    timed = [row for row in rows if "fn" in row]
    times = {id(row): [] for row in timed}
    for _ in range(args.rounds):
        for row in timed:
            row["model"].zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss_fn(row["fn"], ids).backward()
            times[id(row)].append(time.perf_counter() - start)
    for row in timed:
        row["step_ms"] = 1000 * statistics.median(times[id(row)])

    _print(rows, baseline_bytes, args)
    _targets(rows, base, ids, baseline_bytes)
    return 0


def _counts(plan):
    from collections import Counter

    return Counter(r.choice for r in plan.blocks).most_common()


def _print(rows, baseline_bytes, args):
    header = ("budget", "variant", "saved MiB", "of none", "recompute GFLOP", "step ms", "plan s", "compile s", "what")
    table = []
    for r in rows:
        table.append((
            f"{r['budget']:g}", r["name"],
            f"{r['bytes'] / 2**20:.2f}" if "bytes" in r else "-",
            f"{r['bytes'] / baseline_bytes:.3f}" if "bytes" in r else "-",
            f"{r['flops'] / 1e9:.3f}" if "flops" in r else "-",
            f"{r['step_ms']:.0f}" if "step_ms" in r else "-",
            f"{r['plan_s']:.2f}" if "plan_s" in r else "-",
            f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
            r.get("note", ""),
        ))
    widths = [max(len(str(x[i])) for x in [header, *table]) for i in range(len(header))]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for line in table:
        print(" | ".join(str(v).ljust(w) for v, w in zip(line, widths)))


def _targets(rows, base, ids, baseline_bytes):
    print("\nTargets (printed, not asserted):")
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        at = [r for r in rows if r["budget"] == budget and "bytes" in r]
        ours = next(r for r in at if r["name"] == "plan (eager)")
        limit = int(budget * baseline_bytes)
        others = [r for r in at if r["name"] in ("uniform every k-th", "ckptplan") and r["bytes"] <= limit]
        fewest = all(ours["flops"] <= r["flops"] for r in others)
        print(f"  {budget:g}: plan bytes {ours['bytes']} <= budget {limit}: {ours['bytes'] <= limit}; "
              f"predicted {ours['predicted']} = measured: {ours['predicted'] == ours['bytes']}; "
              f"fewest recompute FLOPs of the eager rows that fit: {fewest}; planning {ours['plan_s']:.2f} s <= 5 s: {ours['plan_s'] <= 5}")
        ckpt = next((r for r in at if r["name"] == "backend=ckpt mb"), None)
        if ckpt is not None:
            try:
                same = cc.plan(base, ids, memory_budget=max(int(ckpt["bytes"]), 1))
                ratio = same.predicted_recompute_flops / ckpt["flops"] if ckpt["flops"] else float("inf")
                print(f"      eager plan at backend=ckpt's {ckpt['bytes'] / 2**20:.2f} MiB: {same.predicted_recompute_flops / 1e9:.3f} "
                      f"GFLOP vs backend=ckpt {ckpt['flops'] / 1e9:.3f} GFLOP (ratio {ratio:.2f}; target <= 1.10)")
            except ValueError as e:
                print(f"      eager plan cannot reach backend=ckpt's {ckpt['bytes'] / 2**20:.2f} MiB: {str(e).split(';')[-1].strip()}")


if __name__ == "__main__":
    sys.exit(main())
