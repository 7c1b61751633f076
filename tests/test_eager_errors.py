"""Restrictions, warnings and errors: same types and messages as torch.utils.checkpoint
where PyTorch's are the spec, clearer ones where we are stricter."""
import inspect
import warnings

import expecttest
import pytest
import torch
import torch.utils.checkpoint as tuc

import ckpt_compile as cc

IMPLS = {"ours": cc, "torch": tuc}
TORCH_HAS_RESPECT_HOOKS = "respect_saved_tensors_hooks" in inspect.signature(tuc.checkpoint).parameters


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda impl: impl.checkpoint(torch.sin, torch.ones(2, requires_grad=True), use_reentrant=True, foo=1, bar=2),
        lambda impl: impl.checkpoint(torch.sin, torch.ones(2, requires_grad=True), use_reentrant=True, debug=True),
        lambda impl: impl.checkpoint(
            torch.sin, torch.ones(2, requires_grad=True), use_reentrant=True,
            context_fn=lambda: (None, None),
        ),
        lambda impl: impl.checkpoint(torch.sin, torch.ones(2, requires_grad=True), use_reentrant=False,
                                     determinism_check="strict"),
    ],
    ids=["reentrant-kwargs", "reentrant-debug", "reentrant-context_fn", "bad-determinism_check"],
)
def test_argument_errors_match_torch(call):
    ours_type, ours_msg = _error(lambda: call(cc))
    torch_type, torch_msg = _error(lambda: call(tuc))
    assert ours_type is torch_type is ValueError
    # torch 2.14 reworded the reentrant restriction: ours follows the installed torch.
    if "determinism_check" in torch_msg:
        assert "'default', 'none'" in ours_msg and "strict" in ours_msg
    else:
        assert ours_msg == torch_msg


def test_reentrant_rejects_respect_saved_tensors_hooks_in_torch_2_14_words():
    def call(impl):
        return impl.checkpoint(torch.sin, torch.ones(2, requires_grad=True), use_reentrant=True,
                               respect_saved_tensors_hooks=False)

    ours_type, ours_msg = _error(lambda: call(cc))
    assert ours_type is ValueError
    assert ours_msg == (
        "Passing `context_fn`, `debug`, or `respect_saved_tensors_hooks` is only supported when "
        "use_reentrant=False."
    )
    if TORCH_HAS_RESPECT_HOOKS:
        assert (ours_type, ours_msg) == _error(lambda: call(tuc))


@pytest.mark.parametrize("api", ["checkpoint", "checkpoint_sequential"])
@pytest.mark.parametrize("value", ["no", 0, 1.0])
def test_use_reentrant_must_be_a_bool_or_none(api, value):
    # Stricter than torch, which takes any truthy value (even "no") as use_reentrant=True.
    x = torch.randn(2, 2, requires_grad=True)
    with pytest.raises(TypeError) as info:
        if api == "checkpoint":
            cc.checkpoint(torch.sin, x, use_reentrant=value)
        else:
            cc.checkpoint_sequential(torch.nn.Sequential(torch.nn.ReLU()), 1, x, use_reentrant=value)
    assert str(info.value) == (
        f"ckpt_compile.{api}: use_reentrant must be True, False or None, got {value!r} "
        f"({type(value).__name__})."
    )


@pytest.mark.parametrize("how", ["grad", "backward-inputs"])
def test_reentrant_rejects_grad_and_backward_inputs_like_torch(how):
    messages = {}
    for name, impl in IMPLS.items():
        x = torch.randn(3, requires_grad=True)
        y = impl.checkpoint(torch.sin, x, use_reentrant=True).sum()
        with pytest.raises(RuntimeError) as info:
            torch.autograd.grad(y, x) if how == "grad" else y.backward(inputs=[x])
        messages[name] = str(info.value)
    assert messages["ours"] == messages["torch"]
    assert "use_reentrant=False" in messages["ours"]


def test_reentrant_warns_when_no_input_requires_grad():
    lin = torch.nn.Linear(3, 3)
    for impl in IMPLS.values():
        with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True. Gradients will be None"):
            y = impl.checkpoint(lin, torch.randn(2, 3), use_reentrant=True)
        assert not y.requires_grad  # as in torch: the weights get no gradient this way


def test_reentrant_outputs_without_grad_error_like_torch():
    messages = {}
    for name, impl in IMPLS.items():
        x = torch.randn(3, requires_grad=True)
        y = impl.checkpoint(lambda t: t.detach().cos(), x, use_reentrant=True)
        with pytest.raises(RuntimeError) as info:
            y.sum().backward()
        messages[name] = str(info.value)
    assert messages["ours"] == messages["torch"]


def test_use_reentrant_none_warns_and_uses_reentrant():
    x = torch.randn(3, requires_grad=True)
    with pytest.warns(UserWarning, match="use_reentrant parameter should be passed explicitly"):
        y = cc.checkpoint(torch.sin, x)
    # The reentrant variant is one autograd Function node around the whole region.
    assert "Backward" in type(y.grad_fn).__name__ and "Sin" not in type(y.grad_fn).__name__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cc.checkpoint(torch.sin, x, use_reentrant=False)  # explicit: no warning


