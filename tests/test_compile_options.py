"""backend="ckpt" without running a compile: options, registration, the tagging pass."""
from __future__ import annotations

import functools
import math
import pathlib
import re
import subprocess
import sys
import textwrap

import expecttest
import pytest
import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

import ckpt_compile as cc
from ckpt_compile.compile import _backend
from ckpt_compile._budget import ACCEPTED
from ckpt_compile.compile._options import BackendOptions
from ckpt_compile.passes import tag_recompute

aten = torch.ops.aten


# ---------------------------------------------------------------- options


class TestOptionMessages(expecttest.TestCase):
    def test_unknown_option_lists_valid_ones(self):
        with self.assertRaises(ValueError) as e:
            BackendOptions.from_mapping({"budget": 0.5})
        self.assertExpectedInline(str(e.exception), """backend="ckpt": unknown option 'budget'. Valid options: memory_budget (a fraction in (0, 1] of the no-checkpoint activation bytes, or bytes: '512MiB', '8GB' or an int; default 1.0), inner ('inductor' or 'eager', default 'inductor'), report (False, True, or a path to write JSON, default False).""")

    def test_budget_out_of_range(self):
        with self.assertRaises(ValueError) as e:
            BackendOptions.from_mapping({"memory_budget": 1.5})
        self.assertExpectedInline(str(e.exception), """backend="ckpt": option memory_budget=1.5: a float is a fraction and must be in (0, 1]; write a float in (0, 1] (a fraction of the activation bytes saved with no checkpointing), an int >= 2 (bytes), or a size such as '4GiB', '512MiB', '8GB', '1.5 GiB' (units B, kB/KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024). Valid options: memory_budget (a fraction in (0, 1] of the no-checkpoint activation bytes, or bytes: '512MiB', '8GB' or an int; default 1.0), inner ('inductor' or 'eager', default 'inductor'), report (False, True, or a path to write JSON, default False).""")


def test_defaults():
    assert BackendOptions.from_mapping(None) == BackendOptions(1.0, "inductor", False)
    assert BackendOptions.from_mapping({}) == BackendOptions()


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.0000001, math.nan, math.inf, True, 0, 1, -5, "lots", "4 GiBs", None, [0.5]])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="memory_budget.*Valid options"):
        BackendOptions.from_mapping({"memory_budget": budget})


@pytest.mark.parametrize("budget, stored", [
    (1.0, 1.0), (0.25, 0.25), (1e-6, 1e-6), ("0.5", 0.5),            # fractions
    (4096, 4096), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9), ("1.5 GiB", 3 * 2**29),   # bytes
])
def test_good_budget_is_kept_as_written_in_python(budget, stored):
    # A fraction stays a float, bytes become an int: options print and serialise as given.
    opts = BackendOptions.from_mapping({"memory_budget": budget})
    assert opts.memory_budget == stored and type(opts.memory_budget) is type(stored)
    assert BackendOptions.from_mapping({"memory_budget": opts.memory_budget}) == opts  # explain() passes it on
    assert (opts.budget.fraction, opts.budget.nbytes) == ((stored, None) if isinstance(stored, float) else (None, stored))


def test_ambiguous_budget_says_how_to_write_it():
    with pytest.raises(ValueError, match=r"memory_budget=1 is ambiguous: write 1.0 for all the activation bytes .* or a size such as '512MiB'"):
        BackendOptions.from_mapping({"memory_budget": 1})


@pytest.mark.parametrize("inner", ["aot_eager", "Inductor", None, 1])
def test_bad_inner(inner):
    with pytest.raises(ValueError, match="'inner' must be one of"):
        BackendOptions.from_mapping({"inner": inner})


@pytest.mark.parametrize("report", [1, 0.5, "", ["a"]])
def test_bad_report(report):
    with pytest.raises(ValueError, match="report"):
        BackendOptions.from_mapping({"report": report})


def test_report_path_accepted(tmp_path):
    opts = BackendOptions.from_mapping({"report": tmp_path / "r.json"})
    assert opts.report == str(tmp_path / "r.json")


