"""Step-peak estimates against the measured peak on the corpus: ours and torch's MemTracker.

Per model (``tests/compile_corpus.py`` at the "issue" sizes, plus a Hugging Face BERT) and
checkpoint variant, one AdamW training step (forward, loss, backward, ``step()``,
``zero_grad(set_to_none=True)``, after a first step so the optimizer's state exists):

- **measured**: ``cc.measure_memory`` on the real step (CPU profiler memory timeline; the
  peak of live tensor bytes, everything alive counted);
- **ours**: ``cc.estimate_memory`` (fake tensors), its error and wall time;
- **MemTracker**: ``torch.distributed._tools.mem_tracker.MemTracker`` (private torch API)
  on a copy of the model built under ``FakeTensorMode``, two steps, peak of the second
  (``reset_mod_stats()`` between them), its error and wall time (both steps).

    cd benchmarks && python memory.py            # all models, ~2 min on 2 cores
    python memory.py --models gpt,conv --wraps none,ckpt_checkpoint
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import torch

import ckpt_compile as cc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import compile_corpus  # noqa: E402  (the corpus lives with the tests that assert on it)
import memory_utils  # noqa: E402

MODELS = ("mlp", "gpt", "hf_gpt2", "hf_llama", "bert", "conv")
WRAPS = ("none", "ckpt_checkpoint", "selective")


def _build(name: str, wrap: str):
    if name == "bert":
        return memory_utils.build("bert", wrap)
    model, x = compile_corpus.build(name, wrap, "issue")
    return model, x.detach()


def _memtracker(name: str, wrap: str) -> tuple[int, float]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    start = time.perf_counter()
    with FakeTensorMode():
        model, x = _build(name, wrap)
        opt = torch.optim.AdamW(model.parameters())
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            for i in range(2):
                loss = model(x)
                loss.backward()
                del loss
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i == 0:
                    tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")
    seconds = time.perf_counter() - start
    return sum(snap["Total"] for snap in peak.values()), seconds


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--wraps", default=",".join(WRAPS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cc.estimate_memory(torch.nn.Linear(2, 1), torch.randn(1, 2), loss_fn=torch.sum)  # first-use imports
    header = ("model", "variant", "measured MiB", "ours MiB", "ours err", "ours s", "MemTracker MiB", "MT err", "MT s",
              "peak in (ours)")
    rows = []
    for name in args.models.split(","):
        for wrap in args.wraps.split(","):
            model, x = _build(name, wrap)
            start = time.perf_counter()
            ours = cc.estimate_memory(model, x, optimizer=torch.optim.AdamW)
            ours_s = time.perf_counter() - start
            real = memory_utils.measured(model, x, torch.optim.AdamW).peak_bytes
            try:
                theirs, theirs_s = _memtracker(name, wrap)
                mt = (_mib(theirs), f"{100 * (theirs / real - 1):+.2f}%", f"{theirs_s:.2f}")
            except Exception as e:  # noqa: BLE001 -- a row, not a crash
                mt = (f"{type(e).__name__}", "-", "-")
            where = ours.peak_phase + (f" at {ours.peak_module}" if ours.peak_module else "")
            rows.append((name, wrap, _mib(real), _mib(ours.peak_bytes), f"{100 * (ours.peak_bytes / real - 1):+.2f}%",
                         f"{ours_s:.2f}", *mt, where))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for k, row in enumerate((header, *rows)):
        print(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        if k == 0:
            print("-|-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
