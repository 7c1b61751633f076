"""RNG, autocast and torch.device context are replayed on recompute, as in torch."""
import pytest
import torch
import torch.utils.checkpoint as tuc

import ckpt_compile as cc
from eager_utils import assert_all_equal

IMPLS = {"ours": cc, "torch": tuc}


def _dropout_grads(impl, reentrant, preserve):
    torch.manual_seed(0)
    x = torch.randn(64, requires_grad=True)
    y = impl.checkpoint(lambda t: torch.nn.functional.dropout(t.sin(), 0.5), x,
                        use_reentrant=reentrant, preserve_rng_state=preserve)
    y.mul(torch.arange(64.0)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("reentrant", [False, True])
def test_dropout_mask_is_replayed(reentrant):
    ours = _dropout_grads(cc, reentrant, True)
    assert_all_equal(list(ours), list(_dropout_grads(tuc, reentrant, True)))
    torch.manual_seed(0)
    x = torch.randn(64, requires_grad=True)
    y = torch.nn.functional.dropout(x.sin(), 0.5)
    y.mul(torch.arange(64.0)).sum().backward()
    assert_all_equal(list(ours), [y.detach(), x.grad])


@pytest.mark.parametrize("reentrant", [False, True])
def test_preserve_rng_state_false_draws_a_new_mask_like_torch(reentrant):
    ours = _dropout_grads(cc, reentrant, False)
    theirs = _dropout_grads(tuc, reentrant, False)
    assert_all_equal(list(ours), list(theirs))  # same RNG consumption as torch
    replayed = _dropout_grads(cc, reentrant, True)
    assert not torch.equal(ours[1], replayed[1])


def test_rng_outside_the_region_is_untouched_by_recompute():
    torch.manual_seed(3)
    x = torch.randn(8, requires_grad=True)
    y = cc.checkpoint(lambda t: torch.nn.functional.dropout(t, 0.5), x, use_reentrant=False)
    state = torch.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("reentrant", [False, True])
def test_autocast_state_is_replayed(reentrant):
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    got = {}
    for name, impl in IMPLS.items():
        lin.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = impl.checkpoint(lambda t: lin(t).relu(), x, use_reentrant=reentrant)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()  # backward outside autocast: recompute must still use bf16
        got[name] = [y.detach().float(), lin.weight.grad, x.grad]
    assert_all_equal(got["ours"], got["torch"])


def test_torch_device_context_is_replayed():
    def fn(t):
        return (t * torch.ones(t.shape[0])).sin()  # factory call: follows the device context

    for impl in IMPLS.values():
        x = torch.randn(4, device="meta", requires_grad=True)
        with torch.device("meta"):
            y = impl.checkpoint(fn, x, use_reentrant=False)
        y.sum().backward()  # outside the context: without replay torch.ones would be on CPU
        assert x.grad.device.type == "meta"


def test_default_device_type():
    assert cc.DefaultDeviceType.get_device_type() == tuc.DefaultDeviceType.get_device_type()
    previous = cc.DefaultDeviceType.get_device_type()
    try:
        cc.DefaultDeviceType.set_device_type("meta")
        assert cc.DefaultDeviceType.get_device_type() == "meta"
        x = torch.randn(3, requires_grad=True)
        cc.checkpoint(torch.sin, x, use_reentrant=False).sum().backward()
        assert torch.equal(x.grad, x.detach().cos())
    finally:
        cc.DefaultDeviceType.set_device_type(previous)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_replayed():
    got = {}
    for name, impl in IMPLS.items():
        torch.manual_seed(0)
        x = torch.randn(256, device="cuda", requires_grad=True)
        y = impl.checkpoint(lambda t: torch.nn.functional.dropout(t, 0.5), x, use_reentrant=False)
        y.sum().backward()
        got[name] = [y.detach(), x.grad]
    assert_all_equal(got["ours"], got["torch"])
    assert torch.equal((got["ours"][0] != 0).float() * 2, got["ours"][1])
