"""Wrapped layers stay findable by class, as with PyTorch's wrapper, under clean names (issue 10).

Reference: ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` on the same model.
Code that walks ``modules()`` by class (FSDP auto-wrap policies, LoRA injection, type-keyed
``model.apply``) must find every wrapped layer, while no name shows a wrapper prefix.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from ckpt_compile.wrappers import (
    CheckpointWrapper,
    OffloadWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    offload_wrapper,
)

torch_wrappers = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")


class Layer(nn.Module):
    gain = 1.0  # a class default that an init function may override per layer

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 16)
        self.down = nn.Linear(16, d)
        self.forwards = 0  # forward runs, recomputations included

    def forward(self, x):
        self.forwards += 1
        return x + self.gain * self.down(torch.tanh(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x).sum()


class LoRALinear(nn.Module):
    """What LoRA injection puts in place of a Linear: the base plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.a.t() @ self.b.t()


def make_model(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return Model()


def is_layer(module: nn.Module) -> bool:
    return isinstance(module, Layer)


WRAPPERS = {
    "checkpoint": (checkpoint_wrapper, torch_wrappers.checkpoint_wrapper),
    "offload": (offload_wrapper, torch_wrappers.offload_wrapper),
    "offload_of_checkpoint": (
        lambda m: offload_wrapper(checkpoint_wrapper(m)),
        lambda m: torch_wrappers.offload_wrapper(torch_wrappers.checkpoint_wrapper(m)),
    ),
}


def counts_by_class(modules) -> dict[str, int]:
    modules = list(modules)
    counts = {cls.__name__: sum(isinstance(m, cls) for m in modules) for cls in (Model, Layer, nn.Linear, nn.LayerNorm)}
    for ours, theirs in (
        (CheckpointWrapper, torch_wrappers.CheckpointWrapper),
        (OffloadWrapper, torch_wrappers.OffloadWrapper),
    ):
        counts[ours.__name__] = sum(isinstance(m, (ours, theirs)) for m in modules)
    return counts


def wrapped_pair(kind: str) -> tuple[Model, Model, Model]:
    ours_fn, theirs_fn = WRAPPERS[kind]
    plain, ours, theirs = make_model(), make_model(), make_model()
    apply_activation_checkpointing(ours, ours_fn, is_layer)
    torch_wrappers.apply_activation_checkpointing(theirs, theirs_fn, is_layer)
    return plain, ours, theirs


@pytest.mark.parametrize("kind", WRAPPERS)
def test_counts_by_class_over_modules_equal_pytorchs_and_names_stay_clean(kind):
    plain, ours, theirs = wrapped_pair(kind)
    expected = counts_by_class(theirs.modules())
    assert expected["Layer"] == 2  # the reference really lists the wrapped layers
    assert counts_by_class(ours.modules()) == expected
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in plain.named_modules()]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(ours.state_dict()) == list(plain.state_dict())
    layer = ours.layers[0]
    assert isinstance(layer, Layer) and isinstance(layer._checkpoint_wrapped_module, Layer)
    assert isinstance(layer, OffloadWrapper if kind.startswith("offload") else CheckpointWrapper)
    # Pickled and copied models keep the class too.
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert counts_by_class(clone.modules()) == expected
        assert type(clone.layers[1]) is type(layer)


def test_fsdp_module_wrap_policy_after_wrapping_finds_every_layer():
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, _recursive_wrap

    found = {}
    for name in ("ours", "theirs"):
        _, ours, theirs = wrapped_pair("checkpoint")
        model = {"ours": ours, "theirs": theirs}[name]
        seen = []

        def record(module, **kwargs):
            seen.append(module)
            return module

        _recursive_wrap(
            model, ModuleWrapPolicy({Layer}), wrapper_cls=record, ignored_modules=set(),
            ignored_params=set(), only_wrap_children=True,
        )
        found[name] = seen
    assert len(found["ours"]) == len(found["theirs"]) == 2
    assert all(isinstance(m, CheckpointWrapper) and isinstance(m, Layer) for m in found["ours"])


