"""Module wrappers compared with PyTorch's own (torch.distributed.algorithms._checkpoint).

Every behaviour is checked against the reference on the same model and inputs: outputs
and gradients equal, and names equal to those of the *unwrapped* model (where PyTorch's
wrapper leaks ``_checkpoint_wrapped_module.``, asserted too so the comparison means
something).
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import ckpt_compile as cc
from eager_utils import graph_size
from ckpt_compile.wrappers import (
    ActivationWrapper,
    CheckpointImpl,
    CheckpointWrapper,
    OffloadWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    offload_wrapper,
)

# The reference implementation; absent on torch builds without distributed.
torch_wrappers = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")

LEAK = "_checkpoint_wrapped_module"


class Block(nn.Module):
    """Pre-norm MLP block with dropout, a buffer and a keyword-only argument."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Dropout(0.25), nn.Linear(16, d))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d))

    def forward(self, x, *, mask=None):
        h = self.ff(self.norm(x)) * self.scale
        if mask is not None:
            h = h * mask
        return x + h


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x, mask=None):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, mask=mask)
        return self.head(self.bn(h))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def is_block(module: nn.Module) -> bool:
    return isinstance(module, Block)


def run(model: nn.Module, seed: int = 1, mask: bool = True):
    """One forward + backward with fixed data and RNG; returns output and grads by name."""
    torch.manual_seed(seed)
    x = torch.randn(6, 4, requires_grad=True)
    m = (torch.rand(6, 8) > 0.3).float() if mask else None
    out = model(x, mask=m)
    out.pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), x.grad.clone(), grads


# Every class of the unwrapped model, and the wrappers (ours and PyTorch's counted together).
CLASSES = (Net, Block, nn.Linear, nn.LayerNorm, nn.GELU, nn.Dropout, nn.Sequential, nn.ModuleList, nn.BatchNorm1d)


def counts_by_class(modules) -> dict[str, int]:
    modules = list(modules)
    counts = {cls.__name__: sum(isinstance(m, cls) for m in modules) for cls in CLASSES}
    for kind in ("ActivationWrapper", "CheckpointWrapper", "OffloadWrapper"):
        classes = (globals()[kind], getattr(torch_wrappers, kind))
        counts[kind] = sum(isinstance(m, classes) for m in modules)
    return counts


def strip(name: str) -> str:
    return name.replace(LEAK + ".", "")


def assert_same_grads(ours: dict, theirs: dict) -> None:
    assert list(ours) == [strip(n) for n in theirs]
    for (name, g), g_ref in zip(ours.items(), theirs.values()):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0, msg=name)


# --- forward / backward equal to PyTorch's wrappers -------------------------------------


@pytest.mark.parametrize("impl", [CheckpointImpl.NO_REENTRANT, CheckpointImpl.REENTRANT])
def test_gradients_match_pytorch_checkpoint_wrapper_with_kwargs(impl):
    plain, ours, theirs = make_net(), make_net(), make_net()
    torch_impl = getattr(torch_wrappers.CheckpointImpl, impl.name)
    apply_activation_checkpointing(
        ours, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, impl), check_fn=is_block
    )
    torch_wrappers.apply_activation_checkpointing(
        theirs, checkpoint_wrapper_fn=lambda m: torch_wrappers.checkpoint_wrapper(m, torch_impl), check_fn=is_block
    )
    assert isinstance(ours.blocks[0], CheckpointWrapper) and ours.blocks[0].checkpoint_impl is impl
    out_p, xg_p, g_p = run(plain)
    out_o, xg_o, g_o = run(ours)
    out_t, xg_t, g_t = run(theirs)
    # Dropout is reproduced in the recomputation: the same numbers as no checkpointing.
    torch.testing.assert_close(out_o, out_p, rtol=0, atol=0)
    torch.testing.assert_close(out_o, out_t, rtol=0, atol=0)
    torch.testing.assert_close(xg_o, xg_t, rtol=0, atol=0)
    assert_same_grads(g_o, g_t)
    assert_same_grads(g_o, g_p)


