"""What ``cc.plan(memory_budget=0.5)`` really keeps for the backward, on the corpus GPT (8
blocks) and MLP (6 blocks): bytes retained after the forward (torch.profiler's memory
timeline, parameters and inputs not counted, ``retained_after_forward`` in ``tests/compile_corpus.py``)
with no checkpointing and with the plan applied, next to the plan's own figures.

    python benchmarks/plan_retained.py

Issue 18's check: the planned model retains at most half of what no checkpointing retains.
Run it with an older checkout on ``PYTHONPATH`` to compare.
"""
from __future__ import annotations

import copy
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import ckpt_compile as cc  # noqa: E402
import compile_corpus as corpus  # noqa: E402

MiB = 2**20
CASES = {
    "GPT, 8 blocks (d_model 256, 4 heads, seq 128, batch 4)": ("gpt", dict(blocks=8, d=256, heads=4, seq=128, n=4)),
    "MLP, 6 blocks (d_model 256, batch 128)": ("mlp", dict(blocks=6, d=256, n=128)),
}


def main() -> int:
    print(f"ckpt_compile from {cc.__file__}")
    for label, (name, sizes) in CASES.items():
        corpus.SIZES[name]["bench"] = sizes
        model, x = corpus.build(name, "none", scale="bench")
        none = corpus.retained_after_forward(lambda: model(x))
        plan = cc.plan(model, x, memory_budget=0.5)
        planned = plan.apply(copy.deepcopy(model))
        kept = corpus.retained_after_forward(lambda: planned(x))
        print(f"{label}: retained after forward, no checkpoint {none / MiB:.2f} MiB, plan at 0.5 {kept / MiB:.2f} MiB "
              f"({kept / none:.3f} x); the plan's baseline {plan.baseline_saved_bytes / MiB:.2f} MiB, predicted "
              f"{plan.predicted_saved_bytes / MiB:.2f} MiB; {', '.join(r.choice for r in plan.blocks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
