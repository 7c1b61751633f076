"""Under Dynamo, ckpt_compile.checkpoint records the user's call: the Dynamo graph of a
function written with ours equals the one written with torch.utils.checkpoint, the
tag_activation_checkpoint node's arguments and its body included. Dynamo capture only
(a backend that keeps the GraphModule): no AOTAutograd, no inductor, fast."""
import functools
import inspect

import pytest
import torch
import torch.utils.checkpoint as tuc

import ckpt_compile as cc

TORCH_HAS_RESPECT_HOOKS = "respect_saved_tensors_hooks" in inspect.signature(tuc.checkpoint).parameters
SAC = functools.partial(tuc.create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
OUR_SAC = functools.partial(cc.create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])


def _region(a, b, z=None):
    out = (a @ b).sin() * b
    return out if z is None else out + z


def _capture(fn, *args):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=keep, fullgraph=True)(*args)
    (gm,) = graphs
    return gm


def _as_data(context_fn):
    # Dynamo rebuilds a functools.partial it attaches: compare what it calls.
    if isinstance(context_fn, functools.partial):
        return ("partial", context_fn.func, context_fn.args, context_fn.keywords)
    return context_fn


def _checkpoint_calls(gm):
    """What Dynamo recorded for each region: the call's code line, its kwargs, the body's
    code and the selective policy Dynamo attached to the body."""
    calls = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.higher_order.tag_activation_checkpoint:
            body = getattr(gm, node.args[0].target)
            calls.append({
                "args": [str(a) for a in node.args],
                "kwargs": dict(node.kwargs),
                "body": body.code,
                "context_fn": _as_data(body.meta.get("_checkpoint_context_fn")),
            })
    return calls


CASES = {
    "reentrant": dict(use_reentrant=True),
    "non-reentrant": dict(use_reentrant=False),
    "use_reentrant-omitted": dict(),
    "preserve_rng_state": dict(use_reentrant=False, preserve_rng_state=False),
    "determinism_check": dict(use_reentrant=False, determinism_check="none"),
    "early_stop": dict(use_reentrant=False, early_stop=False),
    "function-kwargs": dict(use_reentrant=False, z="tensor"),
    "context_fn": dict(use_reentrant=False, context_fn=SAC),
}
if TORCH_HAS_RESPECT_HOOKS:
    CASES["respect_saved_tensors_hooks"] = dict(use_reentrant=False, respect_saved_tensors_hooks=True)


@pytest.mark.parametrize("case", list(CASES))
def test_dynamo_records_the_same_call_as_torch(case):
    x, w, z = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4), torch.randn(4, 4)
    kwargs = {k: (z if v == "tensor" else v) for k, v in CASES[case].items()}

    def make(impl):
        def fn(a, b):
            return impl.checkpoint(_region, a, b, **kwargs).cos()
        return fn

    ours, theirs = _capture(make(cc), x, w), _capture(make(tuc), x, w)
    assert ours.code == theirs.code
    assert _checkpoint_calls(ours) == _checkpoint_calls(theirs)
    assert len(_checkpoint_calls(ours)) == 1


def test_our_selective_context_is_recorded_like_torchs():
    x, w = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
    ours = _capture(lambda a, b: cc.checkpoint(_region, a, b, use_reentrant=False, context_fn=OUR_SAC), x, w)
    theirs = _capture(lambda a, b: tuc.checkpoint(_region, a, b, use_reentrant=False, context_fn=OUR_SAC), x, w)
    assert _checkpoint_calls(ours) == _checkpoint_calls(theirs)
    assert _checkpoint_calls(ours)[0]["context_fn"] == _as_data(OUR_SAC)


def test_debug_is_not_handed_on_under_dynamo():
    # torch's own call fails to trace with debug=True; ours records the call without it.
    x, w = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
    ours = _capture(lambda a, b: cc.checkpoint(_region, a, b, use_reentrant=False, debug=True), x, w)
    theirs = _capture(lambda a, b: tuc.checkpoint(_region, a, b, use_reentrant=False), x, w)
    assert _checkpoint_calls(ours) == _checkpoint_calls(theirs)


def test_decorator_form_records_the_direct_call():
    x, w = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
    decorated = cc.checkpoint(use_reentrant=False, preserve_rng_state=False)(_region)
    ours = _capture(lambda a, b: decorated(a, b).cos(), x, w)
    theirs = _capture(
        lambda a, b: tuc.checkpoint(_region, a, b, use_reentrant=False, preserve_rng_state=False).cos(), x, w
    )
    assert _checkpoint_calls(ours) == _checkpoint_calls(theirs)


def test_reentrant_restrictions_hold_under_dynamo_in_the_installed_torchs_words():
    x = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(Exception) as info:
        _capture(lambda a: cc.checkpoint(torch.sin, a, use_reentrant=True, debug=True), x)
    eager = pytest.raises(ValueError)
    with eager as expected:
        tuc.checkpoint(torch.sin, x, use_reentrant=True, debug=True)
    assert str(expected.value) in str(info.value)


def test_decorated_region_that_dynamo_cannot_trace_runs_on_our_eager_engine(monkeypatch):
    import ckpt_compile.eager._non_reentrant as engine

    calls = []
    real = engine._checkpoint_non_reentrant
    monkeypatch.setattr(engine, "_checkpoint_non_reentrant", lambda *a, **k: calls.append(1) or real(*a, **k))
    lin = torch.nn.Linear(8, 8)

    @cc.checkpoint(use_reentrant=False)
    def body(t):
        y = lin(t).relu()
        torch._dynamo.graph_break()
        return y.sin()

    x = torch.randn(4, 8, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(lambda t: body(t.cos()).sum(), backend="aot_eager")(x).backward()
    assert calls == [1]
    got, x.grad = x.grad, None
    body.__wrapped__(x.cos()).sum().backward()
    torch.testing.assert_close(got, x.grad)
