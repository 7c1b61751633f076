"""Selective activation checkpointing against torch's on the same inputs."""
import functools

import pytest
import torch
import torch.utils.checkpoint as tuc

import ckpt_compile as cc
from eager_utils import OpCounter, assert_all_equal

IMPLS = {"ours": cc, "torch": tuc}
MM = torch.ops.aten.mm.default


def _region(x, w):
    return torch.sigmoid(torch.matmul(torch.matmul(x, w), w)) * w


def _save_mm(ctx, op, *args, **kwargs):
    return cc.CheckpointPolicy.MUST_SAVE if op == MM else cc.CheckpointPolicy.PREFER_RECOMPUTE


def _run(impl, policy, **ctx_kwargs):
    torch.manual_seed(0)
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    context_fn = functools.partial(impl.create_selective_checkpoint_contexts, policy, **ctx_kwargs)
    y = impl.checkpoint(_region, x, w, use_reentrant=False, context_fn=context_fn)
    with OpCounter() as counter:
        y.sum().backward()
    return [y.detach(), x.grad, w.grad], counter.counts


@pytest.mark.parametrize("policy", [_save_mm, [MM]], ids=["policy_fn", "op_list"])
def test_saving_matmuls_matches_torch_and_recomputes_no_matmul(policy):
    ours, our_counts = _run(cc, policy)
    theirs, their_counts = _run(tuc, policy)
    assert_all_equal(ours, theirs)
    assert our_counts == their_counts
    _, plain_counts = _run(cc, lambda *a, **k: cc.CheckpointPolicy.PREFER_RECOMPUTE)
    # backward of two mm needs 4 mm; plain checkpointing reruns the 2 forward mm on top
    assert our_counts["mm"] == 4 and plain_counts["mm"] == 6


def test_bool_policy_and_bad_policy_value():
    ours, counts = _run(cc, lambda ctx, op, *a, **k: op == MM)
    assert counts["mm"] == 4
    with pytest.raises(TypeError, match="expected a CheckpointPolicy member"):
        _run(cc, lambda ctx, op, *a, **k: "save")


def test_policy_sees_forward_context():
    seen = []

    def policy(ctx, op, *args, **kwargs):
        assert isinstance(ctx, cc.SelectiveCheckpointContext)
        seen.append((ctx.is_recompute, isinstance(ctx.op_output, torch.Tensor)))
        return cc.CheckpointPolicy.PREFER_RECOMPUTE

    _run(cc, policy)
    assert seen and all(s == (False, True) for s in seen)


def test_op_overload_packet_rejected_with_hint():
    messages = {}
    for name, impl in IMPLS.items():
        with pytest.raises(ValueError) as info:
            impl.create_selective_checkpoint_contexts([torch.ops.aten.mm])
        messages[name] = str(info.value)
    assert "change it to `torch.ops.aten.mm.default`" in messages["ours"]
    assert messages["ours"].split(".")[0] == messages["torch"].split(".")[0]
    with pytest.raises(TypeError, match="function or a list of ops"):
        cc.create_selective_checkpoint_contexts(42)


def _mutating_region(x, w):
    y = x @ w  # cached by the policy ...
    z = y.sigmoid()
    y.mul_(2)  # ... then modified in place before the backward
    return z * y


@pytest.mark.parametrize("name", IMPLS)
def test_cached_tensor_mutation_is_detected(name):
    impl = IMPLS[name]
    x = torch.randn(4, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    ctx = functools.partial(impl.create_selective_checkpoint_contexts, [MM])
    y = impl.checkpoint(_mutating_region, x, w, use_reentrant=False, context_fn=ctx)
    with pytest.raises(RuntimeError, match="Tensor cached during selective activation checkpoint has been mutated"):
        y.sum().backward()


def test_cache_entry_mutation_allowed_matches_torch():
    got = {}
    for name, impl in IMPLS.items():
        torch.manual_seed(0)
        x = torch.randn(4, 4, requires_grad=True)
        w = torch.randn(4, 4, requires_grad=True)
        ctx = functools.partial(impl.create_selective_checkpoint_contexts, [MM], allow_cache_entry_mutation=True)
        y = impl.checkpoint(_mutating_region, x, w, use_reentrant=False, context_fn=ctx)
        y.sum().backward()
        got[name] = [y.detach(), x.grad, w.grad]
    assert_all_equal(got["ours"], got["torch"])


@pytest.mark.parametrize("name", IMPLS)
def test_backward_an_extra_time_is_an_error(name):
    impl = IMPLS[name]
    x = torch.randn(4, 4, requires_grad=True)
    ctx = functools.partial(impl.create_selective_checkpoint_contexts, [MM])
    y = impl.checkpoint(_region, x, x, use_reentrant=False, context_fn=ctx).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="Trying to backward an extra time"):
        y.backward()


