"""A failed step leaves nothing alive, and the next step is right (issue 17).

For each way of checkpointing, a fault is injected in the first block during one step: an
exception in the forward, a KeyboardInterrupt in the forward, an exception in the
recomputation (where the block runs again in the backward), an exception in a gradient hook
in the backward. After the next, clean step the live tensors and autograd nodes equal those
after a clean step, and that step's gradients equal plain autograd's on the unwrapped model.
Compiled: the fault sits between the two blocks (a graph break), and no user code runs in
its recomputation, so there is no recomputation fault to inject.
"""
from __future__ import annotations

import pytest
import torch

from leak_utils import RECOMPUTING, VARIANTS, build, failing_step, live, step

FAULTS = ("forward", "interrupt", "recompute", "hook")
_EXPECTED = {
    "forward": "InjectedFault: injected fault in the forward",
    "interrupt": "KeyboardInterrupt: injected interrupt in the forward",
    "recompute": "InjectedFault: injected fault in the recomputation",
    "hook": "InjectedFault: injected fault in a backward hook",
}
CASES = [
    pytest.param(variant, fault, id=f"{variant}-{fault}")
    for variant in VARIANTS
    for fault in FAULTS
    if fault != "recompute" or variant in RECOMPUTING
]


@pytest.mark.parametrize("variant, fault", CASES)
def test_failed_step_leaves_nothing_and_next_step_is_right(variant, fault):
    model, reference = build(variant)
    for _ in range(3):
        grads = step(model)
    clean = live()  # holding a step's grads, as below
    del grads

    raised = failing_step(model, fault)
    assert _EXPECTED[fault] in raised
    grads = step(model)

    # The counts are process-wide: in a whole-suite run, objects other tests left behind may be
    # freed meanwhile (seen: 37 fewer tensors), so what the failed step left is what exceeds
    # the clean count, in tensors or in nodes.
    after = live()
    assert after[0] <= clean[0] and after[1] <= clean[1], (
        f"{variant}, {fault}: live (tensors, autograd nodes) {after} > {clean} after a clean step")
    expected = step(reference)
    assert len(grads) == len(expected)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
