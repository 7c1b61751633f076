"""``memory_budget``: one parser, one meaning, in the backend's options, ``cc.plan`` and the
CLI; absolute sizes reach the backend's partitioner."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import ckpt_compile as cc
from ckpt_compile._budget import ACCEPTED, MemoryBudget, parse_memory_budget

KiB, MiB, GiB = 2**10, 2**20, 2**30


@pytest.mark.parametrize("value, fraction, nbytes", [
    (0.5, 0.5, None), (1.0, 1.0, None), (1e-6, 1e-6, None), ("0.25", 0.25, None), (" 1.0 ", 1.0, None),
    (4096, None, 4096), ("4096", None, 4096), (2, None, 2),
    ("4GiB", None, 4 * GiB), ("512MiB", None, 512 * MiB), ("8GB", None, 8 * 10**9), ("1.5 GiB", None, 3 * 2**29),
    ("64KiB", None, 64 * KiB), ("64kB", None, 64_000), ("64KB", None, 64_000), ("2 MB", None, 2 * 10**6),
    ("1TiB", None, 2**40), ("3tb", None, 3 * 10**12), ("2B", None, 2), ("100 b", None, 100), ("2e3 MB", None, 2 * 10**9),
])
def test_accepted_spellings(value, fraction, nbytes):
    budget = parse_memory_budget(value)
    assert (budget.fraction, budget.nbytes) == (fraction, nbytes)
    assert budget.value == (fraction if fraction is not None else nbytes)
    assert parse_memory_budget(budget) is budget


def test_bytes_of_a_fraction_and_of_a_size():
    assert parse_memory_budget(0.5).bytes_of(1001) == 500  # floored: never over the fraction
    assert parse_memory_budget("1KiB").bytes_of(10) == 1024  # absolute: the baseline does not matter
    with pytest.raises(AttributeError):
        MemoryBudget(fraction=0.5).fraction = 0.4  # frozen


@pytest.mark.parametrize("value, message", [
    (1, "memory_budget=1 is ambiguous: write 1.0 for all the activation bytes saved with no checkpointing, "
        "or a size such as '512MiB' for bytes"),
    (0, "memory_budget=0 is ambiguous: write a positive fraction such as 0.5, or a size such as '512MiB'"),
    ("1", "memory_budget=1 is ambiguous"),
    (True, f"memory_budget=True is ambiguous: a budget is not a flag; write {ACCEPTED}"),
    (False, "memory_budget=False is ambiguous"),
])
def test_ambiguous_values_say_how_to_write_them(value, message):
    with pytest.raises(ValueError) as info:
        parse_memory_budget(value)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("value, message", [
    (0.0, f"memory_budget=0.0: a float is a fraction and must be in (0, 1]; write {ACCEPTED}"),
    (1.5, "memory_budget=1.5: a float is a fraction and must be in (0, 1]; write"),
    (4096.0, "memory_budget=4096.0: a float is a fraction and must be in (0, 1] (for 4096 bytes pass the int 4096)"),
    (math.nan, "memory_budget=nan: a float is a fraction"),
    (math.inf, "memory_budget=inf: a float is a fraction"),
    (-3, f"memory_budget=-3: a budget in bytes must be positive; write {ACCEPTED}"),
    ("lots", f"memory_budget='lots' is not a budget; write {ACCEPTED}"),
    ("4 GiBs", "memory_budget='4 GiBs' is not a budget"),
    ("-1GiB", "memory_budget='-1GiB' is not a budget"),
    ("1B", "memory_budget='1B' is under 2 bytes"),
    ("0.1B", "memory_budget='0.1B' is under 2 bytes"),
    ("", "memory_budget='' is not a budget"),
])
def test_bad_values_name_what_was_received_and_what_is_accepted(value, message):
    with pytest.raises(ValueError) as info:
        parse_memory_budget(value)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("value", [None, [0.5], {"bytes": 4}, 1j])
def test_bad_types_are_type_errors(value):
    with pytest.raises(TypeError) as info:
        parse_memory_budget(value)
    assert str(info.value) == f"memory_budget must be {ACCEPTED}; got {type(value).__name__} {value!r}"


@pytest.mark.parametrize("value", [1, "lots", 1.5])
def test_every_entry_point_says_the_same(value):
    # One parser: the backend's options, cc.plan and the CLI all carry its message.
    from ckpt_compile.cli._main import _UsageError, parse_budget

    with pytest.raises(ValueError) as parsed:
        parse_memory_budget(value)
    core = str(parsed.value).removeprefix("memory_budget")
    with pytest.raises(ValueError) as backend:
        cc.backend_with(memory_budget=value)
    with pytest.raises(ValueError) as explain:
        cc.explain(nn.Linear(2, 2), torch.randn(1, 2), memory_budget=value)
    with pytest.raises(ValueError) as planned:
        cc.plan(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), torch.randn(1, 2), memory_budget=value)
    with pytest.raises(_UsageError) as cli:
        parse_budget(str(value))
    assert str(backend.value).startswith(f'backend="ckpt": option memory_budget{core}. Valid options:')
    assert str(explain.value) == str(backend.value)
    assert str(planned.value) == f"ckpt_compile.plan: memory_budget{core}"
    assert str(cli.value) == f"--memory-budget{core}"


# ---------------------------------------------------------------- absolute sizes in the backend


class _Net(nn.Module):
    """Two MLP blocks on a 64 x 64 input: every activation is a round number of KiB."""

    def __init__(self, regions: bool):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(2))
        self.regions = regions

    def forward(self, x):
        for block in self.blocks:
            x = x + (checkpoint(block, x, use_reentrant=False) if self.regions else block(x))
        return x.pow(2).mean()


def _x():
    return torch.randn(64, 64, requires_grad=True)


def _explain(net, **options):
    # Each explain is a fresh compile of the same forward: reset so Dynamo's recompile
    # limit never sends one to eager.
    torch._dynamo.reset()
    return cc.explain(net, _x(), inner="eager", **options)


def test_a_size_in_the_backend_is_bytes_of_activations():
    # The same partition as the fraction that comes to those bytes, and never more bytes.
    net = _Net(regions=False)
    full = _explain(net)
    no_checkpoint = full.baseline["saved_bytes"]
    assert full.saved_bytes == no_checkpoint
    wanted = no_checkpoint // 2
    by_size = _explain(net, memory_budget=f"{wanted}B")
    by_int = _explain(net, memory_budget=wanted)
    by_fraction = _explain(net, memory_budget=wanted / no_checkpoint)
    assert by_size.saved_bytes == by_int.saved_bytes == by_fraction.saved_bytes <= wanted
    assert by_int.recompute_flops == by_fraction.recompute_flops > full.recompute_flops
    assert by_size.to_dict()["options"]["memory_budget"] == wanted  # as written in Python: an int of bytes
    roomy = _explain(net, memory_budget="1GiB")  # more than it saves: the plain min-cut
    assert (roomy.saved_bytes, roomy.recompute_flops) == (full.saved_bytes, full.recompute_flops)


def test_a_size_with_checkpoint_regions():
    # Regions already save less than the no-checkpoint bytes: a size at or above what they
    # save keeps their plan; below what nothing can recompute, the error names the
    # smallest size in bytes (and as a fraction).
    net = _Net(regions=True)
    regions = _explain(net)
    assert regions.saved_bytes < regions.baseline["saved_bytes"]
    at = _explain(net, memory_budget=regions.saved_bytes)
    assert (at.saved_bytes, at.recompute_flops) == (regions.saved_bytes, regions.recompute_flops)
    with pytest.raises(ValueError) as info:
        _explain(net, memory_budget="1KiB")
    first = str(info.value).splitlines()[0]
    assert first.startswith('backend="ckpt": options memory_budget=1024 is infeasible for this graph: it must save '
                            f"at least {regions.saved_bytes} bytes of activations")
    assert first.endswith(f"Use memory_budget >= {regions.saved_bytes} (bytes) or a fraction >= "
                          f"{math.ceil(regions.saved_bytes / regions.baseline['saved_bytes'] * 1e4) / 1e4}.")
    with pytest.raises(ValueError, match="is infeasible"):
        _explain(net, memory_budget=regions.saved_bytes - 1)


def test_docstring_examples():
    import doctest

    import ckpt_compile._budget as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
