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
checkpointing; recompute FLOPs are not counted inside compiled graphs: "-"). Also per budget:

- ``torch sac_ilp``: torch's pipeline (``torch.distributed._tools``, needs the ``bench``
  extra: pulp, pwlf): MemTracker, RuntimeEstimator and SACEstimator on fake tensors over an
  AdamW step, ``aggregate_stats`` and ``sac_milp`` at the budget in GiB less the AdamW state
  (its memory model has parameters, gradients and activations only), then for each module it
  checkpoints ``get_optimal_checkpointing_policy_per_module`` (which ops to save in the share
  it keeps), applied as a selective checkpoint (``create_selective_checkpoint_contexts``) of
  that module, its op decisions matched to the ops of a real forward by name (HF GPT-2 runs
  a few other ops on fake tensors; those without a counterpart are recomputed). Both runtime estimators need CUDA: where they cannot run, the script prints
  their errors and the row is ``torch sac_ilp*``, the same pipeline with torch's roofline
  (``torch.utils._runtime_estimation``) fed this CPU's measured peak FLOP/s and bandwidth;
  plan time is the statistics (once per model) plus the ILPs;
- ``torchtitan op SAC``: torchtitan's selective op policy on every block: save the outputs
  of matmuls (on the CPU also addmm), SDPA and reduce-scatter, except every second matmul.
  Budget-blind: the same model at every budget.

A row whose measured peak is over its budget says ``: over``.

    python benchmarks/plan_peak.py [--hf] [--compile] [--rounds 5]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import functools
import io
import pathlib
import re
import statistics
import sys
import time
from unittest import mock

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as torch_checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
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



