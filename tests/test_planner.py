"""``cc.plan``: predictions that hold on a real step, optimal choices, gradients unchanged,
meta-device models, errors, compile, and the CLI."""
from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ckpt_compile as cc
from ckpt_compile.planner._measure import wrap
from compile_corpus import retained_after_forward


class Transformer(nn.Module):
    def __init__(self, blocks=2, d=32, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.1, batch_first=True) for _ in range(blocks))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Residual(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(cc.checkpoint_name(torch.nn.functional.gelu(self.up(x)), "hidden"))


class MLP(nn.Module):
    def __init__(self, blocks=3, d=64):
        super().__init__()
        self.blocks = nn.ModuleList(Residual(d) for _ in range(blocks))
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x.tanh())


class ConvNet(nn.Module):
    def __init__(self, blocks=3, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()) for _ in range(blocks)])
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def _models():
    torch.manual_seed(0)
    return {
        "transformer": (Transformer(), (torch.randint(0, 50, (2, 16)),)),
        "mlp": (MLP(), (torch.randn(16, 64, requires_grad=True),)),
        "conv": (ConvNet(), (torch.randn(2, 3, 12, 12),)),
    }


MODELS = _models()


def _recompute_flops(model, inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        model(*inputs).float().sum().backward()
    return counter.get_total_flops()


# The conv net's head and stem save a larger share outside the blocks: its smallest
# feasible budget is about 0.66.
BUDGETS = {"transformer": (1.0, 0.6, 0.45), "mlp": (1.0, 0.6, 0.45), "conv": (1.0, 0.8, 0.7)}


@pytest.mark.parametrize("name, budget", [(n, b) for n in sorted(MODELS) for b in BUDGETS[n]])
def test_prediction_holds_on_a_real_step_and_fits_the_budget(name, budget):
    # Bytes are activations: what the forward leaves allocated for the backward, measured
    # by torch.profiler's memory timeline (parameters, buffers and inputs not counted).
    model, inputs = MODELS[name]
    unplanned = copy.deepcopy(model)
    baseline = retained_after_forward(lambda: unplanned(*inputs))
    plan = cc.plan(model, *inputs, memory_budget=budget)
    assert plan.baseline_saved_bytes == baseline
    assert plan.predicted_saved_bytes <= plan.budget_bytes == int(budget * baseline)
    planned = plan.apply(copy.deepcopy(model))
    measured = retained_after_forward(lambda: planned(*inputs))
    assert measured == plan.predicted_saved_bytes <= plan.budget_bytes
    extra = _recompute_flops(planned, inputs) - _recompute_flops(copy.deepcopy(model), inputs)
    assert extra == plan.predicted_recompute_flops


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_plan_is_the_cheapest_real_configuration_that_fits(name):
    # Every per-block combination of the options the planner measured, applied for real:
    # none that fits the budget recomputes fewer FLOPs than the plan.
    torch.manual_seed(0)
    model, inputs = (MLP(blocks=2), (torch.randn(16, 64, requires_grad=True),)) if name == "mlp" else MODELS[name]
    plan = cc.plan(model, *inputs, memory_budget=0.45)
    from ckpt_compile.planner._measure import options_for

    options = options_for(("hidden",) if name == "mlp" else (), offload=False)
    base_flops = _recompute_flops(copy.deepcopy(model), inputs)
    best = None
    for combo in itertools.product(options, repeat=len(plan.blocks)):
        trial = copy.deepcopy(model)
        for row, option in zip(plan.blocks, combo):
            parent, _, child = row.name.rpartition(".")
            setattr(trial.get_submodule(parent), child, wrap(trial.get_submodule(row.name), option))
        if retained_after_forward(lambda: trial(*inputs)) > plan.budget_bytes:
            continue
        flops = _recompute_flops(trial, inputs) - base_flops
        best = flops if best is None else min(best, flops)
    assert plan.predicted_recompute_flops == best


def test_gradients_after_apply_equal_the_unplanned_model():
    model, (ids,) = MODELS["transformer"]
    plan = cc.plan(model, ids, memory_budget=0.3)
    assert {row.choice for row in plan.blocks} != {"none"}
    reference, planned = copy.deepcopy(model), plan.apply(copy.deepcopy(model))
    for m in (reference, planned):
        torch.manual_seed(7)  # dropout: the recomputation draws the same masks
        m(ids).logsumexp(-1).sum().backward()
    assert [n for n, _ in planned.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert list(planned.state_dict()) == list(reference.state_dict())
    for (name, a), b in zip(reference.named_parameters(), planned.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_planning_leaves_the_model_untouched():
    model, inputs = MODELS["conv"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cc.plan(model, *inputs, memory_budget=0.8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # batch norm's counters too
    assert all(p.grad is None for p in model.parameters())


def test_a_meta_device_model_plans_like_the_real_one():
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = MLP()
    real, (x,) = MODELS["mlp"]
    on_meta = cc.plan(meta, torch.empty(16, 64, device="meta", requires_grad=True), memory_budget=0.4)
    on_cpu = cc.plan(real, x, memory_budget=0.4)
    assert [r.choice for r in on_meta.blocks] == [r.choice for r in on_cpu.blocks]
    assert on_meta.predicted_saved_bytes == on_cpu.predicted_saved_bytes
    assert on_meta.baseline_saved_bytes == on_cpu.baseline_saved_bytes


def test_names_marked_in_a_block_are_an_option():
    model, (x,) = MODELS["mlp"]
    plan = cc.plan(model, x, memory_budget=1.0)
    assert plan.predicted_recompute_flops == 0
    from ckpt_compile.planner._blocks import find_blocks
    from ckpt_compile.planner._measure import measure, options_for

    measured = measure(model, (x,), {}, find_blocks(model, None), lambda names: options_for(names, False))
    assert "save_names(hidden)" in [o.label for o in measured.blocks[0].options]


def test_blocks_argument():
    model, (x,) = MODELS["mlp"]
    assert [r.name for r in cc.plan(model, x, memory_budget=1.0, blocks=Residual).blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [r.name for r in cc.plan(model, x, memory_budget=1.0, blocks=(nn.Linear,)).blocks][-1] == "out"
    picked = cc.plan(model, x, memory_budget=1.0, blocks=lambda m: m is model.blocks[1])
    assert [r.name for r in picked.blocks] == ["blocks.1"]
    with pytest.raises(ValueError, match=r"blocks=.*Conv2d.*no submodule of the MLP matches"):
        cc.plan(model, x, memory_budget=0.5, blocks=nn.Conv2d)
    with pytest.raises(TypeError, match=r"plan\(blocks=\.\.\.\): expected an nn.Module class"):
        cc.plan(model, x, memory_budget=0.5, blocks="blocks")
    unused = MLP()
    unused.spare = Residual()  # a block the forward never calls
    with pytest.raises(ValueError, match=r"blocks \['spare'\] never ran"):
        cc.plan(unused, x, memory_budget=0.5, blocks=lambda m: m is unused.spare or m is unused.blocks[0])
    with pytest.raises(ValueError, match="found no repeated blocks"):
        cc.plan(nn.Linear(4, 4), torch.randn(2, 4), memory_budget=0.5)


@pytest.mark.parametrize("budget, error, text", [
    ([0.5], TypeError, r"^ckpt_compile.plan: memory_budget must be a float in \(0, 1\] .*; got list \[0.5\]"),
    (None, TypeError, r"memory_budget=\.\.\. \| peak_memory=\.\.\.\): give exactly one, got neither"),
    (True, ValueError, r"^ckpt_compile.plan: memory_budget=True is ambiguous"),
    (1, ValueError, r"^ckpt_compile.plan: memory_budget=1 is ambiguous: write 1.0 .* or a size such as '512MiB'"),
    (0, ValueError, r"^ckpt_compile.plan: memory_budget=0 is ambiguous"),
    (0.0, ValueError, r"memory_budget=0.0: a float is a fraction and must be in \(0, 1\]"),
    (1.5, ValueError, r"memory_budget=1.5: a float is a fraction and must be in \(0, 1\]"),
    (-3, ValueError, r"memory_budget=-3: a budget in bytes must be positive"),
    ("lots", ValueError, r"memory_budget='lots' is not a budget; write .*'512MiB'"),
])
def test_bad_budgets(budget, error, text):
    model, (x,) = MODELS["mlp"]
    with pytest.raises(error, match=text):
        cc.plan(model, x, memory_budget=budget)


def test_infeasible_budget_names_the_smallest_feasible_one():
    model, (x,) = MODELS["mlp"]
    with pytest.raises(ValueError, match="smallest feasible budget is") as info:
        cc.plan(model, x, memory_budget=64)
    smallest = int(str(info.value).split("smallest feasible budget is ")[1].split()[0])
    plan = cc.plan(model, x, memory_budget=smallest)  # exactly that many bytes fits
    assert plan.predicted_saved_bytes == smallest
    with pytest.raises(ValueError, match="smallest feasible"):
        cc.plan(model, x, memory_budget=smallest - 1)


def test_plan_prints_and_serialises():
    model, (x,) = MODELS["mlp"]
    plan = cc.plan(model, x, memory_budget=0.4)
    text = str(plan)
    assert all(row.name in text for row in plan.blocks) and "(outside blocks)" in text
    assert text.splitlines()[-1] == plan.summary() and "->" in plan.summary()
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["predicted_saved_bytes"] == plan.predicted_saved_bytes
    assert [b["choice"] for b in data["blocks"]] == [r.choice for r in plan.blocks]
    with pytest.raises(AttributeError):
        plan.budget_bytes = 1  # frozen


def test_apply_twice_is_an_error():
    model, (x,) = MODELS["mlp"]
    plan = cc.plan(model, x, memory_budget=0.3)
    planned = plan.apply(copy.deepcopy(model))
    with pytest.raises(ValueError, match="already a CheckpointWrapper"):
        plan.apply(planned)


def test_planned_model_trains_under_torch_compile():
    torch.manual_seed(0)
    model = Transformer(d=32)
    model.eval()  # no dropout: compiled and eager draw different masks
    ids = torch.randint(0, 50, (2, 8))
    plan = cc.plan(model, ids, memory_budget=0.4)
    assert {row.kind for row in plan.blocks} == {"checkpoint"}
    reference, planned = copy.deepcopy(model), plan.apply(copy.deepcopy(model))
    reference(ids).sum().backward()
    torch._dynamo.reset()
    compiled = torch.compile(planned, backend="ckpt", options={"inner": "eager"}, fullgraph=True)
    compiled(ids).sum().backward()
    for a, b in zip(reference.parameters(), planned.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_cli_plan(tmp_path, capsys):
    (tmp_path / "user_models.py").write_text(textwrap.dedent("""
        import torch

        def make():
            torch.manual_seed(0)
            blocks = [torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
                      for _ in range(3)]
            return torch.nn.Sequential(*blocks), (torch.randn(8, 32, requires_grad=True),)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ckpt_compile", "plan", "user_models:make", *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    table = run("--memory-budget", "0.7")
    assert table.returncode == 0, table.stderr
    assert "total" in table.stdout and table.stdout.strip().splitlines()[-1].startswith("saved ")
    low = run("--memory-budget", "100")
    assert low.returncode == 2 and "smallest feasible budget is" in low.stderr
    assert len(low.stderr.strip().splitlines()) == 1

    # The rest in-process (same code path, no interpreter start).
    from ckpt_compile.cli._main import main, parse_budget

    factory = str(tmp_path / "user_models.py") + ":make"
    assert main(["plan", factory, "--memory-budget", "20KiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget_bytes"] == 20 * 1024 and data["predicted_saved_bytes"] <= 20 * 1024
    assert main(["plan", factory, "--memory-budget", "lots"]) == 2
    assert "--memory-budget='lots' is not a budget; write a float in (0, 1]" in capsys.readouterr().err
    assert main(["plan", factory, "--memory-budget", "1"]) == 2
    assert "--memory-budget=1 is ambiguous: write 1.0" in capsys.readouterr().err
    assert (parse_budget("0.25"), parse_budget("4096"), parse_budget("1.5GiB"), parse_budget("2 MB")) == (0.25, 4096, 3 * 2**29, 2 * 10**6)


def test_offload_is_chosen_only_when_nothing_else_fits(monkeypatch):
    # Offload is an option on accelerators only; pretend the MLP is on one. Its cost (bytes
    # moved, in FLOP-equivalents) is far above recompute, so it appears only below the
    # smallest budget that checkpointing alone reaches, and its prediction holds.
    from ckpt_compile.planner import _plan

    model, (x,) = MODELS["mlp"]
    with pytest.raises(ValueError, match="smallest feasible budget is") as info:
        cc.plan(model, x, memory_budget=64)
    without = int(str(info.value).split("smallest feasible budget is ")[1].split()[0])
    monkeypatch.setattr(_plan, "_on_accelerator", lambda *a: True)
    assert "offload" not in {r.choice for r in cc.plan(model, x, memory_budget=0.5).blocks}
    plan = cc.plan(model, x, memory_budget=without - 1)
    assert "offload" in {r.choice for r in plan.blocks}
    planned = plan.apply(copy.deepcopy(model))
    assert isinstance(planned.blocks[[r.choice for r in plan.blocks].index("offload")], cc.OffloadWrapper)
    # Device bytes: what autograd saves, less the parameters and the input (alive anyway),
    # plus the CPU RNG state each checkpointed block stashes (device memory here, on the CPU).
    from ckpt_compile.diagnostics._graph_stats import saved_storages

    alive = {t.untyped_storage().data_ptr() for t in (x, *planned.parameters())}
    saved = sum(n for ptr, n in saved_storages(lambda: planned(x)).items() if ptr not in alive)
    stashed = torch.get_rng_state().nbytes * sum(r.kind == "checkpoint" for r in plan.blocks)
    assert saved + stashed == plan.predicted_saved_bytes <= without - 1


def test_a_block_with_state_between_calls_gets_a_clear_error():
    class Stateful(nn.Module):  # like a KV cache: each call reads the previous call's output
        def __init__(self):
            super().__init__()
            self.lin, self.prev = nn.Linear(8, 8), None

        def forward(self, x):
            out = self.lin(x).tanh() + (self.prev if self.prev is not None else 0)
            self.prev = out
            return out

    model = nn.Sequential(Stateful(), Stateful())
    with pytest.raises(RuntimeError, match=r"measuring block '0' \(Stateful\) failed: .*use_cache=False"):
        cc.plan(model, torch.randn(4, 8, requires_grad=True), memory_budget=0.5)
