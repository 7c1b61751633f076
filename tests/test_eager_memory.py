"""Saved bytes, freeing recomputed tensors early, no reference cycles, checkpoint_sequential."""
import gc

import pytest
import torch
import torch.utils.checkpoint as tuc
from torch.multiprocessing.reductions import StorageWeakRef

import ckpt_compile as cc
from eager_utils import SavedBytes, assert_all_equal, grads_of, mlp

IMPLS = {"ours": cc, "torch": tuc}


def _blocks(n=8, d=64):
    torch.manual_seed(0)
    return torch.nn.ModuleList(
        torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True) for _ in range(n)
    )


def _saved_bytes(blocks, x, impl):
    counter = SavedBytes()
    with counter():
        h = x
        for block in blocks:
            h = block(h) if impl is None else impl.checkpoint(block, h, use_reentrant=False)
    return counter.total, h


def test_eight_checkpointed_blocks_save_under_15_percent():
    blocks = _blocks()
    x = torch.randn(4, 64, 64, requires_grad=True)
    plain, _ = _saved_bytes(blocks, x, None)
    ours, h = _saved_bytes(blocks, x, cc)
    theirs, _ = _saved_bytes(blocks, x, tuc)
    assert ours == theirs
    assert ours < 0.15 * plain, (ours, plain)
    h.sum().backward()  # and the checkpointed graph still trains


def _storages_of(op_name):
    """A dispatch mode recording weak references to the storages an operator produced."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ == op_name:
                self.refs.append(StorageWeakRef(out.untyped_storage()))
            return out

    return Record()


class _Probe(torch.autograd.Function):
    """Identity whose backward runs a check between two recomputed tensors' uses."""

    @staticmethod
    def forward(ctx, t, check):
        ctx.check = check
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        ctx.check()
        return grad, None


@pytest.mark.parametrize("name", IMPLS)
def test_recomputed_tensors_are_freed_as_soon_as_used(name):
    impl = IMPLS[name]
    recorder = _storages_of("exp")
    observed = {}

    def check():
        refs = recorder.refs  # [forward a, forward c, recomputed a, recomputed c]
        observed["c_freed"] = refs[3].expired()
        observed["a_alive"] = not refs[2].expired()

    def region(t):
        a = t.exp()  # saves its output a
        return _Probe.apply(a, check).exp()  # saves its output c

    x = torch.randn(1024, requires_grad=True)
    with recorder:
        y = impl.checkpoint(region, x, use_reentrant=False)
        y.sum().backward()
    assert observed == {"c_freed": True, "a_alive": True}
    assert all(r.expired() for r in recorder.refs[2:])


def test_no_reference_cycle_keeps_activations_alive():
    recorder = _storages_of("mul")
    x = torch.randn(1024, requires_grad=True)
    gc.collect()
    gc.disable()
    try:
        for backward in (False, True):
            with recorder:
                h = x * 2  # the region's input: kept by the region until its graph dies
            y = cc.checkpoint(lambda t: t.exp().exp(), h, use_reentrant=False)
            del h
            assert not recorder.refs[-1].expired()
            if backward:
                y.sum().backward()
            del y  # no cycle: dropping the output frees graph, frame and input at once
            assert recorder.refs[-1].expired()
    finally:
        gc.enable()


def test_recompute_trampoline_has_no_closure():
    from ckpt_compile.eager._common import _run_fn_with_dynamo_disabled

    assert _run_fn_with_dynamo_disabled.__wrapped__.__closure__ is None
    # the dynamo-disabling wrapper itself closes over nothing but the function and a flag
    cells = [c.cell_contents for c in _run_fn_with_dynamo_disabled.__closure__ or ()]
    assert all(c is _run_fn_with_dynamo_disabled.__wrapped__ or isinstance(c, bool) for c in cells)


@pytest.mark.parametrize("name", IMPLS)
def test_recompute_is_not_traced_under_compiled_autograd(name):
    import torch._dynamo
    from torch._dynamo import compiled_autograd

    impl = IMPLS[name]
    compiling = []

    def region(t):
        compiling.append(torch.compiler.is_compiling())
        return t.sin().exp()

    torch._dynamo.reset()
    x = torch.randn(4, requires_grad=True)
    y = impl.checkpoint(region, x, use_reentrant=False)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        y.sum().backward()
    torch._dynamo.reset()
    assert compiling == [False, False]  # forward, then the recomputation: both eager
    assert torch.allclose(x.grad, (x.sin().exp() * x.cos()).detach())


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("segments", [1, 2, 3, 6])
def test_checkpoint_sequential_matches_torch(segments, reentrant):
    model = mlp(16, 3, dropout=0.1)  # 9 modules
    x = torch.randn(4, 16, requires_grad=True)
    got = {}
    for name, impl in IMPLS.items():
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(0)
        y = impl.checkpoint_sequential(model, segments, x, use_reentrant=reentrant)
        y.sum().backward()
        got[name] = [y.detach()] + grads_of(model, x)
    assert_all_equal(got["ours"], got["torch"])


@pytest.mark.parametrize("segments", [0, -1, 10, 2.0, True])
def test_checkpoint_sequential_rejects_bad_segments(segments):
    with pytest.raises(ValueError, match="segments must be"):
        cc.checkpoint_sequential(mlp(16, 3), segments, torch.randn(2, 16), use_reentrant=False)


def test_checkpoint_sequential_rejects_unknown_kwargs_like_torch():
    for impl in IMPLS.values():
        with pytest.raises(ValueError, match="Unexpected keyword arguments: debug"):
            impl.checkpoint_sequential(mlp(), 2, torch.randn(2, 16), use_reentrant=False, debug=True)
