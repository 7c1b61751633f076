"""``python -m ckpt_compile demo``: a small model trained with and without checkpointing.

Eager (:func:`run_eager_demo`): the activation bytes autograd saved for backward, the
median step time and the final loss (identical: dropout is replayed exactly in the
recomputation). Compiled (:func:`run_compiled_demo`): the same model under
``torch.compile`` without checkpointing, ``torch.compile`` with
``torch.utils.checkpoint``, and ``backend="ckpt"``, with compile time; the last one writes
its report, which :func:`run_demo` prints and draws into a folder.
"""
from __future__ import annotations

import functools
import os
import pathlib
import statistics
import tempfile
import time

import torch

import ckpt_compile as cc
from ckpt_compile.diagnostics._graph_stats import saved_tensor_bytes


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


_SAVE_MATMULS = functools.partial(
    cc.create_selective_checkpoint_contexts, [torch.ops.aten.mm.default, torch.ops.aten.addmm.default])


def _variants():
    return {
        "no checkpointing": None,
        "ckpt_compile.checkpoint (non-reentrant)": functools.partial(cc.checkpoint, use_reentrant=False),
        "ckpt_compile.checkpoint (selective: save matmuls)": functools.partial(
            cc.checkpoint, use_reentrant=False, context_fn=_SAVE_MATMULS),
    }


def _train(model, opt, data: torch.Tensor, vocab: int, after_first=None) -> tuple[list[float], torch.Tensor]:
    """One SGD step per batch of ``data`` (next-token loss); step times and the last loss."""
    times, loss = [], None
    for step in range(data.shape[0]):
        tokens, targets = data[step, :, :-1], data[step, :, 1:]
        start = time.perf_counter()
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        if step == 0 and after_first is not None:
            after_first(times[0])
    return times, loss


def _print_rows(out, title: str, rows: list[dict]) -> None:
    """One aligned table; saved bytes also as a share of the first row (the baseline)."""
    width = max(len(r["variant"]) for r in rows)
    timed = "compile_s" in rows[0]
    out(title)
    out(f"{'variant':<{width}}  {'saved activations':>17}  " + (f"{'first step':>10}  " if timed else "")
        + f"{'step time':>9}  {'final loss':>10}")
    for r in rows:
        ratio = f"({r['saved_bytes'] / rows[0]['saved_bytes']:.0%})"
        first = f"{r['compile_s']:9.1f}s  " if timed else ""
        out(f"{r['variant']:<{width}}  {r['saved_bytes'] / 2**20:9.2f} MiB {ratio:>6}  {first}"
            f"{r['step_s'] * 1000:7.1f}ms  {r['loss']:10.6f}")


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
        saved = saved_tensor_bytes(lambda: model(data[0, :, :-1]))
        times, loss = _train(model, opt, data, vocab)
        rows.append({"variant": name, "saved_bytes": saved, "step_s": statistics.median(times), "loss": loss.item()})
    _print_rows(out, f"Eager: {blocks}-block GPT (d_model {d_model}, seq {seq}, batch {batch}), "
                     f"{steps} SGD steps each", rows)
    return rows


def _compiled_variants(compiler: str, report_path: pathlib.Path) -> dict[str, tuple]:
    # compiler="eager" (tests, quick looks): no codegen, the same graphs and partitions.
    torch_backend = "inductor" if compiler == "inductor" else "aot_eager"
    return {
        "torch.compile, no checkpointing": (None, {"backend": torch_backend}),
        "torch.compile + torch.utils.checkpoint": (
            functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False), {"backend": torch_backend}),
        'backend="ckpt" + ckpt_compile.checkpoint': (
            functools.partial(cc.checkpoint, use_reentrant=False),
            {"backend": "ckpt", "options": {"inner": compiler, "report": str(report_path)}}),
    }


def run_compiled_demo(steps: int, report_path: pathlib.Path, *, vocab: int = 256, d_model: int = 128,
                      heads: int = 4, blocks: int = 4, seq: int = 64, batch: int = 8,
                      compiler: str = "inductor", out=print) -> list[dict]:
    """Train the model compiled three ways; print and return one row per variant.

    The first step compiles (timed on its own); ``backend="ckpt"`` writes its report to
    ``report_path``. Saved bytes are counted with a saved-tensors hook after training.
    """
    from ckpt_compile.diagnostics._graph_stats import saved_tensor_bytes

    rows = []
    data = torch.randint(0, vocab, (steps, batch, seq + 1), generator=torch.Generator().manual_seed(0))
    variants = _compiled_variants(compiler, report_path)
    for k, (name, (region, compile_kwargs)) in enumerate(variants.items(), 1):
        torch.manual_seed(0)
        model = _TinyGPT(vocab, d_model, heads, blocks, seq)
        model.region = region
        compiled = torch.compile(model, **compile_kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        out(f"  [{k}/{len(variants)}] {name}: compiling (first step) ...")
        times, loss = _train(compiled, opt, data, vocab, after_first=lambda seconds: out(
            f"        compiled in {seconds:.1f} s; training {steps - 1} more step(s)"))
        saved = saved_tensor_bytes(lambda: compiled(data[0, :, :-1]))
        rows.append({"variant": name, "saved_bytes": saved, "compile_s": times[0],
                     "step_s": statistics.median(times[1:] or times), "loss": loss.item()})
    _print_rows(out, f"Compiled ({compiler}): same model, {steps} SGD steps each", rows)
    return rows


def run_demo(steps: int = 5, *, out_dir: str | os.PathLike | None = None, compiler: str = "inductor",
             eager: bool = True, out=print, **sizes) -> pathlib.Path:
    """The whole demo: eager table, compiled table, then the report of ``backend="ckpt"``
    (printed, and written with its picture to ``out_dir``, a new temp folder by default).
    Returns the folder."""
    from ckpt_compile.compile._explain import write_report_files
    from ckpt_compile.diagnostics._report import Report

    folder = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(tempfile.mkdtemp(prefix="ckpt_compile_demo_"))
    folder.mkdir(parents=True, exist_ok=True)
    if eager:
        run_eager_demo(steps, out=out, **sizes)
        out("")
    out("Compiling three variants (a minute or two on a small CPU) ...")
    run_compiled_demo(steps, folder / "report.json", compiler=compiler, out=out, **sizes)
    report = Report.read(folder / "report.json")
    out("")
    out(str(report))
    for path in write_report_files(report, folder):
        out(f"wrote {path}")
    return folder