class TestDeterminismMessages(expecttest.TestCase):
    def test_metadata_mismatch_names_tensor_and_difference(self):
        calls = []

        def fn(t):
            calls.append(1)
            n = 4 if len(calls) == 1 else 2  # a region that changes between forward and recompute
            return t[:n].sin()

        x = torch.randn(6, requires_grad=True)
        y = cc.checkpoint(fn, x, use_reentrant=False)
        with self.assertRaises(cc.CheckpointError) as info:
            y.sum().backward()
        self.assertExpectedInline(str(info.exception).split("Tip:")[0], """\
ckpt_compile.checkpoint: Recomputed values for the following tensors have different metadata than during the forward pass.
tensor at position 0 (saved tensor #1 of the region):
saved metadata: shape=torch.Size([4]), dtype=torch.float32, device=cpu
recomputed metadata: shape=torch.Size([2]), dtype=torch.float32, device=cpu
differs in: shape torch.Size([4]) -> torch.Size([2])
""")

    def test_count_mismatch(self):
        calls = []

        def fn(t):
            calls.append(1)
            return t.sin().sin() if len(calls) == 1 else t.sin()

        x = torch.randn(3, requires_grad=True)
        y = cc.checkpoint(fn, x, use_reentrant=False, early_stop=False)
        with self.assertRaises(cc.CheckpointError) as info:
            y.sum().backward()
        self.assertExpectedInline(str(info.exception).split("Tip:")[0], """\
ckpt_compile.checkpoint: A different number of tensors was saved during the original forward and recomputation.
Number of tensors saved during forward: 2
Number of tensors saved during recomputation: 1.
""")


def test_determinism_check_none_skips_metadata_check():
    calls = []

    def fn(t):
        calls.append(1)
        return t.float().sin() if len(calls) == 1 else t.double().sin().float()

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(cc.CheckpointError, match="dtype torch.float32 -> torch.float64"):
        cc.checkpoint(fn, x, use_reentrant=False).sum().backward()
    calls.clear()
    cc.checkpoint(fn, x, use_reentrant=False, determinism_check="none").sum().backward()


def _flaky(t, state=[]):  # noqa: B006 - the counter is the point
    state.append(1)
    return t.sin().exp() if len(state) % 2 else t[:2].cos().exp()


@pytest.mark.parametrize("how", ["argument", "context"])
def test_debug_mode_prints_both_operator_traces(how):
    x = torch.randn(3, requires_grad=True)
    if how == "argument":
        y = cc.checkpoint(_flaky, x, use_reentrant=False, debug=True)
    else:
        with cc.set_checkpoint_debug_enabled(True):
            y = cc.checkpoint(_flaky, x, use_reentrant=False)
    with pytest.raises(cc.CheckpointError) as info:
        y.sum().backward()
    msg = str(info.value)
    forward, recompute = msg.split("Original forward")[1].split("Recomputation")
    assert "aten.sin.default" in forward and "aten.cos.default" not in forward
    assert "aten.cos.default" in recompute
    assert "test_eager_errors.py" in forward  # the user's source line of each operator
    assert msg.splitlines()[-1].startswith("First difference at operator #1: the forward ran aten.sin.default")


def _debug_error(impl, debug):
    calls = []

    def changes_on_recompute(t):
        calls.append(1)
        return t.sin().exp() if len(calls) == 1 else t[:2].cos().exp()

    y = impl.checkpoint(changes_on_recompute, torch.randn(3, requires_grad=True), use_reentrant=False, debug=debug)
    with pytest.raises(impl.CheckpointError) as info:
        y.sum().backward()
    return str(info.value)


def test_debug_error_explains_itself_like_torch_and_drops_the_debug_tip():
    torch_msg = _debug_error(tuc, debug=True)
    heading = next(line.strip() for line in torch_msg.splitlines() if "Detected non-determinism" in line)
    ours = _debug_error(cc, debug=True)
    assert heading in ours  # "ERROR: Detected non-determinism while running activation checkpointing"
    assert "You are seeing this error because" in torch_msg and "You are seeing this error because" in ours
    assert "debug=True" in ours.split("You are seeing this error because")[1]
    # The tip says "pass debug=True": pointless once it is on (torch drops it too).
    our_tip, torch_tip = "Tip: pass debug=True", "Tip: To see a more detailed error message"
    assert our_tip not in ours and torch_tip not in torch_msg
    assert our_tip in _debug_error(cc, debug=False) and torch_tip in _debug_error(tuc, debug=False)


def test_debug_is_incompatible_with_context_fn():
    for impl in IMPLS.values():
        with pytest.raises(ValueError, match="debug=True is incompatible with non-default context_fn"):
            impl.checkpoint(torch.sin, torch.ones(1, requires_grad=True), use_reentrant=False, debug=True,
                            context_fn=lambda: (torch.no_grad(), torch.no_grad()))


def test_forward_context_swallowing_an_exception_is_an_error():
    class Swallow:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return True

    def boom(t):
        raise KeyError("inside")

    with pytest.raises(RuntimeError, match="suppressed an exception"):
        cc.checkpoint(boom, torch.ones(1, requires_grad=True), use_reentrant=False,
                      context_fn=lambda: (Swallow(), Swallow()))
