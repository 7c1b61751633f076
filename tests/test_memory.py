"""``cc.estimate_memory`` against ``cc.measure_memory`` (CPU profiler memory timeline) on the
corpus, with every checkpoint entry point, and ``StepMemory`` as data.

Accuracy: the estimate's step peak within 1% of the measured one (conv nets: 3%, oneDNN's
convolution scratchpad is not modelled; see ``ckpt_compile/memory/_tracker.py``).
"""
import functools
import gc
import json
import math

import pytest
import torch
import torch.nn as nn

import ckpt_compile as cc
import memory_utils as U

_TOLERANCE = {"conv": 0.03}

# Every entry point on the MLP with AdamW, most on GPT; the others with the common ones;
# SGD with momentum on a few. About 40 cases, ~1 s each on a free machine.
CASES = (
    [("mlp", w, "adamw") for w in U.ALL_WRAPS]
    + [("gpt", w, "adamw") for w in ("none", "ckpt_checkpoint", "torch_checkpoint_wrapper", "selective",
                                     "offload_wrapper", "offload_policy", "torch_composable", "plan")]
    + [(m, w, "adamw") for m in ("hf_gpt2", "hf_llama", "bert", "conv")
       for w in ("none", "ckpt_checkpoint", "torch_checkpoint", "selective", "plan")]
    + [("mlp", "none", "sgd"), ("gpt", "checkpoint_wrapper", "sgd"), ("hf_gpt2", "none", "sgd"),
       ("conv", "checkpoint_wrapper", "sgd")]
)


@pytest.mark.parametrize("name,wrap,optimizer", CASES)
def test_estimate_matches_the_measured_peak(name, wrap, optimizer):
    model, x = U.build(name, wrap)
    est = cc.estimate_memory(model, x, optimizer=U.OPTIMIZERS[optimizer])
    real = U.measured(model, x, U.OPTIMIZERS[optimizer])
    tolerance = _TOLERANCE.get(name, 0.01)
    assert abs(est.peak_bytes - real.peak_bytes) <= tolerance * real.peak_bytes, (est, real)
    # The profiler files a few bytes (rotary frequencies) as inputs rather than buffers.
    assert abs(est.start_bytes - real.start_bytes) <= 0.001 * real.start_bytes
    assert est.peak_phase == real.peak_phase


def test_checkpointing_lowers_the_estimated_peak_as_it_lowers_the_measured_one():
    peaks = {}
    for wrap in ("none", "ckpt_checkpoint"):
        model, x = U.build("gpt", wrap)
        peaks[wrap] = (cc.estimate_memory(model, x, optimizer=torch.optim.AdamW).peak_bytes,
                       U.measured(model, x, torch.optim.AdamW).peak_bytes)
    (est_none, real_none), (est_ckpt, real_ckpt) = peaks["none"], peaks["ckpt_checkpoint"]
    assert est_ckpt < est_none and real_ckpt < real_none
    assert abs((est_none - est_ckpt) - (real_none - real_ckpt)) <= 0.05 * (real_none - real_ckpt)


# ------------------------------------------------------------------ exact figures


def _two_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512, bias=False), nn.ReLU(), nn.Linear(512, 512, bias=False))


def test_breakdown_counts_what_is_alive_at_the_peak_exactly():
    # Two 1 MiB weights, AdamW (2 MiB of state per weight), input 512 x 512 (1 MiB).
    mib = 2**20
    model, x = _Wrap(_two_linears(), torch.sum), torch.randn(512, 512)
    est = cc.estimate_memory(model, x, optimizer=torch.optim.AdamW)
    # AdamW's "step" counters: one 4-byte float tensor per parameter.
    assert est.start_bytes == 2 * mib + 4 * mib + 2 * 4 + mib
    assert est.breakdown["parameters"] == 2 * mib
    assert est.breakdown["optimizer_state"] == 4 * mib + 8
    assert sum(est.breakdown.values()) == est.peak_bytes
    assert math.isclose(est.peak_bytes, U.measured(model, x, torch.optim.AdamW).peak_bytes, rel_tol=0.01)


class _Logits(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 4096)  # the big logits: the peak sits here

    def forward(self, x):
        return self.proj(x).pow(2).mean()


def test_peak_module_names_the_module_running():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), _Logits())
    est = cc.estimate_memory(model, torch.randn(256, 64))
    assert est.peak_phase == "backward" and est.peak_module == "2"
    assert {"0", "2", "2.proj"} <= {p.module for p in est.timeline if p.phase == "forward"}
    assert {"0", "2", "2.proj"} <= {p.module for p in est.timeline if p.phase == "backward"}