@pytest.mark.skipif(not hasattr(cc.CheckpointPolicy, "MUST_CPU_OFFLOAD"), reason="torch without offload policies")
@pytest.mark.parametrize("policy_name", ["MUST_CPU_OFFLOAD", "PREFER_CPU_OFFLOAD"])
def test_cpu_offload_keeps_the_value_instead_of_recomputing(policy_name):
    offload = getattr(cc.CheckpointPolicy, policy_name)

    def policy(ctx, op, *args, **kwargs):
        return offload if op == MM else cc.CheckpointPolicy.PREFER_RECOMPUTE

    ours, our_counts = _run(cc, policy)
    theirs, their_counts = _run(tuc, policy)
    assert_all_equal(ours, theirs)
    # torch 2.13 treats offload as recompute in eager; we keep the value (here already on CPU)
    assert their_counts["mm"] == 6 and our_counts["mm"] == 4


def _offload_run(impl, policy_name, how):
    """Two backwards through one region with an offload policy; grads and mm counts."""
    offload = getattr(cc.CheckpointPolicy, policy_name)

    def policy(ctx, op, *args, **kwargs):
        return offload if op == MM else cc.CheckpointPolicy.PREFER_RECOMPUTE

    torch.manual_seed(0)
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    context_fn = functools.partial(impl.create_selective_checkpoint_contexts, policy)
    loss = impl.checkpoint(_region, x, w, use_reentrant=False, context_fn=context_fn).sin().sum()
    grads, counts = [], []
    with OpCounter() as counter:
        if how == "retain_graph":
            loss.backward(retain_graph=True)
            grads += [x.grad.clone(), w.grad.clone()]
            counts.append(counter.counts["mm"])
            loss.backward()
        else:  # double backward
            gx, gw = torch.autograd.grad(loss, (x, w), create_graph=True)
            grads += [gx.detach(), gw.detach()]
            counts.append(counter.counts["mm"])
            (gx.pow(2).sum() + (gw * w).sum()).backward()
    counts.append(counter.counts["mm"] - counts[0])
    return grads + [x.grad, w.grad], counts


@pytest.mark.skipif(not hasattr(cc.CheckpointPolicy, "MUST_CPU_OFFLOAD"), reason="torch without offload policies")
@pytest.mark.parametrize("how", ["retain_graph", "double_backward"])
@pytest.mark.parametrize("policy_name", ["MUST_CPU_OFFLOAD", "PREFER_CPU_OFFLOAD"])
def test_cpu_offload_allows_a_second_and_a_double_backward_like_torch(policy_name, how):
    ours, our_counts = _offload_run(cc, policy_name, how)
    theirs, their_counts = _offload_run(tuc, policy_name, how)
    assert_all_equal(ours, theirs)
    if how == "retain_graph":
        # Each backward: 4 mm for the gradients; torch reruns the 2 forward mm on top, we
        # hand back the offloaded outputs, in the second backward too.
        assert their_counts == [6, 6] and our_counts == [4, 4]
    else:
        assert our_counts[0] == 4 and their_counts[0] == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_moves_to_pinned_cpu_and_back():
    from ckpt_compile.eager._selective import _Cached

    x = torch.randn(64, 64, device="cuda")
    cached = _Cached(x, offload=True)
    assert cached.value.device.type == "cpu" and cached.value.is_pinned()
    back = cached.get(MM, allow_mutation=False)
    assert back.device == x.device and torch.equal(back, x)

    def policy(ctx, op, *args, **kwargs):
        return cc.CheckpointPolicy.MUST_CPU_OFFLOAD if op == MM else cc.CheckpointPolicy.PREFER_RECOMPUTE

    a = torch.randn(8, 8, device="cuda", requires_grad=True)
    ctx = functools.partial(cc.create_selective_checkpoint_contexts, policy)
    y = cc.checkpoint(_region, a, a, use_reentrant=False, context_fn=ctx)
    y.sum().backward(retain_graph=True)
    y.sum().backward()  # the host copy comes back once per backward
    b = a.detach().clone().requires_grad_()
    _region(b, b).sum().backward()
    assert torch.allclose(a.grad, 2 * b.grad)


def test_selective_saved_bytes_equal_torch_cache_included():
    from ckpt_compile.eager._selective import _cached_storages
    from eager_utils import SavedBytes

    totals = {}
    for name, impl in IMPLS.items():
        modes = []

        def ctx():
            fwd, rec = impl.create_selective_checkpoint_contexts([MM])
            modes.append(fwd)
            return fwd, rec

        x = torch.randn(512, 512, requires_grad=True)  # 1 MiB per float32 tensor
        counter = SavedBytes()
        with counter():
            y = impl.checkpoint(_region, x, x, use_reentrant=False, context_fn=ctx)
        storages = dict(counter.storages)
        if name == "ours":
            storages.update(_cached_storages(modes[0]))
        else:  # torch's cache: {op: {index: _VersionWrapper}}
            for entries in modes[0].storage.values():
                for entry in entries.values():
                    if hasattr(entry, "val"):
                        storages[entry.val.untyped_storage().data_ptr()] = entry.val.untyped_storage().nbytes()
        totals[name] = sum(storages.values())
        del y
    # the input x (1 MiB) plus the two cached mm outputs (1 MiB each)
    assert totals == {"ours": 3 * 2**20, "torch": 3 * 2**20}
