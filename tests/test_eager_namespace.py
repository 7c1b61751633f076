"""The whole torch.utils.checkpoint namespace, used the way code written for torch uses it:
the helpers in its __all__, the decorator form and respect_saved_tensors_hooks (torch 2.14+),
each compared with torch on the same inputs where torch has it."""
import functools
import inspect
import warnings

import pytest
import torch
import torch.utils.checkpoint as tuc

import ckpt_compile as cc
from eager_utils import OpCounter

# torch 2.14 brought the decorator form and respect_saved_tensors_hooks together.
TORCH_HAS_DECORATOR = "respect_saved_tensors_hooks" in inspect.signature(tuc.checkpoint).parameters
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_every_name_of_torch_checkpoint_is_importable():
    missing = sorted(set(tuc.__all__) - set(cc.__all__))
    assert not missing
    for name in tuc.__all__:
        assert getattr(cc, name) is not None, name
    from ckpt_compile import detach_variable  # noqa: F401  (Megatron-style import)


# -- helpers ---------------------------------------------------------------------------


def test_detach_variable_matches_torch():
    leaf = torch.randn(3, requires_grad=True)
    inputs = (leaf * 2, torch.ones(2), 7, None, leaf)
    ours, theirs = cc.detach_variable(inputs), tuc.detach_variable(inputs)
    assert len(ours) == len(theirs)
    for a, b, original in zip(ours, theirs, inputs):
        if isinstance(b, torch.Tensor):
            assert a.grad_fn is None and a.requires_grad == b.requires_grad == original.requires_grad
            assert a.data_ptr() == original.data_ptr() and a is not original
        else:
            assert a is b
    errors = []
    for impl in (cc, tuc):
        with pytest.raises(RuntimeError) as info:
            impl.detach_variable([leaf])
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_check_backward_validity_warns_like_torch():
    messages = []
    for impl in (cc, tuc):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            impl.check_backward_validity((torch.ones(2), 3))
            impl.check_backward_validity((torch.ones(2, requires_grad=True),))
        messages.append([(w.category, str(w.message)) for w in caught])
    assert len(messages[0]) == 1 and messages[0] == messages[1]


def test_get_and_set_device_states_on_cpu_match_torch():
    args = (torch.ones(2), [torch.zeros(1), {"k": torch.ones(1, device="meta")}], 3)
    assert cc.get_device_states(*args) == tuc.get_device_states(*args) == ([], [])
    assert cc.set_device_states([], []) is None
    cc.set_device_states([0], [torch.zeros(1)], device_type="meta")  # meta: nothing to set


@cuda
def test_get_and_set_device_states_on_cuda_match_torch():
    x = torch.ones(2, device="cuda")
    ids, states = cc.get_device_states(x, [x])
    ref_ids, ref_states = tuc.get_device_states(x, [x])
    assert ids == ref_ids and all(torch.equal(a, b) for a, b in zip(states, ref_states))
    first = torch.rand(4, device="cuda")
    cc.set_device_states(ids[:1], states[:1], device_type="cuda")
    assert torch.equal(torch.rand(4, device="cuda"), first)


def _dropout_block(weight, t):
    return torch.nn.functional.dropout(t @ weight, 0.5).sin()


def test_checkpoint_function_is_the_reentrant_engine_with_torchs_results():
    weight, x0 = torch.randn(4, 4), torch.randn(3, 4)
    results = {}
    for name, impl in (("ours", cc), ("torch", tuc)):
        x = x0.clone().requires_grad_()
        torch.manual_seed(0)
        y = impl.CheckpointFunction.apply(functools.partial(_dropout_block, weight), True, x)
        y.sum().backward()
        results[name] = (y.detach(), x.grad, type(y.grad_fn).__name__)
    assert torch.equal(results["ours"][0], results["torch"][0])
    assert torch.equal(results["ours"][1], results["torch"][1])
    assert results["ours"][2] == results["torch"][2] == "CheckpointFunctionBackward"
    # checkpoint(use_reentrant=True) is that Function
    y = cc.checkpoint(torch.sin, torch.ones(2, requires_grad=True), use_reentrant=True)
    assert type(y.grad_fn).__name__ == "CheckpointFunctionBackward"


def _save_all(ctx, op, *args, **kwargs):
    return cc.CheckpointPolicy.MUST_SAVE