def test_offload_wrapper_matches_pytorch_and_composes_with_checkpoint():
    plain, ours, theirs, both = make_net(), make_net(), make_net(), make_net()
    apply_activation_checkpointing(ours, offload_wrapper, is_block)
    torch_wrappers.apply_activation_checkpointing(theirs, torch_wrappers.offload_wrapper, is_block)
    apply_activation_checkpointing(both, lambda m: offload_wrapper(checkpoint_wrapper(m)), is_block)
    assert isinstance(ours.blocks[1], OffloadWrapper)
    assert isinstance(both.blocks[1], OffloadWrapper)
    assert isinstance(both.blocks[1]._checkpoint_wrapped_module, CheckpointWrapper)
    ref = run(plain)
    for model in (ours, both):
        out, xg, grads = run(model)
        torch.testing.assert_close(out, ref[0], rtol=0, atol=0)
        torch.testing.assert_close(xg, ref[1], rtol=0, atol=0)
        assert_same_grads(grads, ref[2])
    # PyTorch's save_on_cpu re-lays out every saved tensor (weight.t() included) as a
    # contiguous copy, so its backward kernels round differently: equal up to float eps.
    _, xg_t, g_t = run(theirs)
    torch.testing.assert_close(xg_t, ref[1])
    for (name, g), g_ref in zip(g_t.items(), ref[2].values()):
        torch.testing.assert_close(g, g_ref, msg=name)
    assert list(both.state_dict()) == list(plain.state_dict())


def test_buffers_and_running_stats_match_pytorch_after_training_steps():
    ours, theirs = make_net(), make_net()
    apply_activation_checkpointing(ours, check_fn=lambda m: isinstance(m, (Block, nn.BatchNorm1d)))
    torch_wrappers.apply_activation_checkpointing(theirs, check_fn=lambda m: isinstance(m, (Block, nn.BatchNorm1d)))
    for seed in range(3):
        run(ours, seed)
        run(theirs, seed)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], rtol=0, atol=0, msg=key)


# --- clean names ----------------------------------------------------------------------


def names(model: nn.Module) -> dict[str, list[str]]:
    return {
        "state_dict": list(model.state_dict()),
        "named_parameters": [n for n, _ in model.named_parameters()],
        "named_buffers": [n for n, _ in model.named_buffers()],
        "named_modules": [n for n, _ in model.named_modules()],
        "prefixed": list(model.state_dict(prefix="root.")),
    }


@pytest.mark.parametrize("wrapper_fn", [checkpoint_wrapper, offload_wrapper], ids=["checkpoint", "offload"])
def test_every_name_api_of_wrapper_and_ancestors_is_unchanged(wrapper_fn):
    plain, ours, theirs = make_net(), make_net(), make_net()
    check = lambda m: isinstance(m, (Block, nn.Linear))  # wraps nested modules too
    apply_activation_checkpointing(ours, lambda m: wrapper_fn(m), check)
    torch_fn = getattr(torch_wrappers, wrapper_fn.__name__)
    torch_wrappers.apply_activation_checkpointing(theirs, lambda m: torch_fn(m), check)
    # Root, an ancestor (ModuleList), the wrapper itself, and a wrapper inside a wrapper.
    for path in ("", "blocks", "blocks.0", "blocks.0.ff", "blocks.0.ff.0"):
        assert names(ours.get_submodule(path)) == names(plain.get_submodule(path)), path
    # The reference leaks the prefix into ancestors' names: this is what we fix.
    leaked = names(theirs)
    assert any(LEAK in n for n in leaked["named_parameters"])
    assert any(LEAK in n for n in leaked["named_buffers"])
    assert leaked["state_dict"] == names(plain)["state_dict"]