def test_options_frozen():
    opts = BackendOptions()
    with pytest.raises(Exception):
        opts.inner = "eager"


def test_options_must_be_a_mapping():
    with pytest.raises(ValueError, match="options must be a dict, got list"):
        BackendOptions.from_mapping([("inner", "eager")])


def test_backend_rejects_mode_and_bad_options_before_compiling():
    gm = fx.symbolic_trace(torch.nn.ReLU())
    with pytest.raises(ValueError, match="does not take mode='max-autotune'"):
        cc.backend(gm, [torch.randn(2)], mode="max-autotune")
    with pytest.raises(ValueError, match="unknown option 'fullgraph'"):
        cc.backend(gm, [torch.randn(2)], options={"fullgraph": True})


VALID = ("Valid options: memory_budget (a fraction in (0, 1] of the no-checkpoint activation bytes, or bytes: '512MiB', '8GB' or an int; default 1.0), inner ('inductor' or 'eager', "
         "default 'inductor'), report (False, True, or a path to write JSON, default False).")


def test_torch_compile_bad_option_is_our_value_error(monkeypatch):
    # torch.compile wraps a backend's exceptions in BackendCompilerFailed ("backend='ckpt'
    # raised:" on the first line, not a ValueError): ours must come through as they are.
    monkeypatch.setattr(_backend, "_compile_eager", _no_compile)
    torch._dynamo.reset()
    f = torch.compile(torch.sin, backend="ckpt", options={"memory_budget": 0, "inner": "eager"})
    with pytest.raises(ValueError) as e:
        f(torch.randn(3))
    assert str(e.value).splitlines()[0] == (
        f"backend=\"ckpt\": option memory_budget=0 is ambiguous: write a positive fraction such as 0.5, or a size "
        f"such as '512MiB'. {VALID}")
    assert isinstance(e.value, torch._dynamo.exc.BackendCompilerFailed)  # what torch users catch still works
    torch._dynamo.reset()


def _no_compile(*args, **kwargs):
    raise AssertionError("compiled although the options were bad")


@pytest.mark.parametrize("options, message", [
    ({"memory_budget": 2.0}, "option memory_budget=2.0: a float is a fraction and must be in (0, 1] (for 2 bytes "
                             f"pass the int 2); write {ACCEPTED}"),
    ({"inner": "aot_eager"}, "option 'inner' must be one of ('inductor', 'eager'), got 'aot_eager'"),
    ({"budget": 0.5}, "unknown option 'budget'"),
    ({"report": "{tmp}"}, "option 'report' must be a file path (JSON is written there), got the folder '{tmp}'"),
    ({"report": "{tmp}/missing/r.json"},
     "option 'report' is '{tmp}/missing/r.json', but its folder '{tmp}/missing' does not exist; "
     "pass a file path in an existing folder"),
    ({"report": "{tmp}/a_file/r.json"},
     "option 'report' is '{tmp}/a_file/r.json', but its folder '{tmp}/a_file' is not a folder; "
     "pass a file path in an existing folder"),
])
def test_backend_with_validates_where_it_is_written(tmp_path, options, message):
    (tmp_path / "a_file").write_text("")
    options = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(ValueError) as e:
        cc.backend_with(**options)
    assert str(e.value) == f'backend="ckpt": {message.format(tmp=tmp_path)}. {VALID}'


def test_bad_report_folder_fails_before_compiling(tmp_path, monkeypatch):
    monkeypatch.setattr(_backend, "_compile_eager", _no_compile)
    torch._dynamo.reset()
    path = str(tmp_path / "missing" / "r.json")
    f = torch.compile(torch.sin, backend="ckpt", options={"report": path, "inner": "eager"})
    with pytest.raises(ValueError, match=r"option 'report' is .*r.json', but its folder .* does not exist"):
        f(torch.randn(3, requires_grad=True))
    torch._dynamo.reset()


