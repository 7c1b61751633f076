"""ckpt_compile.checkpoint against torch.utils.checkpoint on the same inputs: exact gradients."""
import contextlib
import copy

import pytest
import torch
import torch.utils.checkpoint as tuc

import ckpt_compile as cc
from eager_utils import OpCounter, assert_all_equal, grads_of, mlp

IMPLS = {"ours": cc, "torch": tuc}


def _block():
    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)


def _run(impl, model, x, reentrant, seed=1, **kw):
    model.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(seed)
    y = impl.checkpoint(model, x, use_reentrant=reentrant, **kw)
    y.pow(2).sum().backward()
    return [y.detach()] + grads_of(model, x)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("make", [lambda: mlp(16, 3, 0.2), _block], ids=["mlp", "transformer"])
def test_gradients_equal_torch_and_no_checkpoint(make, reentrant):
    model = make()
    x = torch.randn(2, 8, 16 if isinstance(model, torch.nn.Sequential) else 32, requires_grad=True)
    ours = _run(cc, model, x, reentrant)
    theirs = _run(tuc, model, x, reentrant)
    assert_all_equal(ours, theirs)
    # And both equal the model run without checkpointing, dropout included.
    model.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(1)
    y = model(x)
    y.pow(2).sum().backward()
    assert_all_equal(ours, [y.detach()] + grads_of(model, x))


@pytest.mark.parametrize("name", IMPLS)
def test_kwargs_and_nested_non_tensor_outputs(name):
    impl = IMPLS[name]
    w = torch.randn(4, 4, requires_grad=True)

    def fn(x, *, scale, extra=None):
        h = x @ w * scale
        return {"h": h, "pair": (h.sin(), "tag"), "n": 3, "extra": extra}

    x = torch.randn(3, 4, requires_grad=True)
    out = impl.checkpoint(fn, x, scale=2.0, extra=[1], use_reentrant=False)
    assert out["pair"][1] == "tag" and out["n"] == 3 and out["extra"] == [1]
    (out["h"].sum() + out["pair"][0].sum()).backward()
    ref_w, ref_x = w.grad.clone(), x.grad.clone()
    w.grad = x.grad = None
    h = x @ w * 2.0
    (h.sum() + h.sin().sum()).backward()
    assert torch.equal(ref_w, w.grad) and torch.equal(ref_x, x.grad)


def test_autograd_grad_and_backward_inputs():
    model = mlp()
    x = torch.randn(4, 16, requires_grad=True)
    results = {}
    for name, impl in IMPLS.items():
        y = impl.checkpoint(model, x, use_reentrant=False)
        g_x, g_w = torch.autograd.grad(y.sum(), (x, model[0].weight))
        model.zero_grad(set_to_none=True)
        y = impl.checkpoint(model, x, use_reentrant=False)
        y.sum().backward(inputs=[model[2].weight])
        assert model[0].weight.grad is None, "backward(inputs=) must only fill the requested leaves"
        results[name] = [g_x, g_w, model[2].weight.grad.clone()]
        model.zero_grad(set_to_none=True)
    assert_all_equal(results["ours"], results["torch"])


def test_inputs_without_grad_and_frozen_params():
    model = mlp()
    model[0].requires_grad_(False)
    x = torch.randn(4, 16)  # no grad on the input: non-reentrant still trains the weights
    got = {}
    for name, impl in IMPLS.items():
        model.zero_grad(set_to_none=True)
        impl.checkpoint(model, x, use_reentrant=False).sum().backward()
        got[name] = grads_of(model)
    assert model[0].weight.grad is None
    assert_all_equal(got["ours"], got["torch"])


def test_nested_checkpoints():
    inner, outer = mlp(16, 2), mlp(16, 2)
    x = torch.randn(4, 16, requires_grad=True)

    def region(impl, t):
        t = impl.checkpoint(inner, t, use_reentrant=False)
        return outer(t).tanh()

    got = {}
    for name, impl in IMPLS.items():
        inner.zero_grad(set_to_none=True)
        outer.zero_grad(set_to_none=True)
        x.grad = None
        impl.checkpoint(region, impl, x, use_reentrant=False).sum().backward()
        got[name] = grads_of(inner) + grads_of(outer, x)
    assert_all_equal(got["ours"], got["torch"])