def test_our_class_policy_applied_a_second_time_wraps_every_layer_again():
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    plain, ours, theirs = wrapped_pair("checkpoint")
    apply_activation_checkpointing(ours, offload_wrapper, auto_wrap_policy=ModuleWrapPolicy({Layer}))
    torch_wrappers.apply_activation_checkpointing(
        theirs, torch_wrappers.offload_wrapper, auto_wrap_policy=ModuleWrapPolicy({Layer})
    )
    counts = counts_by_class(ours.modules())
    assert counts["OffloadWrapper"] == counts["CheckpointWrapper"] == counts["Layer"] == 2
    assert counts == counts_by_class(theirs.modules())
    assert all(isinstance(layer._checkpoint_wrapped_module, CheckpointWrapper) for layer in ours.layers)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in plain.named_parameters()]


def inject_lora(model: nn.Module) -> None:
    """LoRA-style injection: find Linears of Layers by name, replace them on their parent."""
    targets = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(isinstance(p, Layer) for p in _parents(model, name))
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = dict(model.named_modules())[parent_name]
        torch.manual_seed(len(name))
        setattr(parent, child, LoRALinear(getattr(parent, child)))


def _parents(model: nn.Module, name: str):
    modules = dict(model.named_modules())
    parts = name.split(".")
    return [modules[".".join(parts[:i])] for i in range(1, len(parts))]


def test_linear_replaced_after_wrapping_trains_and_is_checkpointed():
    plain, ours, _ = wrapped_pair("checkpoint")
    inner = [layer._checkpoint_wrapped_module for layer in ours.layers]
    inject_lora(plain)
    inject_lora(ours)
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == 4
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert isinstance(inner[0].up, LoRALinear)  # the module whose forward runs sees it
    for model in (plain, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            torch.manual_seed(step)
            model(torch.randn(4, 8, requires_grad=True)).backward()
            if step == 0:
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
        model.grads = grads
    assert list(ours.grads) == list(plain.grads)
    for name, grad in plain.grads.items():
        torch.testing.assert_close(ours.grads[name], grad, rtol=0, atol=0, msg=name)
    for p, p_ref in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0)
    # Two steps: forward and recomputation each time when checkpointed, forward only without.
    assert [m.forwards for m in inner] == [4, 4]
    assert [m.forwards for m in plain.layers] == [2, 2]


def test_type_keyed_apply_reaches_the_wrapped_layers_like_pytorch():
    def init(module):
        if isinstance(module, Layer):
            nn.init.constant_(module.norm.weight, 0.5)
            module.gain = 0.25  # a per-layer setting the layer's forward reads
        elif isinstance(module, nn.Linear):
            nn.init.constant_(module.bias, 0.1)

    plain, ours, theirs = wrapped_pair("checkpoint")
    calls = {}
    for name, model in (("plain", plain), ("ours", ours), ("theirs", theirs)):
        seen = []
        model.apply(lambda m: (seen.append(m), init(m)))
        calls[name] = counts_by_class(seen)
    assert calls["ours"] == calls["theirs"] and calls["ours"]["Layer"] == calls["plain"]["Layer"] == 2
    assert all(layer._checkpoint_wrapped_module.gain == 0.25 for layer in ours.layers)
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_subclasses_metaclasses_and_keyword_construction_keep_the_class():
    class Meta(type(nn.Module)):
        pass

    class WithMeta(Layer, metaclass=Meta):
        pass

    class MyWrapper(CheckpointWrapper):
        pass

    for wrapper in (
        checkpoint_wrapper(WithMeta()),  # a layer with its own metaclass
        MyWrapper(Layer()),  # a user's wrapper class
        CheckpointWrapper(mod=Layer()),  # PyTorch's keyword
        OffloadWrapper(Layer()),
    ):
        assert isinstance(wrapper, Layer) and isinstance(wrapper, (CheckpointWrapper, OffloadWrapper))
        x = torch.randn(2, 8, requires_grad=True)
        wrapper(x).sum().backward()
        assert wrapper._checkpoint_wrapped_module.forwards == (1 if isinstance(wrapper, OffloadWrapper) else 2)
    assert isinstance(MyWrapper(Layer()), MyWrapper)