def _recomputed_sin_count(impl, context_factory):
    x = torch.randn(8, requires_grad=True)
    y = impl.checkpoint(lambda t: t.sin().exp(), x, use_reentrant=False, context_fn=context_factory)
    with OpCounter() as counter:
        y.sum().backward()
    return counter.counts["sin"]


def test_sac_ignored_ops_is_torchs_set_and_steers_our_cache():
    assert cc.SAC_IGNORED_OPS is tuc.SAC_IGNORED_OPS
    ours = functools.partial(cc.create_selective_checkpoint_contexts, _save_all)
    theirs = functools.partial(tuc.create_selective_checkpoint_contexts, _save_all)
    assert _recomputed_sin_count(cc, ours) == _recomputed_sin_count(tuc, theirs) == 0
    cc.SAC_IGNORED_OPS.add(torch.ops.aten.sin.default)  # never cached: rerun in backward
    try:
        assert _recomputed_sin_count(cc, ours) == _recomputed_sin_count(tuc, theirs) == 1
    finally:
        cc.SAC_IGNORED_OPS.discard(torch.ops.aten.sin.default)


# -- the decorator form ----------------------------------------------------------------


def _block(t, scale=1.0):
    return t.sin().exp() * scale


def _run_counting(fn, x, **kwargs):
    y = fn(x, **kwargs)
    with OpCounter() as counter:
        y.sum().backward()
    return y.detach(), x.grad, counter.counts["sin"]


def test_decorator_form_checkpoints_every_call_with_its_options():
    decorated = cc.checkpoint(use_reentrant=False)(_block)
    assert decorated.__name__ == "_block" and decorated.__wrapped__ is _block
    x, ref = torch.randn(5, requires_grad=True), torch.randn(5)
    ours = _run_counting(decorated, x, scale=2.0)  # fn's keywords go to fn
    xr = ref.copy_(x.detach()).requires_grad_()
    direct = _run_counting(lambda t, **kw: tuc.checkpoint(_block, t, use_reentrant=False, **kw), xr, scale=2.0)
    assert torch.equal(ours[0], direct[0]) and torch.equal(ours[1], direct[1])
    assert ours[2] == direct[2] == 1  # the region was recomputed, as torch's is
    if TORCH_HAS_DECORATOR:
        xt = torch.randn(5).copy_(x.detach()).requires_grad_()
        theirs = _run_counting(tuc.checkpoint(use_reentrant=False)(_block), xt, scale=2.0)
        assert ours[2] == theirs[2] and torch.equal(ours[1], theirs[1])


def test_decorator_form_on_a_method_binds_the_instance():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        @cc.checkpoint(use_reentrant=False)
        def forward(self, t):
            return self.lin(t).relu()

    layer = Layer()
    x = torch.randn(2, 4, requires_grad=True)
    layer(x).sum().backward()
    expected = torch.autograd.grad(layer.lin(x).relu().sum(), layer.lin.weight)[0]
    assert torch.allclose(layer.lin.weight.grad, expected)


def test_decorator_form_rejects_stray_keywords_and_warns_without_use_reentrant():
    with pytest.raises(ValueError) as ours:
        cc.checkpoint(use_reentrant=False, foo=1)
    if TORCH_HAS_DECORATOR:
        with pytest.raises(ValueError) as theirs:
            tuc.checkpoint(use_reentrant=False, foo=1)
        # torch's words first, then what is accepted (issue 22: say what was wrong and what is accepted)
        assert str(ours.value).startswith(str(theirs.value)) and "accepts only its options" in str(ours.value)
    with pytest.raises(TypeError, match="use_reentrant must be True, False or None, got 'no'"):
        cc.checkpoint(use_reentrant="no")
    decorated = cc.checkpoint()(_block)
    with pytest.warns(UserWarning, match="use_reentrant parameter should be passed explicitly") as record:
        decorated(torch.ones(2, requires_grad=True))
    assert record[0].filename == __file__  # points at the user's call


# -- respect_saved_tensors_hooks -------------------------------------------------------


class _Packer:
    """A user saved_tensors_hooks pair that records what it packs and unpacks."""

    def __init__(self):
        self.packed, self.unpacked = 0, 0

    def pack(self, t):
        self.packed += 1
        return ("boxed", t)

    def unpack(self, box):
        self.unpacked += 1
        return box[1]