def test_double_backward():
    x = torch.randn(5, requires_grad=True)
    got = {}
    for name, impl in IMPLS.items():
        y = impl.checkpoint(lambda t: (t.sin() * t).exp(), x, use_reentrant=False)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
        got[name] = [g.detach(), gg]
    y = (x.sin() * x).exp()
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert_all_equal(got["ours"], got["torch"])
    assert torch.allclose(got["ours"][1], gg)


def test_retain_graph_second_backward_recomputes_again():
    model = mlp()
    x = torch.randn(4, 16, requires_grad=True)
    counts = {}
    for name, impl in IMPLS.items():
        model.zero_grad(set_to_none=True)
        y = impl.checkpoint(model, x, use_reentrant=False).sum()
        with OpCounter() as first:
            y.backward(retain_graph=True)
        g1 = model[0].weight.grad.clone()
        with OpCounter() as second:
            y.backward()
        assert torch.equal(model[0].weight.grad, 2 * g1)
        counts[name] = (first.counts["addmm"], second.counts["addmm"])
    # every backward recomputes the region's forward (3 addmm) on top of its own matmuls
    assert counts["ours"] == counts["torch"]
    assert counts["ours"][0] == counts["ours"][1]


def test_early_stop_skips_the_tail_of_the_region():
    def fn(t):
        a = t.sin()  # sin saves its input t (an input of the region: not recomputed)
        b = a.exp()  # exp saves its output b: the last tensor the backward needs
        return b.sum() + b.detach().tanh().sum()  # tanh runs after the last saved tensor

    x = torch.randn(8, requires_grad=True)
    seen = {}
    for name, impl in IMPLS.items():
        for early in (True, False):
            y = impl.checkpoint(fn, x, use_reentrant=False, early_stop=early)
            with OpCounter() as c:
                y.backward()
            seen[name, early] = c.counts["tanh"]
            with impl.set_checkpoint_early_stop(early):
                y = impl.checkpoint(fn, x, use_reentrant=False, early_stop=not early)
            with OpCounter() as c:
                y.backward()
            assert c.counts["tanh"] == seen[name, early], "set_checkpoint_early_stop overrides early_stop="
    assert seen == {("ours", True): 0, ("ours", False): 1, ("torch", True): 0, ("torch", False): 1}


def test_graph_exec_group_recomputes_once():
    x = torch.randn(6, requires_grad=True)
    counts = {}
    for name, impl in IMPLS.items():
        def fn(t):
            return t.exp().tanh(), t.sigmoid().tanh()

        for grouped in (True, False):
            a, b = impl.checkpoint(fn, x, use_reentrant=False)
            with OpCounter() as c, (impl.GraphExecGroup() if grouped else contextlib.nullcontext()):
                torch.autograd.grad(a.sum(), x, retain_graph=True)
                torch.autograd.grad(b.sum(), x)
            counts[name, grouped] = c.counts["exp"]  # exp runs only when the region is recomputed
    assert counts == {("ours", True): 1, ("ours", False): 2, ("torch", True): 1, ("torch", False): 2}
    with cc.GraphExecGroup(), pytest.raises(RuntimeError, match="cannot be nested"):
        with cc.GraphExecGroup():
            pass


def test_graph_exec_group_overlapping_backward_is_an_error():
    x = torch.randn(6, requires_grad=True)
    y = cc.checkpoint(lambda t: t.sin().exp(), x, use_reentrant=False).sum()
    with cc.GraphExecGroup():
        y.backward(retain_graph=True)
        with pytest.raises(cc.CheckpointError, match="already unpacked once. Performing two backward"):
            y.backward()


def test_grad_disabled_runs_plainly():
    model = mlp()
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(cc.checkpoint(model, x, use_reentrant=False), model(x))


def test_inplace_change_of_an_input_is_detected_like_autograd():
    x = torch.randn(4, requires_grad=True)
    for impl in IMPLS.values():
        h = x * 1
        y = impl.checkpoint(torch.sin, h, use_reentrant=False)
        h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_deepcopied_model_is_independent():
    model = mlp()
    clone = copy.deepcopy(model)
    x = torch.randn(4, 16, requires_grad=True)
    cc.checkpoint(model, x, use_reentrant=False).sum().backward()
    clone(x).sum().backward()
    assert_all_equal(grads_of(model), grads_of(clone))