def test_backend_with_compiles_like_the_string_form(tmp_path):
    lin = torch.nn.Linear(4, 4)

    def f(x):
        return cc.checkpoint(lambda t: lin(t).relu().sin(), x, use_reentrant=False).sum()

    configured = cc.backend_with(inner="eager", report=str(tmp_path / "r.json"))
    assert configured == cc.backend_with(inner="eager", report=str(tmp_path / "r.json"))
    assert repr(configured) == f"backend_with(memory_budget=1.0, inner='eager', report={str(tmp_path / 'r.json')!r})"
    x = torch.randn(3, 4, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(f, backend=configured, fullgraph=True)(x).backward()
    want = torch.autograd.grad(f(x), x)[0]
    assert torch.equal(x.grad, want)
    assert cc.Report.read(tmp_path / "r.json").saved_bytes == 0  # the region saves nothing
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"^backend_with\(...\) already holds the options; torch.compile\(options="):
        torch.compile(f, backend=configured, options={"inner": "eager"})(x)
    torch._dynamo.reset()


def _net_with_region():
    torch.manual_seed(0)
    l1, l2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def f(x):
        h = cc.checkpoint(lambda t: l2(l1(t).relu()).relu(), x, use_reentrant=False)
        return (h * h).sum()

    return f


def _net_with_two_regions():
    # The first region's output feeds the second and comes from a matmul: a boundary that
    # must be saved, so a tiny budget cannot be met (one region alone saves nothing).
    torch.manual_seed(0)
    blocks = [(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)) for _ in range(2)]

    def f(x):
        for l1, l2 in blocks:
            x = cc.checkpoint(lambda t: l2(l1(t).relu()).relu(), x, use_reentrant=False)
        return (x * x).sum()

    return f


def test_infeasible_budget_is_our_value_error():
    torch._dynamo.reset()
    f = torch.compile(_net_with_two_regions(), backend="ckpt", options={"memory_budget": 0.01, "inner": "eager"})
    with pytest.raises(ValueError) as e:
        f(torch.randn(32, 64))
    first = str(e.value).splitlines()[0]
    assert first.startswith('backend="ckpt": options memory_budget=0.01 is infeasible for this graph')
    assert re.search(r"Use memory_budget >= 0\.\d+\.$", first), first
    torch._dynamo.reset()


@pytest.mark.parametrize("configured", [False, True])
def test_report_true_is_shown_without_logging_setup(capsys, caplog, configured):
    import logging

    f = _net_with_region()
    log = logging.getLogger("ckpt_compile")
    torch._dynamo.reset()
    if configured:  # a user who set up logging gets the report there
        caplog.set_level(logging.INFO, logger="ckpt_compile")
        torch.compile(f, backend="ckpt", options={"report": True, "inner": "eager"})(torch.randn(32, 64))
        assert 'backend="ckpt": 1 graph, 1 checkpoint region' in caplog.text
        assert capsys.readouterr().err == ""
    else:  # no handler anywhere (as in a plain script): stderr
        propagate, log.propagate = log.propagate, False
        try:
            torch.compile(f, backend="ckpt", options={"report": True, "inner": "eager"})(torch.randn(32, 64))
        finally:
            log.propagate = propagate
        err = capsys.readouterr().err
        assert err.startswith('backend="ckpt": 1 graph, 1 checkpoint region, memory_budget 1.0\n')
        assert "saved" in err.splitlines()[-1]
    torch._dynamo.reset()


# ---------------------------------------------------------------- registration