def test_wrapped_modules_take_the_place_of_the_originals_by_name():
    plain, ours = make_net(), make_net()
    apply_activation_checkpointing(ours, check_fn=is_block)
    ours_modules, plain_modules = dict(ours.named_modules()), dict(plain.named_modules())
    assert list(ours_modules) == list(plain_modules)
    assert isinstance(ours_modules["blocks.1"], CheckpointWrapper)
    assert isinstance(ours_modules["blocks.1"]._checkpoint_wrapped_module, Block)
    # Parameters are the same objects, reachable under the same names from both sides.
    wrapper = ours.blocks[1]
    assert wrapper.norm.weight is wrapper._checkpoint_wrapped_module.norm.weight
    assert ours.get_parameter("blocks.1.ff.0.weight") is wrapper._checkpoint_wrapped_module.ff[0].weight
    assert dict(ours.named_parameters()).keys() == dict(plain.named_parameters()).keys()


def test_load_state_dict_both_ways_and_with_pytorch_prefix():
    source = make_net(seed=5)
    run(source)  # non-trivial running stats
    expected = source.state_dict()

    wrapped = make_net()
    apply_activation_checkpointing(wrapped, check_fn=is_block)
    result = wrapped.load_state_dict(expected, strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    for key, value in wrapped.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

    # Wrapped -> unwrapped, and into PyTorch's wrapped model.
    plain = make_net(seed=9)
    plain.load_state_dict(wrapped.state_dict(), strict=True)
    theirs = make_net(seed=9)
    torch_wrappers.apply_activation_checkpointing(theirs, check_fn=is_block)
    theirs.load_state_dict(wrapped.state_dict(), strict=True)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[key], value, rtol=0, atol=0, msg=key)

    # Keys that carry PyTorch's prefix (here: what its named_parameters()/named_buffers()
    # report) load into our wrapper, at the root and at the wrapper itself.
    prefixed = {**dict(theirs.named_parameters()), **dict(theirs.named_buffers())}
    assert any(LEAK in k for k in prefixed)
    fresh = make_net(seed=11)
    apply_activation_checkpointing(fresh, check_fn=is_block)
    result = fresh.load_state_dict(prefixed, strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, plain.state_dict()[key], rtol=0, atol=0, msg=key)
    block_sd = {f"{LEAK}.{k}": v.clone() + 1 for k, v in plain.blocks[0].state_dict().items()}
    fresh.blocks[0].load_state_dict(block_sd, strict=True)
    torch.testing.assert_close(fresh.blocks[0].norm.weight, plain.blocks[0].norm.weight + 1)


def test_conflicting_prefixed_and_clean_keys_are_an_error():
    wrapped = checkpoint_wrapper(nn.Linear(2, 2))
    sd = wrapped.state_dict()
    sd[f"{LEAK}.weight"] = sd["weight"].clone()
    with pytest.raises(RuntimeError, match=r"both '_checkpoint_wrapped_module.weight' and 'weight'"):
        wrapped.load_state_dict(sd)


def test_optimizer_built_before_wrapping_keeps_its_name_keyed_state():
    plain, ours = make_net(), make_net()
    opt_plain = torch.optim.AdamW(plain.named_parameters(), lr=0.1)
    opt_ours = torch.optim.AdamW(ours.named_parameters(), lr=0.1)
    for model, opt in ((plain, opt_plain), (ours, opt_ours)):
        run(model, seed=0)
        opt.step()
        opt.zero_grad()
    apply_activation_checkpointing(ours, check_fn=is_block)
    saved = opt_ours.state_dict()
    assert saved["param_groups"][0]["param_names"] == [n for n, _ in ours.named_parameters()]
    # A fresh optimizer over the wrapped model's names accepts the old state ...
    opt_new = torch.optim.AdamW(ours.named_parameters(), lr=0.1)
    opt_new.load_state_dict(saved)
    assert opt_new.state_dict()["param_groups"][0]["param_names"] == saved["param_groups"][0]["param_names"]
    # ... and training continues exactly as the never-wrapped model does.
    for model, opt in ((plain, opt_plain), (ours, opt_new)):
        run(model, seed=1)
        opt.step()
    for (name, p), p_ref in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0, msg=name)