def test_a_meta_model_is_estimated_without_compute_and_equals_the_real_one():
    model, x = _two_linears(), torch.randn(512, 512)
    with torch.device("meta"):
        meta = _two_linears()
    real = cc.estimate_memory(model, x, optimizer=torch.optim.AdamW, loss_fn=torch.sum)
    fake = cc.estimate_memory(meta, x.to("meta"), optimizer=torch.optim.AdamW, loss_fn=torch.sum)
    assert fake.peak_bytes == real.peak_bytes and fake.breakdown == real.breakdown
    assert fake.device == "meta"


def test_the_model_is_left_as_it_was_and_nothing_stays_alive():
    from torch._subclasses.fake_tensor import FakeTensor

    def fakes():
        gc.collect()
        return sum(type(o) is FakeTensor for o in gc.get_objects())

    model, x = U.build("gpt", "ckpt_checkpoint")
    alive = fakes()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    for _ in range(2):
        cc.estimate_memory(model, x, optimizer=torch.optim.AdamW)
    assert fakes() == alive
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_loss_comes_from_loss_fn_then_output_loss_then_a_scalar():
    class Out:
        def __init__(self, loss):
            self.loss = loss

    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    by_fn = cc.estimate_memory(_Wrap(lin, lambda y: y), x, loss_fn=lambda out: out.sum())
    by_attr = cc.estimate_memory(_Wrap(lin, lambda y: Out(y.sum())), x)
    by_scalar = cc.estimate_memory(_Wrap(lin, lambda y: y.sum()), x)
    assert by_attr.peak_bytes == by_scalar.peak_bytes
    assert by_fn.peak_bytes == by_scalar.peak_bytes + 4 * 8 * 4  # the output stays alive through backward
    with pytest.raises(TypeError, match=r"loss must be a scalar tensor; the model's output is a tensor of shape \(4, 8\)"):
        cc.estimate_memory(lin, x)


class _Wrap(nn.Module):
    def __init__(self, inner, post):
        super().__init__()
        self.inner, self.post = inner, post

    def forward(self, x):
        return self.post(self.inner(x))


def test_bad_arguments_are_named():
    lin, x = nn.Linear(4, 4), torch.randn(2, 4)
    with pytest.raises(TypeError, match="optimizer must be an optimizer class or a callable.*got an instance of SGD"):
        cc.estimate_memory(lin, x, optimizer=torch.optim.SGD(lin.parameters(), lr=0.1), loss_fn=torch.sum)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        cc.estimate_memory(lin, x, world_size=0, loss_fn=torch.sum)
    with pytest.raises(TypeError, match="model must be an nn.Module, got builtin"):
        cc.estimate_memory(torch.sin, x)
    with pytest.raises(TypeError, match="fn must be a callable"):
        cc.measure_memory(3)


def test_step_memory_is_json_and_a_short_table():
    model, x = U.build("mlp", "none")
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    est = cc.estimate_memory(model, x, optimizer=sgd)
    data = json.loads(json.dumps(est.to_dict()))
    assert data["peak_bytes"] == est.peak_bytes and data["peak_phase"] == est.peak_phase
    assert set(data["breakdown"]) == set(cc.memory.CATEGORIES)
    assert max(sum(row[3]) for row in data["timeline"]) == est.peak_bytes
    text = str(est)
    assert text.splitlines()[0].startswith("step peak ") and "optimizer state" in text
    assert list(est.phase_peaks()) == ["forward", "backward", "optimizer"]  # the model computes its loss


def test_measure_memory_counts_everything_alive():
    mib = 2**20
    w = torch.randn(512, 512, requires_grad=True)
    m = cc.measure_memory(lambda: (w @ w).sum().backward())
    # w (1 MiB) alive throughout; w @ w (1 MiB) and the two 1 MiB products of backward.
    assert m.start_bytes >= mib
    assert m.peak_bytes >= 3 * mib
    w.grad = None
    est = cc.estimate_memory(_Param(w), loss_fn=lambda out: out)
    assert math.isclose(est.peak_bytes, m.peak_bytes, rel_tol=0.01), (est, m)


class _Param(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.detach().clone())

    def forward(self):
        return (self.w @ self.w).sum()