aten = torch.ops.aten
# torchtitan's selective op AC (torchtitan/distributed/activation_checkpoint.py, the
# `_save_list` policy): save the outputs of matmuls, attention and reduce-scatter, except
# every second matmul of a block, which is recomputed. On the CPU, nn.Linear with a bias
# (the corpus GPT) and HF's Conv1D (GPT-2) run as addmm and SDPA as its CPU flash kernel, so
# those count as the same ops; torchtitan's bias-free Linear runs as mm.
_TITAN_MM = {aten.mm.default, aten.addmm.default}
_TITAN_SAVE = _TITAN_MM | {
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def _titan_context():
    """One block's forward: a fresh matmul count (the policy runs in the forward only)."""
    mm_count = 0

    def policy(ctx, func, *args, **kwargs):
        nonlocal mm_count
        if func in _TITAN_MM:
            mm_count += 1
        save = func in _TITAN_SAVE and not (func in _TITAN_MM and mm_count % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _titan_op_sac(model):
    m = copy.deepcopy(model)
    for k in range(len(m.blocks)):
        m.blocks[k] = torch_checkpoint_wrapper(m.blocks[k], context_fn=_titan_context)
    return m


# torch's sac_ilp pipeline (torch.distributed._tools): MemTracker (memory per module),
# RuntimeEstimator (runtime per module), SACEstimator (per module, each op's bytes and
# runtime and the greedy discard/recompute trade-off, fitted by pwlf), aggregate_stats +
# parse_module_info, then sac_milp (PuLP/CBC: which modules to checkpoint and what share of
# their activations to discard, for a peak in GiB) and, per chosen module,
# get_optimal_checkpointing_policy_per_module (an op-level ILP: which ops to save within the
# kept share), applied as a selective checkpoint of that module.


def _torch_sac_blocker() -> str | None:
    """Why torch's runtime estimators cannot run on this machine, in their own words, or None.
    Both of SACEstimator's modes are asked for one mm under FakeTensorMode: inside the
    estimator the same exception aborts the process ("terminate called after throwing an
    instance of 'python_error'"), so it is probed outside."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator

    errors = []
    with FakeTensorMode() as fake_mode:
        RuntimeEstimator.fake_mode = fake_mode
        a, b = torch.randn(8, 8), torch.randn(8, 8)
        for mode, estimate in (("operator-level-cost-model", RuntimeEstimator._roofline_estimate),
                               ("operator-level-benchmark", RuntimeEstimator._benchmark_estimate)):
            try:
                estimate(aten.mm.default, (a, b), {})
            except Exception as e:  # noqa: BLE001 - quoted, whatever it is
                errors.append(f"{mode}: {type(e).__name__}: {e}")
    return "; ".join(errors) if len(errors) == 2 else None


@functools.cache
def _cpu_peaks() -> tuple[float, float]:
    """This machine's float32 matmul TFLOP/s and copy GB/s (best of 5), the two device
    numbers torch's roofline reads from CUDA (get_device_tflops, get_gpu_dram_gbps)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    big, out = torch.randn(2**24), torch.empty(2**24)
    flops, copy_ = [], []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        flops.append(2 * 1024**3 / (time.perf_counter() - t) / 1e12)
        t = time.perf_counter()
        out.copy_(big)
        copy_.append(2 * 4 * 2**24 / (time.perf_counter() - t) / 1e9)
    return max(flops), max(copy_)


def _cpu_roofline(func, args, kwargs):
    """torch's RuntimeEstimator._roofline_estimate (torch.utils._runtime_estimation's
    compute and transfer times, the larger of the two) with the device's peak FLOP/s and
    memory bandwidth measured on this CPU in place of the CUDA queries, and without the
    `torch.cuda.is_available()` assertion."""
    import torch.utils._runtime_estimation as rte

    kwargs = kwargs or {}
    out = func(*args, **kwargs)
    if func._overloadpacket in rte._IGNORE_OPS:
        return out, 0.0
    tflops, gbps = _cpu_peaks()
    flat_in, flat_out = torch.utils._pytree.tree_leaves((args, kwargs)), torch.utils._pytree.tree_leaves(out)
    dtypes = {t.dtype for t in flat_out if isinstance(t, torch.Tensor) and t.dtype in rte._FLOAT_TYPES}
    with mock.patch.object(rte, "get_device_tflops", lambda dtype: tflops), \
            mock.patch.object(rte, "get_gpu_dram_gbps", lambda: gbps):
        ns = max(rte.get_transfer_time(flat_in, flat_out),
                 rte.get_compute_time(func._overloadpacket, args, kwargs, out, dtypes))
    return out, ns / 1e6


class _TorchSAC:
    """The module statistics of torch's pipeline for one model, collected once (fake tensors,
    the AdamW step as in torch's test_sac_ilp.py), then ``plan(budget)`` per budget."""

    def __init__(self, model, x, estimate=None):
        import numpy as np
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed._tools.ilp_utils import (aggregate_stats, get_peak_memory_runtime_baseline,
                                                        parse_module_info)
        from torch.distributed._tools.mem_tracker import _MemRefType, _ModState, MemTracker
        from torch.distributed._tools.runtime_estimator import RuntimeEstimator
        from torch.distributed._tools.sac_estimator import SACEstimator

        from ckpt_compile.memory._estimate import _fake_state

        if estimate is _cpu_roofline:
            _cpu_peaks()  # measured here: under the fake mode below a matmul takes no time
        t = time.perf_counter()
        self.model, self.x = model, x
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = copy.deepcopy(model)
        with fake_mode, _fake_state(fake, fake_mode):
            fx = fake_mode.from_tensor(x)
            opt = ADAMW(fake.parameters())
            tracker = MemTracker()
            tracker.track_external(fake, opt)
            with tracker:
                for i in range(2):  # the first step makes the AdamW state
                    fake(fx).backward()
                    if i == 1:
                        last = tracker.get_tracker_snapshot("current")
                    opt.step()
                    opt.zero_grad()
                    if i == 0:
                        tracker.reset_mod_stats()
            for stats in tracker.memory_tracking.values():  # as torch's test: modules whose
                if _ModState.POST_BW not in stats.snapshots:  # post-backward hook did not fire
                    stats.snapshots.setdefault(_ModState.POST_BW, []).append(copy.deepcopy(last))
            self.opt_state = last[torch.device("cpu")][_MemRefType.OPT]
            runtime = RuntimeEstimator()
            runtime("operator-level-cost-model")
            sac = SACEstimator()
            sac("operator-level-cost-model")
            if estimate is not None:
                runtime._estimate = sac._estimate_runtime = estimate
            with contextlib.redirect_stdout(io.StringIO()), runtime:  # its exit prints a total
                fake(fx).backward()
                opt.step()
                opt.zero_grad()
            with sac:
                loss = fake(fx)
            loss.backward()
            np.random.seed(0)  # pwlf's fit (scipy's differential evolution) draws from numpy's global state
            info = aggregate_stats(fake, tracker, runtime, sac, torch.device("cpu"))
        self.graph = parse_module_info(info)
        self.baseline = get_peak_memory_runtime_baseline(self.graph)[0]
        self.sac_stats = sac.sac_mod_stats
        self.stats_s = time.perf_counter() - t

    def plan(self, budget: int):
        """sac_milp at ``budget`` less the AdamW state (its memory model counts parameters,
        gradients and activations only), then the per-module op policies; returns the
        checkpointed copy (None if the ILP finds no solution), its description and seconds
        (the solves; not the forward that aligns the op policies)."""
        from torch.distributed._tools.sac_ilp import get_optimal_checkpointing_policy_per_module, sac_milp

        t = time.perf_counter()
        decisions, _, ilp_peak = sac_milp(copy.deepcopy(self.graph), memory_budget=(budget - self.opt_state) / 2**30)
        if ilp_peak == -1:
            return None, "sac_milp: no solution", time.perf_counter() - t
        m = copy.deepcopy(self.model)
        states = []
        for fqn, discard in sorted(decisions.items()):
            stats = self.sac_stats[fqn]
            state = dict(names=stats.func_names, saves=get_optimal_checkpointing_policy_per_module(
                stats, memory_budget=1 - discard), real=[])
            states.append(state)
            name = fqn.partition(".")[2]  # drop the root's class name
            wrapped = torch_checkpoint_wrapper(m.get_submodule(name),
                                               context_fn=functools.partial(_indexed_context, state))
            if name:
                parent, _, leaf = name.rpartition(".")
                setattr(m.get_submodule(parent), leaf, wrapped)
            else:
                m = wrapped
        solve_s = time.perf_counter() - t
        m(self.x)  # records each checkpointed module's ops on real tensors
        unseen = sum(_align(state) for state in states)
        chosen = ", ".join(f"{fqn.partition('.')[2] or 'root'} {d:.2f}" for fqn, d in sorted(decisions.items()))
        chosen = f"{chosen or 'none'}; sac_milp's peak {ilp_peak / 2**20:.1f} MiB + AdamW state"
        if unseen:
            chosen += f"; {unseen} ops run on real tensors but not on fake ones (recomputed)"
        return m, chosen, solve_s


def _align(state) -> int:
    """Map the op decisions, made for the ops SACEstimator saw on fake tensors, onto the ops
    the module runs on real ones (HF GPT-2 takes other branches on fake tensors: its mask and
    SDPA code check values unless traced), by the longest matching runs of op names. Returns
    the number of real ops without a fake counterpart: they are recomputed."""
    real, state["real"] = state["real"], None
    saves = [0] * len(real)
    matcher = difflib.SequenceMatcher(a=state["names"], b=real, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        saves[b:b + size] = state["saves"][a:a + size]
    state["saves"] = saves
    return len(real) - sum(size for _, _, size in matcher.get_matching_blocks())


def _indexed_context(state):
    """A forward of a module torch's pipeline checkpoints. While ``state["real"]`` is a list,
    record the ops (SACEstimator's skipped ops not counted) and recompute them all; after
    ``_align``, save the i-th op where ``state["saves"][i]``."""
    from torch.distributed._tools.sac_estimator import OPS_TO_ALWAYS_SKIP

    i = 0

    def policy(ctx, func, *args, **kwargs):
        nonlocal i
        if func in OPS_TO_ALWAYS_SKIP:
            return CheckpointPolicy.PREFER_RECOMPUTE
        if state["real"] is not None:
            state["real"].append(func._overloadpacket.__name__)
            return CheckpointPolicy.PREFER_RECOMPUTE
        i += 1
        return CheckpointPolicy.MUST_SAVE if state["saves"][i - 1] else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


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
        titan = _titan_op_sac(model)
        peaks[id(titan)] = measured(titan, x, ADAMW).peak_bytes
        print(f"\n{name}: no checkpoint {none_peak / 2**20:.1f} MiB estimated, smallest feasible {low / 2**20:.1f} MiB")
        blocker = _torch_sac_blocker()
        if blocker:
            tflops, gbps = _cpu_peaks()
            print(f"torch sac_ilp as shipped: cannot run on this CPU ({blocker}). torch sac_ilp* below: "
                  f"the same pipeline with torch's roofline fed this CPU's peaks ({tflops:.2f} TFLOP/s, {gbps:.1f} GB/s)")
        sac = _TorchSAC(model, x, _cpu_roofline if blocker else None)
        sac_label = "torch sac_ilp*" if blocker else "torch sac_ilp"
        print(f"{sac_label}: statistics {sac.stats_s:.1f} s; its no-checkpoint peak (parameters, gradients, "
              f"activations) {sac.baseline / 2**20:.1f} MiB, + AdamW state {sac.opt_state / 2**20:.1f} MiB "
              f"(MemTracker), which sac_milp leaves out: it is given the budget less that state")
        print(f"{'budget':>10}  {'variant':<26}{'peak (measured)':>16}{'recompute GFLOP':>17}{'step time':>11}{'plan':>8}")
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
            sac_model, sac_chose, sac_s = sac.plan(budget)
            if sac_model is not None:
                rows.append((sac_label, sac_model, f"{sac.stats_s + sac_s:.1f} s"))
            else:
                print(f"{budget / 2**20:>6.1f} MiB  {sac_label}: {sac_chose}")
            rows.append(("torchtitan op SAC", titan, ""))
            times = _step_times([copy.deepcopy(model)] + [m for _, m, _ in rows], x, args.rounds)
            for (label, m, planned), step in zip(rows, times[1:]):
                peak = peaks.get(id(m)) or measured(m, x, ADAMW).peak_bytes
                flops = "-" if label.startswith("torch.compile") else f"{(_flops(m, x) - base_flops) / 1e9:.2f}"
                label = label if peak <= budget else f"{label}: over"
                print(f"{budget / 2**20:>6.1f} MiB  {label:<26}{peak / 2**20:>12.1f} MiB{flops:>17}"
                      f"{step / times[0]:>10.2f}x{planned:>8}")
            if sac_model is not None:
                print(f"{'':>12}{sac_label} checkpoints (module, share of activations discarded): {sac_chose}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
