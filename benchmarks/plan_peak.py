"""cc.plan(peak_memory=B) against full checkpointing ladders, at 3 step-peak budgets, one run.

Models: the corpus GPT (``tests/compile_corpus.py``: 6 blocks, d_model 256, seq 128, batch
4, tied head, vocab 256) and, with ``--hf``, Hugging Face GPT-2 (4 layers, hidden 256,
batch 4, seq 256, vocab 50257), trained with AdamW on the CPU. Budgets: 3 points between the
smallest feasible step peak (``cc.plan``'s error names it) and the no-checkpoint peak, both
estimated by ``cc.estimate_memory``. Rows per budget:

- ``plan``: ``cc.plan(model, x, peak_memory=B, optimizer=AdamW).apply(model)``;
- ``first n``: full checkpointing (``checkpoint_wrapper``) of the first n blocks, the
  fewest n whose measured peak fits;
- ``every k-th``: torchtitan's ladder, full checkpointing of every k-th block, the largest
  k whose measured peak fits.

Columns: step peak measured (``cc.measure_memory``'s CPU profiler memory timeline, one
step after a warm-up step, everything alive counted), recompute FLOPs (``FlopCounterMode``
over forward + backward minus the same with no checkpointing), step time (forward, loss,
backward, AdamW step; median over interleaved rounds) as a ratio to no checkpointing, and
planning time. With ``--compile``, also stock ``torch.compile`` (inductor) with
``torch._functorch.config.activation_memory_budget`` at the largest of the ratios 1.0, 0.8,
0.6, 0.4, 0.2, 0.1 whose measured peak fits (step time as a ratio to eager no
checkpointing; recompute FLOPs are not counted inside compiled graphs: "-"). Not run here
(yet): torch's ``sac_ilp`` pipeline.

    python benchmarks/plan_peak.py [--hf] [--compile] [--rounds 5]
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import re
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import ckpt_compile as cc  # noqa: E402
import compile_corpus  # noqa: E402
from memory_utils import measured  # noqa: E402

ADAMW = torch.optim.AdamW


def _models(hf: bool):
    torch.manual_seed(0)
    s = dict(blocks=6, d=256, heads=4, seq=128, n=4)
    yield "GPT 6x256", compile_corpus._model("gpt", s), compile_corpus._input("gpt", s).detach()
    if hf:
        import transformers

        config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=256, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        model = compile_corpus.HFCausalLM(transformers.GPT2LMHeadModel(config))
        yield "HF GPT-2 4x256", model, torch.randint(0, 50257, (4, 256), generator=torch.Generator().manual_seed(1))


def _flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _wrapped(model, indices):
    m = copy.deepcopy(model)
    for k in indices:
        m.blocks[k] = cc.checkpoint_wrapper(m.blocks[k])
    return m


def _step_times(models, x, rounds: int) -> list[float]:
    """Median step time per model, interleaved (A B C A B C ...)."""
    opts = [ADAMW(m.parameters()) for m in models]
    times = [[] for _ in models]
    for r in range(rounds + 1):
        for i, (m, opt) in enumerate(zip(models, opts)):
            t = time.perf_counter()
            m(x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


RATIOS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.1)


def _compiled(model, x, ratio: float):
    """Stock inductor at ``activation_memory_budget=ratio`` (set around the first call, which
    compiles: Dynamo does not guard on functorch's config)."""
    torch._dynamo.reset()
    m = torch.compile(copy.deepcopy(model))
    with torch._functorch.config.patch(activation_memory_budget=ratio):
        m(x).backward()
    m.zero_grad(set_to_none=True)
    return m


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", action="store_true", help="also Hugging Face GPT-2 (4 x 256, vocab 50257)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also torch.compile's activation_memory_budget")
    args = parser.parse_args(argv)
    for name, model, x in _models(args.hf):
        n = len(model.blocks)
        none_peak = cc.estimate_memory(model, x, optimizer=ADAMW).peak_bytes
        try:
            cc.plan(model, x, peak_memory=2, optimizer=ADAMW)
        except ValueError as e:
            low = int(re.search(r"\((\d+) bytes, estimated", str(e)).group(1))
        base_flops = _flops(copy.deepcopy(model), x)
        first = [(k, _wrapped(model, range(k))) for k in range(n + 1)]
        every = [(k, _wrapped(model, range(0, n, k))) for k in range(1, n + 1)]
        peaks = {id(m): measured(m, x, ADAMW).peak_bytes for _, m in first + every}
        compiled = [(r, _compiled(model, x, r)) for r in RATIOS] if args.compile else []
        peaks.update({id(m): measured(m, x, ADAMW).peak_bytes for _, m in compiled})
        print(f"\n{name}: no checkpoint {none_peak / 2**20:.1f} MiB estimated, smallest feasible {low / 2**20:.1f} MiB")
        print(f"{'budget':>10}  {'variant':<22}{'peak (measured)':>16}{'recompute GFLOP':>17}{'step time':>11}{'plan':>8}")
        for budget in (low + (none_peak - low) * i // 4 for i in (1, 2, 3)):
            t = time.perf_counter()
            plan = cc.plan(model, x, peak_memory=budget, optimizer=ADAMW)
            plan_s = time.perf_counter() - t
            rows = [("plan", plan.apply(copy.deepcopy(model)), f"{plan_s:.1f} s")]
            fit_first = next(((k, m) for k, m in first if peaks[id(m)] <= budget), None)
            fit_every = next(((k, m) for k, m in reversed(every) if peaks[id(m)] <= budget), None)
            if fit_first:
                rows.append((f"first {fit_first[0]} of {n} full", fit_first[1], ""))
            if fit_every:
                rows.append((f"every {fit_every[0]}-th full", fit_every[1], ""))
            fit_amb = next(((r, m) for r, m in compiled if peaks[id(m)] <= budget), None)
            if fit_amb:
                rows.append((f"torch.compile amb={fit_amb[0]}", fit_amb[1], ""))
            elif compiled:
                print(f"{budget / 2**20:>6.1f} MiB  torch.compile: no ratio in {RATIOS} fits")
            times = _step_times([copy.deepcopy(model)] + [m for _, m, _ in rows], x, args.rounds)
            for (label, m, planned), step in zip(rows, times[1:]):
                peak = peaks.get(id(m)) or measured(m, x, ADAMW).peak_bytes
                flops = "-" if label.startswith("torch.compile") else f"{(_flops(m, x) - base_flops) / 1e9:.2f}"
                print(f"{budget / 2**20:>6.1f} MiB  {label:<22}{peak / 2**20:>12.1f} MiB{flops:>17}"
                      f"{step / times[0]:>10.2f}x{planned:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