def test_entry_point_resolves_without_importing_the_package():
    # A fresh interpreter that only imports torch: the entry point must find us.
    script = textwrap.dedent(
        """
        import sys, torch
        from torch._dynamo.backends.registry import lookup_backend
        assert "ckpt_compile" not in sys.modules
        fn = lookup_backend("ckpt")
        print(fn.__module__, fn.__qualname__)
        f = torch.compile(lambda x: torch.utils.checkpoint.checkpoint(torch.sin, x, use_reentrant=False).sum(),
                          backend="ckpt", options={"inner": "eager"}, fullgraph=True)
        x = torch.randn(3, requires_grad=True)
        f(x).backward()
        print(torch.allclose(x.grad, x.detach().cos()))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ckpt_compile.compile._backend", "backend", "True"]


def test_backend_attribute_is_the_registered_callable():
    from torch._dynamo.backends.registry import lookup_backend

    assert cc.backend is _backend.backend
    assert lookup_backend("ckpt") is cc.backend


# ---------------------------------------------------------------- tagging pass


def _joint(spec):
    """Build a joint-like graph. ``spec``: (name, target, input names, meta) rows."""
    g = fx.Graph()
    nodes = {"x": g.placeholder("x")}
    for name, target, inputs, meta in spec:
        args = tuple(nodes[i] if isinstance(i, str) and i in nodes else i for i in inputs)
        node = g.call_function(target, args)
        node.name = name
        node.meta.update(meta)
        nodes[name] = node
    g.output(tuple(nodes[n] for n, *_ in spec[-1:]))
    return fx.GraphModule(torch.nn.Module(), g), nodes


def _fw(region=None, policy=CheckpointPolicy.PREFER_RECOMPUTE, **extra):
    meta = {"partitioner_tag": "is_forward", **extra}
    if region is not None:
        meta.update(recompute=policy, ac_graph_id=region)
    return meta


BW = {"partitioner_tag": "is_backward"}


def _policies(nodes):
    return {n: node.meta.get("recompute") for n, node in nodes.items() if n != "x"}


def test_region_boundaries_are_saved_inside_stay_recomputable():
    # Three regions: a feeds b directly, b feeds c through untagged code, c feeds only the
    # loss. A region's output read by another region (directly or through untagged code)
    # is saved, as eager does; the last region's output stays recomputable, as torch does.
    gm, nodes = _joint([
        ("a1", aten.sin.default, ["x"], _fw(0)),
        ("a2", aten.cos.default, ["a1"], _fw(0)),
        ("b1", aten.sin.default, ["a2"], _fw(1)),
        ("b2", aten.cos.default, ["b1"], _fw(1)),
        ("mid", aten.neg.default, ["b2"], _fw()),
        ("c1", aten.sin.default, ["mid"], _fw(2)),
        ("c2", aten.cos.default, ["c1"], _fw(2)),
        ("out", aten.relu.default, ["c2"], _fw()),
        ("g", aten.mul.Tensor, ["out", "b1"], BW),
    ])
    tag_recompute(gm)
    P = CheckpointPolicy
    assert _policies(nodes) == {
        "a1": P.PREFER_RECOMPUTE, "a2": P.MUST_SAVE, "b1": P.PREFER_RECOMPUTE,
        "b2": P.MUST_SAVE, "mid": None, "c1": P.PREFER_RECOMPUTE, "c2": P.PREFER_RECOMPUTE,
        "out": None, "g": None,
    }
    assert nodes["a2"].meta["ckpt_tag_reason"] == nodes["b2"].meta["ckpt_tag_reason"] == "boundary"
    assert "ckpt_tag_reason" not in nodes["c2"].meta


def test_selective_policies_are_kept_and_bools_normalised():
    gm, nodes = _joint([
        ("mm", aten.mm.default, ["x", "x"], _fw(0, CheckpointPolicy.MUST_SAVE)),
        ("relu", aten.relu.default, ["mm"], _fw(0, False)),
        ("sin", aten.sin.default, ["relu"], _fw(0, "MUST_CPU_OFFLOAD")),
        ("cos", aten.cos.default, ["sin"], _fw(0, True)),
    ])
    tag_recompute(gm)
    P = CheckpointPolicy
    assert _policies(nodes) == {
        "mm": P.MUST_SAVE, "relu": P.PREFER_RECOMPUTE, "sin": P.MUST_CPU_OFFLOAD, "cos": P.MUST_SAVE,
    }


def test_bad_policy_names_the_node():
    gm, _ = _joint([("sin", aten.sin.default, ["x"], _fw(0, "SAVE_IT"))])
    with pytest.raises(ValueError, match=r"node %sin : .*aten.sin.default.*recompute policy 'SAVE_IT'"):
        tag_recompute(gm)


def test_random_op_and_its_mask_are_saved():
    # eager-style dropout: rand_like -> gt (mask) -> mul with the activation.
    gm, nodes = _joint([
        ("h", aten.sin.default, ["x"], _fw(0)),
        ("noise", aten.rand_like.default, ["h"], _fw(0)),
        ("mask", aten.gt.Scalar, ["noise", 0.5], _fw(0)),
        ("drop", aten.mul.Tensor, ["h", "mask"], _fw(0)),
        ("y", aten.cos.default, ["drop"], _fw(0)),
    ])
    # rand_like reads `h` only for its shape; its value is still random.
    tag_recompute(gm)
    P = CheckpointPolicy
    assert _policies(nodes) == {
        "h": P.PREFER_RECOMPUTE, "noise": P.MUST_SAVE, "mask": P.MUST_SAVE,
        "drop": P.PREFER_RECOMPUTE, "y": P.PREFER_RECOMPUTE,
    }
    assert not any(n.meta.get("ckpt_rng_exact") for n in nodes.values())


def test_seeded_inductor_random_is_marked_exact():
    import torch._inductor.inductor_prims  # noqa: F401  (registers the prims)

    seeds = torch.ops.prims.inductor_seeds.default
    gm, nodes = _joint([
        ("seeds", seeds, [1, torch.device("cpu")], {"partitioner_tag": "is_forward"}),
        ("seed", torch.ops.prims.inductor_lookup_seed.default, ["seeds", 0], _fw(0)),
        ("noise", torch.ops.prims.inductor_random.default, [[4, 4], "seed", "rand"], _fw(0)),
        ("mask", aten.gt.Scalar, ["noise", 0.5], _fw(0)),
    ])
    tag_recompute(gm)
    assert nodes["noise"].meta["ckpt_rng_exact"] is True
    assert nodes["noise"].meta["recompute"] is CheckpointPolicy.PREFER_RECOMPUTE
    assert "recompute" not in nodes["seeds"].meta


def test_annotated_regions_get_fresh_ids_and_policies():
    gm, nodes = _joint([
        ("a", aten.sin.default, ["x"], _fw(7)),
        ("b", aten.cos.default, ["a"], _fw(custom={"ckpt_region": "mlp"})),
        ("c", aten.mm.default, ["b", "b"], _fw(custom={"ckpt_region": "mlp", "ckpt_policy": "MUST_SAVE"})),
        ("d", aten.relu.default, ["c"], _fw(custom={"ckpt_region": "mlp"})),
        ("e", aten.relu.default, ["d"], _fw(custom={"ckpt_region": "other"})),
        ("gb", aten.mul.Tensor, ["e", "e"], {**BW, "custom": {"ckpt_region": "other"}}),
    ])
    tag_recompute(gm)
    ids = {n: node.meta.get("ac_graph_id") for n, node in nodes.items() if n != "x"}
    assert ids == {"a": 7, "b": 8, "c": 8, "d": 8, "e": 9, "gb": None}
    P = CheckpointPolicy
    assert _policies(nodes) == {
        "a": P.MUST_SAVE, "b": P.PREFER_RECOMPUTE, "c": P.MUST_SAVE, "d": P.MUST_SAVE,
        "e": P.PREFER_RECOMPUTE, "gb": None,
    }


def test_tag_recompute_rejects_non_graph_module():
    with pytest.raises(TypeError, match="expected a torch.fx.GraphModule.*got Linear"):
        tag_recompute(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- cache key


def _dynamo_graph(fn, *inputs):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*inputs)
    return graphs[0]


def _policy_save_mm(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op == aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


def _policy_save_nothing(ctx, op, *args, **kwargs):
    return CheckpointPolicy.PREFER_RECOMPUTE


def test_partitioner_uuid_changes_with_policy_and_options():
    # node.meta is not in inductor's cache key: the uuid must carry the policy.
    def make(policy):
        ctx = functools.partial(cc.create_selective_checkpoint_contexts, policy)
        return lambda x: cc.checkpoint(lambda t: (t @ t).relu(), x, use_reentrant=False, context_fn=ctx)

    x = torch.randn(4, 4, requires_grad=True)
    fp_mm = _backend._annotation_fingerprint(_dynamo_graph(make(_policy_save_mm), x))
    fp_mm_again = _backend._annotation_fingerprint(_dynamo_graph(make(_policy_save_mm), x))
    fp_none = _backend._annotation_fingerprint(_dynamo_graph(make(_policy_save_nothing), x))
    assert fp_mm == fp_mm_again
    assert fp_mm != fp_none
    uuid = lambda opts, fp: _backend._CkptPartitioner(BackendOptions(**opts), fp).uuid()
    assert uuid({}, fp_mm) == uuid({"report": True}, fp_mm)
    assert uuid({}, fp_mm) != uuid({}, fp_none)
    assert uuid({}, fp_mm) != uuid({"memory_budget": 0.5}, fp_mm)


# ---------------------------------------------------------------- docs


@pytest.mark.parametrize(
    "name", ["ckpt_compile.compile._options", "ckpt_compile.compile._backend", "ckpt_compile.compile._configured",
             "ckpt_compile.passes.recompute_tags"]
)
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_bad_determinism_check_under_compile_is_the_eager_error():
    import ckpt_compile as cc

    def fn(x):
        return cc.checkpoint(torch.sin, x, use_reentrant=False, determinism_check="strict")

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"determinism_check should be one of \['default', 'none'\], but got 'strict'"):
        fn(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"determinism_check should be one of \['default', 'none'\], but got 'strict'"):
        torch.compile(fn, backend="ckpt", options={"inner": "eager"})(x)
    torch._dynamo.reset()


def test_cache_key_covers_every_module_that_can_change_a_graph_and_the_version(tmp_path, monkeypatch):
    # Issue 21: the key hashed only passes/ and compile/, so an edit to policies.py or to
    # the engine's tracing branch could reuse a stale compiled graph.
    import ckpt_compile
    import ckpt_compile.passes as passes_pkg

    sources = _backend._graph_sources()
    root = pathlib.Path(ckpt_compile.__file__).parent.resolve()
    names = {p.relative_to(root).as_posix() for p in sources if p.is_relative_to(root)}
    assert {"policies.py", "eager/_selective.py", "eager/_named_values.py", "modules/composable.py",
            "modules/wrappers.py", "diagnostics/_graph_stats.py", "compile/_backend.py"} <= names
    passes_root = pathlib.Path(passes_pkg.__file__).parent.resolve()
    assert {p.name for p in sources if p.is_relative_to(passes_root)} >= {"facts.py", "partitioner.py", "budget.py"}
    # Changing any one file's bytes (a copy of the tree), or the version, changes the key.
    copies = []
    for k, path in enumerate(sources):
        copy = tmp_path / f"{k}_{path.name}"
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    key = _backend._hash_sources(copies, "0.1.0")
    assert _backend._hash_sources(copies, "0.1.1") != key
    keys = {key}
    for copy in copies:
        original = copy.read_bytes()
        copy.write_bytes(original + b"\n")
        keys.add(_backend._hash_sources(copies, "0.1.0"))
        copy.write_bytes(original)
    assert len(keys) == len(copies) + 1
    assert _backend._hash_sources(copies, "0.1.0") == key
    # And the partitioner's uuid carries it.
    uuid_now = _backend._CkptPartitioner(BackendOptions(), "").uuid()
    monkeypatch.setattr(_backend, "_source_hash", lambda: b"other sources")
    assert _backend._CkptPartitioner(BackendOptions(), "").uuid() != uuid_now
