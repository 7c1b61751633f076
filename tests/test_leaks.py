"""Nothing lost over steps: each way of checkpointing keeps the same number of live tensors
and autograd nodes after step N as after step 10, as torch's equivalent does (issue 17: an
offload policy kept 3 tensors alive per region per step).

The figures (ours and torch's, after step 10 and after step N) print with ``-s``.
"""
from __future__ import annotations

import pytest

from leak_utils import VARIANTS, build, live, step

STEPS = 20


def _counts_over_steps(variant: str, side: str, **kwargs) -> dict[int, tuple[int, int]]:
    model, _ = build(variant, side, **kwargs)
    counts = {}
    for i in range(1, STEPS + 1):
        step(model)
        if i in (10, STEPS):
            counts[i] = live()
    return counts


@pytest.mark.parametrize("side", ["ours", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_live_objects_are_flat_over_steps(variant, side):
    counts = _counts_over_steps(variant, side)
    print(f"\n{variant} ({side}): (tensors, autograd nodes) after step 10 {counts[10]}, "
          f"after step {STEPS} {counts[STEPS]}")
    assert counts[STEPS] == counts[10], (
        f"{variant} ({side}): live (tensors, autograd nodes) went from {counts[10]} after "
        f"step 10 to {counts[STEPS]} after step {STEPS}"
    )


def test_compiled_with_inductor_is_flat_over_steps():
    counts = _counts_over_steps("compiled", "ours", inner="inductor")
    assert counts[STEPS] == counts[10]
