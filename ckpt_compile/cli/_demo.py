"""``python -m ckpt_compile demo``: a small GPT trained with and without checkpointing.

Eager (:func:`run_eager_demo`): no checkpointing, ``ckpt_compile.checkpoint`` per block, and
selective checkpointing that saves the matmuls. Compiled (:func:`run_compiled_demo`):
``torch.compile`` without checkpointing, ``torch.compile`` with ``torch.utils.checkpoint``,
and ``backend="ckpt"`` with ``ckpt_compile.checkpoint``; the last one writes its report,
which :func:`run_demo` prints and draws, then ends with a verdict computed from the tables.

Fair by construction: every variant trains the same model from the same seed on the same
batches; steps run interleaved (one step of each variant in turn) so machine load hits all
of them alike; step times are medians of the warm steps (the first step, which compiles or
warms the allocator, is reported on its own). Every compile runs cold: a fresh temporary
inductor cache folder for the whole demo and inductor's caches disabled for every variant.
By default the partitioned graphs run without code generation (``aot_eager`` for torch,
``inner="eager"`` for ours), which keeps the demo within a minute on a 2-core CPU;
``--compiler inductor`` generates code for all three (minutes: a cold inductor compile).
"""
from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import statistics
import tempfile
import time
import warnings
from typing import Callable, Iterable

import torch

import ckpt_compile as cc

# The one definition of the demo's memory figure, printed once above the tables. The
# report's "saved bytes" counts the same thing on the partitioned graph (the values its
# forward hands to its backward, graph inputs excluded).
SAVED_DEFINITION = ("saved activations = bytes autograd keeps for the backward after one forward "
                    "(distinct storages; parameters and the input batch excluded: they stay alive "
                    "anyway; selective checkpointing's cache included)")


# Dropout 0.1, GPT-2's and BERT's default. Every variant recomputes it exactly: eager
# checkpointing restores the RNG state, backend="ckpt" replays each dropout's saved RNG
# state (passes/rng_replay.py), torch's partitioner does the same, and inductor
# (--compiler inductor) recomputes its own seeded random numbers.
_DROPOUT = 0.1


class _TinyGPT(torch.nn.Module):
    def __init__(self, vocab: int, d_model: int, heads: int, blocks: int, seq: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Parameter(torch.zeros(seq, d_model))
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=_DROPOUT, batch_first=True, norm_first=True)
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


_SAVE_MATMULS = functools.partial(
    cc.create_selective_checkpoint_contexts, [torch.ops.aten.mm.default, torch.ops.aten.addmm.default])


def _variants():
    return {
        "no checkpointing": None,
        "ckpt_compile.checkpoint (non-reentrant)": functools.partial(cc.checkpoint, use_reentrant=False),
        "ckpt_compile.checkpoint (selective: save matmuls)": functools.partial(
            cc.checkpoint, use_reentrant=False, context_fn=_SAVE_MATMULS),
    }


def activation_bytes(forward: Callable[[], object], alive: Iterable[torch.Tensor]) -> int:
    """:data:`SAVED_DEFINITION`: bytes of the distinct storages autograd saves while
    ``forward()`` runs, less those of ``alive`` (parameters, inputs)."""
    from ckpt_compile.diagnostics._graph_stats import saved_storages

    storages = saved_storages(forward)
    excluded = {t.untyped_storage().data_ptr() for t in alive}
    return sum(n for ptr, n in storages.items() if ptr not in excluded)