def _sac_under_hooks(impl, respect, **extra):
    x = torch.randn(6, 6, requires_grad=True)
    context = functools.partial(impl.create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    packer = _Packer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autograd.graph.saved_tensors_hooks(packer.pack, packer.unpack):
            y = impl.checkpoint(lambda t: (t @ t).relu().sum(), x, use_reentrant=False, context_fn=context,
                                respect_saved_tensors_hooks=respect, **extra)
        y.backward()
    future = [w for w in caught if issubclass(w.category, FutureWarning)]
    return (packer.packed, packer.unpacked), x.grad, len(future)


@pytest.mark.parametrize("respect", [True, False, None])
def test_respect_saved_tensors_hooks_routes_the_selective_cache(respect):
    counts, grad, warned = _sac_under_hooks(cc, respect)
    x_grad_ref = None
    if TORCH_HAS_DECORATOR:
        ref_counts, x_grad_ref, ref_warned = _sac_under_hooks(tuc, respect)
        assert counts == ref_counts and warned == ref_warned
    # the region saves its input through autograd's hooks; with True also the cached mm
    assert counts == ((2, 2) if respect else (1, 1))
    assert warned == (1 if respect is None and TORCH_HAS_DECORATOR else 0)
    assert grad is not None and (x_grad_ref is None or grad.shape == x_grad_ref.shape)


def test_respect_saved_tensors_hooks_keeps_gradients_with_save_on_cpu():
    x = torch.randn(6, 6, requires_grad=True)
    context = functools.partial(cc.create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    with torch.autograd.graph.save_on_cpu():
        y = cc.checkpoint(lambda t: (t @ t).relu().sum(), x, use_reentrant=False, context_fn=context,
                          respect_saved_tensors_hooks=True)
    y.backward()
    expected = torch.autograd.grad((x @ x).relu().sum(), x)[0]
    assert torch.allclose(x.grad, expected)


def test_respect_saved_tensors_hooks_is_never_passed_to_the_function():
    def fn(t):  # takes no keyword: today's main handed it `respect_saved_tensors_hooks`
        return t.sin()

    x = torch.randn(3, requires_grad=True)
    for respect in (True, False, None):
        cc.checkpoint(fn, x, use_reentrant=False, respect_saved_tensors_hooks=respect).sum().backward()
    with pytest.raises(TypeError, match="respect_saved_tensors_hooks must be True, False or None"):
        cc.checkpoint(fn, x, use_reentrant=False, respect_saved_tensors_hooks="yes")


def test_respect_saved_tensors_hooks_with_torchs_selective_contexts():
    # torch 2.14+'s own selective mode routes through the user's hooks under our checkpoint
    # too; older torch's cannot, and asking for it is an error rather than ignored.
    x = torch.randn(6, 6, requires_grad=True)
    context = functools.partial(tuc.create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    packer = _Packer()

    def run():
        with torch.autograd.graph.saved_tensors_hooks(packer.pack, packer.unpack):
            return cc.checkpoint(lambda t: (t @ t).relu().sum(), x, use_reentrant=False, context_fn=context,
                                 respect_saved_tensors_hooks=True)

    if not TORCH_HAS_DECORATOR:
        with pytest.raises(ValueError, match="respect_saved_tensors_hooks=True needs a selective policy"):
            run()
        return
    run().backward()
    assert (packer.packed, packer.unpacked) == (2, 2)


def _nested_under_hooks(impl):
    x = torch.randn(6, 6, requires_grad=True)
    context = functools.partial(impl.create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])

    def inner(t):
        return (t @ t).relu()

    def outer(t):
        return impl.checkpoint(inner, t.sin(), use_reentrant=False, context_fn=context,
                               respect_saved_tensors_hooks=True).sum()

    packer = _Packer()
    with torch.autograd.graph.saved_tensors_hooks(packer.pack, packer.unpack):
        y = impl.checkpoint(outer, x, use_reentrant=False, early_stop=False)  # inner reruns too
        y.backward()
    ref = x.detach().requires_grad_()
    assert torch.allclose(x.grad, torch.autograd.grad(inner(ref.sin()).sum(), ref)[0])
    return packer.packed, packer.unpacked


def test_respect_saved_tensors_hooks_in_nested_regions_finds_the_users_hooks():
    # The inner region's cache goes through the user's hooks, never through the outer
    # region's own hooks, in the forward and when the outer region is recomputed.
    counts = _nested_under_hooks(cc)
    assert counts[0] >= counts[1] > 0  # the recomputed outer region caches the inner one again
    if TORCH_HAS_DECORATOR:
        assert counts == _nested_under_hooks(tuc)