# --- forwarding, conversions, copies ----------------------------------------------------


def test_attribute_and_getitem_forwarding_like_pytorch():
    seq = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    ours, theirs = checkpoint_wrapper(seq), torch_wrappers.checkpoint_wrapper(copy.deepcopy(seq))
    assert ours[0] is seq[0]
    assert type(ours[1]) is type(theirs[1])
    assert ours[0].out_features == theirs[0].out_features == 5
    lin = nn.Linear(3, 5)
    lin.custom_flag = "yes"
    wrapped = offload_wrapper(lin)
    assert (wrapped.in_features, wrapped.custom_flag) == (3, "yes")
    assert wrapped._checkpoint_wrapped_module is lin
    with pytest.raises(AttributeError, match="no_such_thing"):
        wrapped.no_such_thing
    assert isinstance(wrapped, ActivationWrapper) and isinstance(wrapped, OffloadWrapper)


def test_train_eval_dtype_and_apply_reach_the_wrapped_module():
    plain, ours, theirs = make_net(), make_net(), make_net()
    apply_activation_checkpointing(ours, check_fn=is_block)
    torch_wrappers.apply_activation_checkpointing(theirs, check_fn=is_block)
    ours.eval()
    assert not ours.blocks[0]._checkpoint_wrapped_module.training
    assert not ours.blocks[0]._checkpoint_wrapped_module.ff[2].training
    ours.double()
    assert ours.blocks[0]._checkpoint_wrapped_module.norm.weight.dtype == torch.float64
    plain.eval().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
    ours.train()
    assert ours.blocks[0]._checkpoint_wrapped_module.ff[2].training
    # apply() shows fn as many modules of each class as PyTorch's wrapper does.
    visited_ours, visited_theirs = [], []
    ours.apply(visited_ours.append)
    theirs.apply(visited_theirs.append)
    assert counts_by_class(visited_ours) == counts_by_class(visited_theirs)


def test_class_specific_apply_runs_so_a_wrapped_lstm_converts_like_an_unwrapped_one():
    # With overwrite-on-conversion, .double() creates new Parameters; nn.LSTM's own _apply
    # must then re-point its _flat_weights at them (Module._apply alone leaves them stale).
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        torch.manual_seed(0)
        lstm = nn.LSTM(4, 3, batch_first=True)
        reference = copy.deepcopy(lstm).double()
        wrapped = checkpoint_wrapper(lstm).double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    assert all(flat is p for flat, p in zip(lstm._flat_weights, wrapped.parameters()))
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(wrapped(x)[0], reference(x)[0], rtol=0, atol=0)


def test_state_dict_hooks_registered_on_the_wrapper_run():
    wrapped = checkpoint_wrapper(nn.Linear(2, 2))
    seen = []
    wrapped.register_state_dict_post_hook(lambda module, sd, prefix, meta: seen.append(("save", prefix)))
    wrapped.register_load_state_dict_post_hook(lambda module, keys: seen.append(("load", list(keys.missing_keys))))
    model = nn.Sequential(wrapped)
    model.load_state_dict(model.state_dict())
    assert seen == [("save", "0."), ("load", [])]


def test_deepcopy_and_pickle_keep_wrapper_and_module_in_sync():
    model = make_net()
    apply_activation_checkpointing(model, check_fn=is_block)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        wrapper = clone.blocks[0]
        assert wrapper.ff[0].weight is wrapper._checkpoint_wrapped_module.ff[0].weight
        assert wrapper.ff[0].weight is not model.blocks[0].ff[0].weight
        assert names(clone) == names(model)
        assert_same_grads(run(clone)[2], run(make_net())[2])


def test_repr_shows_the_wrapped_module():
    assert repr(checkpoint_wrapper(nn.Linear(2, 3))) == (
        "CheckpointWrapper(Linear(in_features=2, out_features=3, bias=True))"
    )


# --- checkpoint_fn, policies, refusals ----------------------------------------------------