class _Trainee:
    """One variant: a model (maybe compiled), its optimizer, its step times and loss."""

    def __init__(self, name: str, model: torch.nn.Module, run: Callable, vocab: int) -> None:
        self.name, self.model, self.run, self.vocab = name, model, run, vocab
        self.opt = torch.optim.SGD(model.parameters(), lr=0.05)
        self.times: list[float] = []
        self.loss = float("nan")
        # Its own random stream (dropout): steps of the variants interleave, and each must
        # draw what it would draw alone, so that final losses compare.
        self.rng = torch.get_rng_state()

    def step(self, batch: torch.Tensor) -> float:
        tokens, targets = batch[:, :-1], batch[:, 1:]
        torch.set_rng_state(self.rng)
        start = time.perf_counter()
        logits = self.run(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.times.append(time.perf_counter() - start)
        self.rng = torch.get_rng_state()
        self.loss = loss.item()
        return self.times[-1]

    def row(self, batch: torch.Tensor) -> dict:
        saved = activation_bytes(lambda: self.run(batch[:, :-1]), [*self.model.parameters(), batch])
        return {"variant": self.name, "saved_bytes": saved, "first_s": self.times[0],
                "step_s": statistics.median(self.times[1:]), "times": list(self.times), "loss": self.loss}


def _train_interleaved(trainees: list[_Trainee], data: torch.Tensor, first_step=None) -> None:
    """Step 0 of each variant alone (it compiles), then one step of each variant in turn."""
    for k, trainee in enumerate(trainees, 1):
        if first_step is not None:
            first_step(k, trainee, None)
        seconds = trainee.step(data[0])
        if first_step is not None:
            first_step(k, trainee, seconds)
    for step in range(1, data.shape[0]):
        for trainee in trainees:
            trainee.step(data[step])


def _print_rows(out, title: str, rows: list[dict], first_label: str) -> None:
    """One aligned table; saved bytes also as a share of the first row (the baseline)."""
    width = max(len(r["variant"]) for r in rows)
    out(title)
    out(f"{'variant':<{width}}  {'saved activations':>17}  {first_label:>10}  {'step time':>9}  {'final loss':>10}")
    for r in rows:
        ratio = f"({r['saved_bytes'] / rows[0]['saved_bytes']:.0%})" if rows[0]["saved_bytes"] else ""
        out(f"{r['variant']:<{width}}  {r['saved_bytes'] / 2**20:9.2f} MiB {ratio:>6}  {r['first_s']:9.1f}s  "
            f"{r['step_s'] * 1000:7.1f}ms  {r['loss']:10.6f}")


def _data(steps: int, vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (steps, batch, seq + 1), generator=torch.Generator().manual_seed(0))


def run_eager_demo(steps: int = 5, *, vocab: int = 256, d_model: int = 128, heads: int = 4,
                   blocks: int = 2, seq: int = 64, batch: int = 4, out=print) -> list[dict]:
    """Train the same model under each variant; print and return one row per variant."""
    data = _data(steps, vocab, batch, seq)
    trainees = []
    for name, region in _variants().items():
        torch.manual_seed(0)
        model = _TinyGPT(vocab, d_model, heads, blocks, seq)
        model.region = region
        trainees.append(_Trainee(name, model, model, vocab))
    _train_interleaved(trainees, data)
    rows = [t.row(data[0]) for t in trainees]
    _print_rows(out, f"Eager: {blocks}-block GPT (d_model {d_model}, seq {seq}, batch {batch}), "
                     f"{steps} SGD steps each", rows, "first step")
    return rows


def _compiled_variants(compiler: str, report_path: pathlib.Path) -> dict[str, tuple]:
    # compiler="eager": no codegen, the same graphs and partitions (aot_eager uses torch's
    # min-cut partitioner, as inductor does).
    torch_backend = "inductor" if compiler == "inductor" else "aot_eager"
    return {
        "torch.compile, no checkpointing": (None, {"backend": torch_backend}),
        "torch.compile + torch.utils.checkpoint": (
            functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False), {"backend": torch_backend}),
        'backend="ckpt" + ckpt_compile.checkpoint': (
            functools.partial(cc.checkpoint, use_reentrant=False),
            {"backend": cc.backend_with(inner=compiler, report=str(report_path))}),
    }


@contextlib.contextmanager
def cold_compile_caches():
    """Every compile inside runs cold: a fresh temporary inductor cache folder, and
    inductor's caches disabled (``backend="ckpt"`` with a report disables them anyway, so
    the other variants must too for compile times to compare)."""
    import torch._inductor.config as inductor_config

    saved_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="ckpt_compile_demo_cache_") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        try:
            with inductor_config.patch(force_disable_caches=True), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "dynamo_pgo force disabled")  # what we asked for
                yield
        finally:
            if saved_dir is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved_dir