def test_write_picture_draws_the_step(tmp_path):
    model, x = U.build("gpt", "ckpt_checkpoint")
    est = cc.estimate_memory(model, x, optimizer=torch.optim.AdamW)
    svg = tmp_path / "step.svg"
    cc.write_picture(est, svg)
    text = svg.read_text()
    assert text.startswith("<svg") and "peak" in text and "optimizer state" in text
    html = tmp_path / "step.html"
    cc.write_picture(U.measured(model, x, torch.optim.AdamW), html)
    assert "<svg" in html.read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimate_matches_the_cuda_allocator_peak():
    model, x = U.build("gpt", "ckpt_checkpoint")
    model, x = model.cuda(), x.cuda()
    est = cc.estimate_memory(model, x, optimizer=torch.optim.AdamW)
    opt = torch.optim.AdamW(model.parameters())

    def step():
        loss = model(x)
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    real = cc.measure_memory(step)
    assert abs(est.peak_bytes - real.peak_bytes) <= 0.05 * real.peak_bytes, (est, real)


_FACTORY = '''
import torch

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))

    def forward(self, x):
        return self.body(x).pow(2).mean()

def make():
    torch.manual_seed(0)
    return Model(), torch.randn(32, 64)
'''


def test_cli_prints_the_estimate_and_writes_the_picture(tmp_path, capsys):
    import importlib.util

    from ckpt_compile.cli._main import main

    factory = tmp_path / "factory.py"
    factory.write_text(_FACTORY)
    assert main(["memory", f"{factory}:make", "--optimizer", "sgd", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    spec = importlib.util.spec_from_file_location("factory", factory)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, x = module.make()
    expected = cc.estimate_memory(model, x, optimizer=U.OPTIMIZERS["sgd"])
    assert printed.startswith(str(expected))
    assert json.loads((tmp_path / "out" / "memory.json").read_text())["peak_bytes"] == expected.peak_bytes
    assert "<svg" in (tmp_path / "out" / "memory.html").read_text()
    assert main(["memory", f"{factory}:make", "--world-size", "0"]) == 2
    assert "--world-size must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("wrap,budget", [("none", 1.0), ("none", 0.5), ("ckpt_checkpoint", 1.0)])
def test_estimate_matches_a_compiled_step(wrap, budget):
    model, x = U.build("gpt", wrap)
    compiled = torch.compile(model, backend=cc.backend_with(inner="eager", memory_budget=budget))
    est = cc.estimate_memory(compiled, x, optimizer=torch.optim.AdamW)
    real = U.measured(compiled, x, torch.optim.AdamW)
    assert abs(est.peak_bytes - real.peak_bytes) <= 0.05 * real.peak_bytes, (est, real)


# Checkpointed blocks under FSDP2 are left out: the profiler's memory timeline itself fails
# on that step now and then ("version mismatch" in torch/profiler/_memory_profiler.py).
@pytest.mark.parametrize("wrap", ["none"])
def test_world_size_estimates_one_rank_of_a_gloo_fsdp2_run(fsdp2_world, wrap):
    # Parameters, gradients and optimizer state sharded, one block all-gathered at a time
    # plus the backward prefetch; FSDP2's communication buffers are not modelled. The
    # measured per-rank peak itself varies from run to run with the ranks' timing (the
    # checkpointed step: 1.77 and 1.97 MB seen), hence the loose bound; the bound below it
    # is what sharding must buy.
    results = fsdp2_world.results(f"gpt-{wrap}")
    assert len(results) == 2, fsdp2_world.error
    for r in results:
        assert abs(r["estimate"] - r["measured"]) <= 0.12 * r["measured"], r
        assert r["estimate_phase"] == r["measured_phase"]
    single = cc.estimate_memory(*U.build("gpt", wrap), optimizer=torch.optim.AdamW)
    assert results[0]["estimate"] < single.peak_bytes


@pytest.fixture(scope="module")
def fsdp2_world():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    import dist_utils

    return dist_utils.run_world([dist_utils.Scenario(f"gpt-{wrap}", U.fsdp2_peak, {"name": "gpt", "wrap": wrap})
                                 for wrap in ("none",)], timeout_s=240)


@pytest.mark.parametrize("module", ["ckpt_compile.memory._estimate", "ckpt_compile.memory._measure",
                                    "ckpt_compile.memory._step", "ckpt_compile.diagnostics._step_picture"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed


def test_public_names():
    for name in ("estimate_memory", "measure_memory", "StepMemory"):
        assert name in cc.__all__ and getattr(cc, name) is getattr(cc.memory, name)