def test_custom_checkpoint_fn_receives_the_same_call_as_in_pytorch():
    calls = {"ours": [], "theirs": []}

    def recorder(key):
        def checkpoint_fn(fn, *args, **kwargs):
            calls[key].append((len(args), sorted(kwargs)))
            return cc.checkpoint(fn, *args, **kwargs)

        return checkpoint_fn

    block, block_ref = Block(), Block()
    block_ref.load_state_dict(block.state_dict())
    ours = checkpoint_wrapper(block, checkpoint_fn=recorder("ours"), use_reentrant=False, preserve_rng_state=False)
    theirs = torch_wrappers.checkpoint_wrapper(
        block_ref, checkpoint_fn=recorder("theirs"), use_reentrant=False, preserve_rng_state=False
    )
    x = torch.randn(2, 8)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x, mask=torch.ones(8)), theirs(x, mask=torch.ones(8)))
    assert calls["ours"] == calls["theirs"] == [(1, ["mask", "preserve_rng_state", "use_reentrant"])]


def test_default_checkpoint_fn_is_ckpt_compile_checkpoint(monkeypatch):
    import ckpt_compile.eager._checkpoint as engine

    seen = []
    real = engine.checkpoint
    monkeypatch.setattr(engine, "checkpoint", lambda *a, **k: seen.append(k) or real(*a, **k))
    wrapped = checkpoint_wrapper(nn.Linear(2, 2), CheckpointImpl.REENTRANT, preserve_rng_state=False)
    wrapped(torch.randn(1, 2, requires_grad=True)).sum().backward()
    assert seen == [{"use_reentrant": True, "preserve_rng_state": False}]


def wrapped_paths(model: nn.Module) -> list[str]:
    """Dotted paths of wrappers, with PyTorch's prefix removed, in named_modules order."""
    return [strip(n) for n, m in model.named_modules() if isinstance(m, (ActivationWrapper, torch_wrappers.ActivationWrapper))]


def test_auto_wrap_policy_takes_precedence_and_matches_pytorch():
    def policy(module, recurse, nonwrapped_numel):
        return recurse or isinstance(module, nn.Linear)

    ours, theirs = make_net(), make_net()
    apply_activation_checkpointing(ours, check_fn=lambda m: False, auto_wrap_policy=policy)
    torch_wrappers.apply_activation_checkpointing(theirs, check_fn=lambda m: False, auto_wrap_policy=policy)
    assert wrapped_paths(ours) == wrapped_paths(theirs) == [
        "embed", "blocks.0.ff.0", "blocks.0.ff.3", "blocks.1.ff.0", "blocks.1.ff.3", "head",
    ]


def test_size_based_policy_and_module_wrap_policy_match_pytorch():
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, size_based_auto_wrap_policy
    import functools

    for policy in (
        functools.partial(size_based_auto_wrap_policy, min_num_params=100),
        ModuleWrapPolicy({Block, nn.Linear}),
    ):
        ours, theirs = make_net(), make_net()
        apply_activation_checkpointing(ours, auto_wrap_policy=policy)
        torch_wrappers.apply_activation_checkpointing(theirs, auto_wrap_policy=policy)
        assert wrapped_paths(ours) == wrapped_paths(theirs), policy
        assert wrapped_paths(ours)
    with pytest.raises(ValueError, match="auto_wrap_policy must be a callable"):
        apply_activation_checkpointing(make_net(), auto_wrap_policy=42)


def test_root_is_never_wrapped_and_shared_modules_are_wrapped_once():
    ours, theirs = make_net(), make_net()
    apply_activation_checkpointing(ours)
    torch_wrappers.apply_activation_checkpointing(theirs)
    assert type(ours) is Net
    assert wrapped_paths(ours) == wrapped_paths(theirs)
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Linear))
    assert model[0] is model[2] and isinstance(model[0], CheckpointWrapper)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]