def run_compiled_demo(steps: int, report_path: pathlib.Path, *, vocab: int = 256, d_model: int = 128,
                      heads: int = 4, blocks: int = 2, seq: int = 64, batch: int = 4,
                      compiler: str = "eager", out=print) -> list[dict]:
    """Train the model compiled three ways; print and return one row per variant.

    The first step compiles (timed on its own, caches cold); ``backend="ckpt"`` writes its
    report to ``report_path``. Saved bytes are measured after training, as in eager.
    """
    data = _data(steps, vocab, batch, seq)
    trainees = []
    # The backend appends to a report of the same options (a second run); this run's
    # report is its own.
    report_path.unlink(missing_ok=True)
    variants = _compiled_variants(compiler, report_path)
    for name, (region, compile_kwargs) in variants.items():
        torch.manual_seed(0)
        model = _TinyGPT(vocab, d_model, heads, blocks, seq)
        model.region = region
        trainees.append(_Trainee(name, model, torch.compile(model, **compile_kwargs), vocab))

    def progress(k, trainee, seconds):
        if seconds is None:
            out(f"  [{k}/{len(trainees)}] {trainee.name}: compiling (first step) ...")
        else:
            out(f"        compiled in {seconds:.1f} s")

    torch._dynamo.reset()
    with cold_compile_caches():
        _train_interleaved(trainees, data, progress)
        rows = [t.row(data[0]) for t in trainees]
    how = "inductor" if compiler == "inductor" else 'no code generation: aot_eager / inner="eager"'
    _print_rows(out, f"Compiled ({how}; caches cold): same model, {steps} SGD steps each", rows, "compile")
    return rows


def verdict(eager_rows: list[dict] | None, compiled_rows: list[dict]) -> list[str]:
    """The demo's conclusion, computed from its tables (rows as the run_* functions return).

    Step-time ratios are medians of per-step ratios over the warm steps: steps interleave,
    so each ratio compares steps run back to back, and load that comes and goes on a shared
    machine cancels out more than in a ratio of medians.
    """
    def step_ratio(row, base):
        return statistics.median(a / b for a, b in zip(row["times"][1:], base["times"][1:]))

    def share(row, base):
        return f"{row['saved_bytes'] / base['saved_bytes']:.0%} of the saved activations at " \
               f"{step_ratio(row, base):.2f}x the step time"

    lines = []
    if eager_rows:
        none, ours = eager_rows[0], eager_rows[1]
        lines.append(f"eager: ckpt_compile.checkpoint keeps {share(ours, none)} of no checkpointing; "
                     f"final loss {'equal' if ours['loss'] == none['loss'] else 'different'}")
    none, torch_ckpt, ours = compiled_rows
    lines.append(f'compiled: backend="ckpt" keeps {share(ours, none)} of torch.compile without '
                 f"checkpointing; torch.compile + torch.utils.checkpoint keeps {share(torch_ckpt, none)}")
    lines.append(f'backend="ckpt" against torch.compile + torch.utils.checkpoint: '
                 f"{ours['saved_bytes'] / torch_ckpt['saved_bytes']:.2f}x the saved activations, "
                 f"{step_ratio(ours, torch_ckpt):.2f}x the step time, "
                 f"{ours['first_s'] / torch_ckpt['first_s']:.2f}x the compile time")
    return lines


def run_demo(steps: int = 5, *, out_dir: str | os.PathLike | None = None, compiler: str = "eager",
             eager: bool = True, out=print, **sizes) -> pathlib.Path:
    """The whole demo: eager table, compiled table, the report of ``backend="ckpt"``
    (printed, and written with its picture to ``out_dir``, a new temp folder by default),
    then the verdict. Returns the folder."""
    from ckpt_compile.compile._explain import write_report_files

    folder = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(tempfile.mkdtemp(prefix="ckpt_compile_demo_"))
    folder.mkdir(parents=True, exist_ok=True)
    out(SAVED_DEFINITION + "; step time = median of the warm steps.")
    out("")
    eager_rows = None
    if eager:
        eager_rows = run_eager_demo(steps, out=out, **sizes)
        out("")
    out("Compiling three variants ...")
    compiled_rows = run_compiled_demo(steps, folder / "report.json", compiler=compiler, out=out, **sizes)
    report = cc.Report.read(folder / "report.json")
    out("")
    out('What backend="ckpt" decided ("no checkpointing": its partitioner on the same graph with '
        "the regions removed):")
    out(str(report))
    for path in write_report_files(report, folder):
        out(f"wrote {path}")
    out("")
    out("Verdict:")
    for line in verdict(eager_rows, compiled_rows):
        out("  " + line)
    return folder