def test_nested_wrapping_is_refused_also_when_a_type_check_finds_the_wrapped_layers_again():
    wrapped = checkpoint_wrapper(nn.Linear(2, 2))
    with pytest.raises(ValueError) as info:
        checkpoint_wrapper(wrapped)
    assert str(info.value) == (
        "CheckpointWrapper: the module is already a CheckpointWrapper around Linear; wrapping it "
        "again would apply the same treatment twice to one region. Wrap the module once, or "
        "unwrap it first with `._checkpoint_wrapped_module`."
    )
    with pytest.raises(ValueError, match="already a OffloadWrapper"):
        offload_wrapper(offload_wrapper(nn.Linear(2, 2)))
    model = make_net()
    apply_activation_checkpointing(model)
    with pytest.raises(ValueError, match="already a CheckpointWrapper"):
        apply_activation_checkpointing(model)
    # The wrapped blocks are still Blocks (as with PyTorch's wrapper, which then wraps them
    # a second time): checkpointing them twice is refused the same way.
    model = make_net()
    apply_activation_checkpointing(model, check_fn=is_block)
    with pytest.raises(ValueError, match="already a CheckpointWrapper around Block"):
        apply_activation_checkpointing(model, check_fn=is_block)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: checkpoint_wrapper(lambda x: x), "CheckpointWrapper wraps an nn.Module, but got function"),
        (lambda: offload_wrapper(3), "OffloadWrapper wraps an nn.Module, but got int (3)"),
        (lambda: CheckpointWrapper(torch.randn(2)), "CheckpointWrapper wraps an nn.Module, but got Tensor"),
        (lambda: checkpoint_wrapper(nn.ReLU(), checkpoint_impl=True), "checkpoint_impl must be CheckpointImpl"),
        (lambda: checkpoint_wrapper(nn.ReLU(), use_reentrant=True), "use_reentrant is set by checkpoint_impl"),
        (lambda: checkpoint_wrapper(nn.ReLU(), checkpoint_fn="checkpoint"), "checkpoint_fn must be a callable"),
        (lambda: apply_activation_checkpointing([nn.ReLU()]), "model must be an nn.Module, got list"),
        (lambda: apply_activation_checkpointing(make_net(), lambda m: None), "must return an nn.Module"),
    ],
)
def test_bad_input_is_a_type_error_naming_what_was_passed(call, message):
    with pytest.raises(TypeError) as info:
        call()
    assert message in str(info.value)


def test_activation_wrapper_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        ActivationWrapper(nn.Linear(2, 2))


# --- autograd graph size (in the spirit of PyTorch's composable checkpoint tests) -------


def test_reentrant_wrapper_gives_a_smaller_graph_same_as_pytorch():
    plain, ours, theirs = make_net(), make_net(), make_net()
    apply_activation_checkpointing(ours, lambda m: checkpoint_wrapper(m, CheckpointImpl.REENTRANT), is_block)
    torch_wrappers.apply_activation_checkpointing(
        theirs, lambda m: torch_wrappers.checkpoint_wrapper(m, torch_wrappers.CheckpointImpl.REENTRANT), is_block
    )
    x = torch.randn(6, 4, requires_grad=True)
    sizes = [graph_size(model(x).sum()) for model in (plain, ours, theirs)]
    assert sizes[1] < sizes[0]
    assert sizes[1] == sizes[2]


# --- torch.compile ----------------------------------------------------------------------


def test_wrapped_model_compiles_with_clean_names_and_same_gradients():
    plain, ours = make_net(), make_net()
    for net in (plain, ours):  # compiled dropout draws other numbers than eager: keep it out
        for module in net.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    apply_activation_checkpointing(ours, check_fn=is_block)
    compiled = torch.compile(ours, backend="aot_eager")
    try:
        out, xg, grads = run(compiled, mask=False)
    finally:
        torch._dynamo.reset()
    ref = run(plain, mask=False)
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(xg, ref[1])
    assert [n.removeprefix("_orig_mod.") for n in grads] == list(ref[2])
    for (name, g), g_ref in zip(grads.items(), ref[2].values()):
        torch.testing.assert_close(g, g_ref, msg=name)
