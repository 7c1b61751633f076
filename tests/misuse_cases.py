"""Mistakes a new user makes, one per case, in the user's words (issue 22).

Each case makes one mistake on a tiny model and says what a clear answer must contain:
the exception (or warning) type and the pieces of its message that name the argument,
what was received and what is accepted or how to fix it. ``classify`` sorts what really
happens into the issue's classes:

* ``clear``: the expected error, its message holding every required piece;
* ``warned``: the expected warning, its message holding every required piece;
* ``obscure``: an error or warning that lacks them (another type, another text);
* ``silent``: nothing at all.

``tests/test_misuse.py`` asserts every case is ``clear`` or ``warned`` as expected;
``python tests/misuse_cases.py`` prints the count by class (the issue's before/after).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import pathlib
import tempfile
import textwrap
import warnings
from typing import Any, Callable

import torch
from torch import nn

import ckpt_compile as cc
from ckpt_compile import policies
from ckpt_compile.wrappers import CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper, offload_wrapper


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    words: str  # the mistake, as a user would say it
    run: Callable[[], Any]
    error: type | None = None  # the exception a clear answer raises ...
    warning: type | None = None  # ... or the warning it gives
    needs: tuple[str, ...] = ()  # pieces of the message (case-insensitive)
    kept: str = ""  # why the message is Python's / torch's own, where it is


def classify(case: Case) -> tuple[str, str]:
    """(class, what happened) for one case."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.run()
        except Exception as e:  # noqa: BLE001 - every outcome is classified
            text = f"{type(e).__name__}: {e}"
            ok = case.error is not None and isinstance(e, case.error) and _has(str(e), case.needs)
            return ("clear" if ok else "obscure"), text
    texts = [f"{w.category.__name__}: {w.message}" for w in caught]
    if case.warning is not None:
        for w in caught:
            if issubclass(w.category, case.warning) and _has(str(w.message), case.needs):
                return "warned", texts[0]
    ours = [t for t in texts if "use_reentrant parameter should be passed" not in t]
    return ("obscure", ours[0]) if ours else ("silent", "")


def _has(text: str, needs: tuple[str, ...]) -> bool:
    return all(piece.lower() in text.lower() for piece in needs)


# ---------------------------------------------------------------- tiny models and helpers
D = 8


class Block(nn.Module):
    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return torch.relu(self.lin(x))


class Net(nn.Module):
    def __init__(self, blocks: int = 2, d: int = D) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(blocks))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _DeepNet(Net):
    """Blocks with activations inside (Net's single-linear blocks save only their boundaries,
    so no budget under 1.0 fits them)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(D, 4 * D), nn.Tanh(), nn.Linear(4 * D, D)) for _ in range(2))


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (2, D)), requires_grad=True)


def _sac(policy) -> Callable:
    return functools.partial(cc.create_selective_checkpoint_contexts, policy)


_W = torch.randn(D, D)


def _at(a):  # a region written with operators: Tensor.__matmul__ turns TypeError into NotImplemented
    return (a @ _W).sum()


def _mm(a):
    return torch.mm(a, _W).sum()


def _named(a):
    return (cc.checkpoint_name(torch.relu(torch.mm(a, _W)), "hidden") @ _W).sum()


def _ckpt(fn, policy, x=None):
    """checkpoint ``fn`` under ``policy`` and run the backward."""
    return lambda: cc.checkpoint(fn, _x() if x is None else x, use_reentrant=False, context_fn=_sac(policy)).backward()


def _ckpt_ctx(context_fn):
    return lambda: cc.checkpoint(torch.sin, _x(), use_reentrant=False, context_fn=context_fn).sum().backward()


def _returns_none(ctx, op, *args, **kwargs):
    pass  # forgot the return


def _returns_str(ctx, op, *args, **kwargs):
    return "save"


def _returns_class(ctx, op, *args, **kwargs):
    return cc.CheckpointPolicy


def _too_few_args(op):
    return cc.CheckpointPolicy.MUST_SAVE


def _frozen_eval_net() -> Net:
    net = Net().eval()
    net.requires_grad_(False)
    return net


def _report() -> cc.Report:
    return cc.Report.from_dict({"graphs": []})


@functools.cache
def _folder() -> pathlib.Path:
    """Factory files for the CLI cases (written once per process)."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="ckpt_compile_misuse_"))
    (folder / "factories.py").write_text(textwrap.dedent(f"""
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear({D}, {D})
            def forward(self, x):
                return torch.relu(self.lin(x))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList(Block() for _ in range(2))
            def forward(self, x):
                for layer in self.layers:
                    x = layer(x)
                return x

        def model_only():
            return Net()

        def raises():
            raise RuntimeError("dataset not found")

        def wrong_shape():
            return Net(), (torch.randn(2, {D} + 1),)

        def frozen():
            net = Net().eval()
            net.requires_grad_(False)
            return net, (torch.randn(2, {D}),)
    """))
    return folder


class CliError(Exception):
    """A CLI run that exited non-zero; the message is what it printed on stderr."""


def _cli(*argv: str) -> Callable[[], None]:
    def run() -> None:
        from ckpt_compile.cli._main import main

        err, out = io.StringIO(), io.StringIO()
        argv_ = [a.replace("{dir}", str(_folder())) for a in argv]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                status = main(argv_)
            except SystemExit as e:
                status = e.code
        if status:
            raise CliError(err.getvalue().strip())

    return run


# ---------------------------------------------------------------- the cases
_SAC = "create_selective_checkpoint_contexts"

CASES: list[Case] = [
    # -- cc.checkpoint ---------------------------------------------------------------
    Case("checkpoint-use-reentrant-string", "I wrote use_reentrant='False' (a string)",
         lambda: cc.checkpoint(torch.sin, _x(), use_reentrant="False"),
         TypeError, needs=("use_reentrant", "True, False or None", "'False'")),
    Case("checkpoint-use-reentrant-int", "I passed use_reentrant=0",
         lambda: cc.checkpoint(torch.sin, _x(), use_reentrant=0),
         TypeError, needs=("use_reentrant", "True, False or None", "0")),
    Case("checkpoint-not-callable-tensor", "I passed the block's output instead of the block",
         lambda: cc.checkpoint(Block()(_x()), _x(), use_reentrant=False),
         TypeError, needs=("function", "Tensor", "callable")),
    Case("checkpoint-not-callable-none-with-args", "I passed function=None with inputs",
         lambda: cc.checkpoint(None, _x(), use_reentrant=False),
         TypeError, needs=("function", "None", "callable")),
    Case("checkpoint-positional-bool", "I wrote @cc.checkpoint(False), meaning use_reentrant=False",
         lambda: cc.checkpoint(False)(torch.sin),
         TypeError, needs=("function", "False", "use_reentrant=False")),
    Case("checkpoint-bare-decorator", "I decorated with @cc.checkpoint, no parentheses",
         lambda: cc.checkpoint(lambda x: x.sin()),
         TypeError, needs=("checkpoint", "no inputs", "@ckpt_compile.checkpoint(use_reentrant=False)")),
    Case("checkpoint-bare-decorator-method", "I decorated a method with bare @cc.checkpoint",
         lambda: cc.checkpoint(Block.forward),
         TypeError, needs=("no inputs", "forward", "use_reentrant=False")),
    Case("checkpoint-decorator-unknown-keyword", "I misspelled a keyword of the decorator form",
         lambda: cc.checkpoint(use_reentrant=False, preserve_rng=False),
         ValueError, needs=("preserve_rng", "context_fn", "preserve_rng_state", "determinism_check")),
    Case("checkpoint-reentrant-kwargs", "I passed a keyword to my function with use_reentrant=True",
         lambda: cc.checkpoint(lambda x, scale=1.0: x * scale, _x(), scale=2.0, use_reentrant=True),
         ValueError, needs=("Unexpected keyword arguments: scale",),
         kept="torch's exact words: docs/api.md's parity contract, held by tests/test_eager_errors.py"),
    Case("checkpoint-reentrant-context-fn", "I used a selective policy with use_reentrant=True",
         lambda: cc.checkpoint(torch.sin, _x(), use_reentrant=True, context_fn=_sac(policies.save_matmuls)),
         ValueError, needs=("context_fn", "use_reentrant=False")),
    Case("checkpoint-context-fn-tuple", "I passed the contexts themselves as context_fn",
         _ckpt_ctx(cc.create_selective_checkpoint_contexts(policies.save_matmuls)),
         TypeError, needs=("context_fn", "tuple", "functools.partial")),
    Case("checkpoint-context-fn-one-manager", "my context_fn returns one context manager",
         _ckpt_ctx(contextlib.nullcontext),
         TypeError, needs=("context_fn", "nullcontext", "two context managers")),
    Case("checkpoint-context-fn-policy", "I passed the policy itself as context_fn",
         _ckpt_ctx(policies.save_matmuls),
         TypeError, needs=("context_fn", "save_matmuls", "policy", _SAC)),
    Case("checkpoint-context-fn-factory-uncalled", "I passed create_selective_checkpoint_contexts itself",
         _ckpt_ctx(cc.create_selective_checkpoint_contexts),
         TypeError, needs=("context_fn", _SAC, "functools.partial")),
    Case("checkpoint-context-fn-string", "I passed context_fn='selective'",
         _ckpt_ctx("selective"),
         TypeError, needs=("context_fn", "str", "function")),
    Case("checkpoint-context-fn-three", "my context_fn returns three context managers",
         _ckpt_ctx(lambda: (contextlib.nullcontext(),) * 3),
         TypeError, needs=("context_fn", "3", "two context managers")),
    Case("checkpoint-context-fn-not-managers", "my context_fn returns (None, None)",
         _ckpt_ctx(lambda: (None, None)),
         TypeError, needs=("context_fn", "None", "context manager")),
    Case("checkpoint-determinism-check", "I wrote determinism_check='strict'",
         lambda: cc.checkpoint(torch.sin, _x(), use_reentrant=False, determinism_check="strict").sum().backward(),
         ValueError, needs=("determinism_check", "'strict'", "'default'", "'none'")),
    Case("checkpoint-determinism-check-bool", "I wrote determinism_check=False",
         lambda: cc.checkpoint(torch.sin, _x(), use_reentrant=False, determinism_check=False).sum().backward(),
         ValueError, needs=("determinism_check", "False", "'none'")),
    Case("checkpoint-respect-hooks-string", "I wrote respect_saved_tensors_hooks='yes'",
         lambda: cc.checkpoint(torch.sin, _x(), use_reentrant=False, respect_saved_tensors_hooks="yes"),
         TypeError, needs=("respect_saved_tensors_hooks", "True, False or None", "'yes'")),
    Case("checkpoint-missing-argument", "I forgot one input of my function",
         lambda: cc.checkpoint(lambda x, y: x + y, _x(), use_reentrant=False),
         TypeError, needs=("missing 1 required positional argument", "'y'"),
         kept="Python's own error names the function's missing argument"),
    Case("checkpoint-reentrant-grad", "torch.autograd.grad on a reentrant checkpoint",
         lambda: (lambda x: torch.autograd.grad(cc.checkpoint(torch.sin, x, use_reentrant=True).sum(), [x]))(_x()),
         RuntimeError, needs=("use_reentrant=False",), kept="torch's own message says to use use_reentrant=False"),
    Case("checkpoint-no-input-requires-grad", "no input of my reentrant region requires grad",
         lambda: cc.checkpoint(torch.sin, torch.randn(2, 2), use_reentrant=True),
         warning=UserWarning, needs=("requires_grad=True",), kept="torch's own warning"),
    # -- checkpoint_sequential ----------------------------------------------------------
    Case("sequential-segments-zero", "checkpoint_sequential with segments=0",
         lambda: cc.checkpoint_sequential(nn.Sequential(Block(), Block()), 0, _x(), use_reentrant=False),
         ValueError, needs=("segments", "between 1 and", "got 0")),
    Case("sequential-segments-string", "segments='2' (a string)",
         lambda: cc.checkpoint_sequential(nn.Sequential(Block(), Block()), "2", _x(), use_reentrant=False),
         ValueError, needs=("segments", "int", "'2'")),
    Case("sequential-segments-too-many", "more segments than layers",
         lambda: cc.checkpoint_sequential(nn.Sequential(Block(), Block()), 3, _x(), use_reentrant=False),
         ValueError, needs=("segments", "(2)", "got 3")),
    Case("sequential-swapped", "I swapped segments and input",
         lambda: cc.checkpoint_sequential(nn.Sequential(Block(), Block()), _x(), 2, use_reentrant=False),
         ValueError, needs=("segments", "int", "Tensor", "checkpoint_sequential(functions, segments, input")),
    Case("sequential-single-module", "I passed one Block, not a Sequential",
         lambda: cc.checkpoint_sequential(Block(), 1, _x(), use_reentrant=False),
         TypeError, needs=("functions", "Block", "nn.Sequential", "list")),
    Case("sequential-empty", "I passed an empty list of functions",
         lambda: cc.checkpoint_sequential([], 1, _x(), use_reentrant=False),
         ValueError, needs=("functions", "empty")),
    Case("sequential-unknown-keyword", "I passed context_fn to checkpoint_sequential",
         lambda: cc.checkpoint_sequential(nn.Sequential(Block(), Block()), 2, _x(), use_reentrant=False,
                                          context_fn=_sac(policies.save_matmuls)),
         ValueError, needs=("context_fn", "use_reentrant", "preserve_rng_state")),
    Case("sequential-use-reentrant-string", "use_reentrant='no' in checkpoint_sequential",
         lambda: cc.checkpoint_sequential(nn.Sequential(Block(), Block()), 2, _x(), use_reentrant="no"),
         TypeError, needs=("use_reentrant", "True, False or None", "'no'")),
    # -- selective policies ------------------------------------------------------------
    Case("policy-returns-none-mm", "my policy forgot its return (torch.mm region)",
         _ckpt(_mm, _returns_none), TypeError, needs=("policy", "None", "MUST_SAVE", "PREFER_RECOMPUTE")),
    Case("policy-returns-none-matmul-operator", "my policy forgot its return (region uses @)",
         _ckpt(_at, _returns_none), TypeError, needs=("policy", "None", "MUST_SAVE", "PREFER_RECOMPUTE")),
    Case("policy-returns-string", "my policy returns 'save'",
         _ckpt(_at, _returns_str), TypeError, needs=("policy", "'save'", "MUST_SAVE")),
    Case("policy-returns-class", "my policy returns CheckpointPolicy itself",
         _ckpt(_mm, _returns_class), TypeError, needs=("policy", "CheckpointPolicy", "member")),
    Case("policy-wrong-signature", "my policy takes only op",
         _ckpt(_at, _too_few_args), TypeError, needs=("_too_few_args", "(ctx, op, *args, **kwargs)")),
    Case("policy-factory-uncalled-operator", "I passed save_only_these_names without calling it (region uses @)",
         _ckpt(_at, policies.save_only_these_names),
         TypeError, needs=("save_only_these_names", "save_only_these_names('name'")),
    Case("policy-factory-uncalled-mm", "I passed save_only_these_names without calling it (torch.mm)",
         _ckpt(_mm, policies.save_only_these_names),
         TypeError, needs=("save_only_these_names", "save_only_these_names('name'")),
    Case("policy-factory-uncalled-offload", "I passed offload_these_names without calling it",
         _ckpt(_mm, policies.offload_these_names),
         TypeError, needs=("offload_these_names", "offload_these_names('name'")),
    Case("policy-factory-uncalled-save-ops", "I passed save_ops without calling it",
         _ckpt(_at, policies.save_ops),
         TypeError, needs=("save_ops", "save_ops(torch.ops.aten.mm.default")),
    Case("policy-packet-list", "I listed torch.ops.aten.mm (a packet)",
         lambda: cc.create_selective_checkpoint_contexts([torch.ops.aten.mm]),
         ValueError, needs=("OpOverload", "torch.ops.aten.mm.default"), kept="torch's own message, already precise"),
    Case("policy-string-list", "I listed ops by name ['mm']",
         lambda: cc.create_selective_checkpoint_contexts(["mm"]),
         ValueError, needs=("op_list", "mm", "OpOverload")),
    Case("policy-enum", "I passed CheckpointPolicy.MUST_SAVE as the policy",
         lambda: cc.create_selective_checkpoint_contexts(cc.CheckpointPolicy.MUST_SAVE),
         TypeError, needs=("policy_fn_or_list", "CheckpointPolicy", "function", "list of ops")),
    Case("policy-string", "I passed the policy's name 'save_matmuls'",
         lambda: cc.create_selective_checkpoint_contexts("save_matmuls"),
         TypeError, needs=("policy_fn_or_list", "str", "function")),
    Case("policy-save-from-both-not-callable", "save_from_both(save_matmuls, 'hidden')",
         lambda: policies.save_from_both(policies.save_matmuls, "hidden"),
         TypeError, needs=("save_from_both", "'hidden'", "callable")),
    Case("policy-save-from-both-factory", "save_from_both(save_matmuls, save_only_these_names)",
         lambda: policies.save_from_both(policies.save_matmuls, policies.save_only_these_names),
         TypeError, needs=("save_only_these_names", "save_only_these_names('name'")),
    Case("policy-names-list", "save_only_these_names(['a', 'b']) (a list)",
         lambda: policies.save_only_these_names(["a", "b"]),
         TypeError, needs=("save_only_these_names", "str", "['a', 'b']", "save_only_these_names('a', 'b')")),
    Case("policy-names-int", "save_any_names_but_these(3)",
         lambda: policies.save_any_names_but_these(3),
         TypeError, needs=("save_any_names_but_these", "str", "3")),
    Case("policy-save-ops-string", "save_ops('mm')",
         lambda: policies.save_ops("mm"),
         TypeError, needs=("save_ops", "'mm'", "torch.ops.aten.mm.default")),
    Case("policy-save-ops-every-zero", "save_ops(mm, every=0)",
         lambda: policies.save_ops(torch.ops.aten.mm.default, every=0),
         ValueError, needs=("every", ">= 1", "0")),
    Case("policy-misspelled-name", "save_only_these_names('hiden'): a typo",
         _ckpt(_named, policies.save_only_these_names("hiden")),
         warning=UserWarning, needs=("'hiden'", "checkpoint_name", "'hidden'")),
    Case("policy-name-never-marked", "save_only_these_names('hidden') but nothing is named in the region",
         _ckpt(_mm, policies.save_only_these_names("hidden")),
         warning=UserWarning, needs=("'hidden'", "checkpoint_name")),
    Case("policy-any-but-misspelled", "save_any_names_but_these('hiden'): a typo",
         _ckpt(_named, policies.save_any_names_but_these("hiden")),
         warning=UserWarning, needs=("'hiden'", "checkpoint_name", "'hidden'")),
    Case("policy-both-misspelled", "save_from_both(save_matmuls, save_only_these_names('hiden'))",
         _ckpt(_named, policies.save_from_both(policies.save_matmuls, policies.save_only_these_names("hiden"))),
         warning=UserWarning, needs=("'hiden'", "checkpoint_name")),
    Case("policy-offload-on-cpu", "offload_these_names on a CPU-only machine",
         _ckpt(_named, policies.offload_these_names("hidden")),
         warning=UserWarning, needs=("offload", "already on CPU", "nothing to offload")),
    Case("policy-offload-enum-on-cpu", "a policy returning MUST_CPU_OFFLOAD on CPU tensors",
         _ckpt(_mm, lambda ctx, op, *a, **k: cc.CheckpointPolicy.MUST_CPU_OFFLOAD),
         warning=UserWarning, needs=("offload", "already on CPU", "nothing to offload")),
    Case("name-not-string", "checkpoint_name(x, 3)",
         lambda: cc.checkpoint_name(_x(), 3),
         TypeError, needs=("checkpoint_name", "name", "str", "int")),
    Case("name-swapped", "checkpoint_name('hidden', x)",
         lambda: cc.checkpoint_name("hidden", _x()),
         TypeError, needs=("checkpoint_name", "tensor", "torch.Tensor", "str")),
    Case("wrapper-class", "checkpoint_wrapper(Block) (the class)",
         lambda: checkpoint_wrapper(Block), TypeError, needs=("nn.Module", "type", "Block")),
    Case("wrapper-function", "checkpoint_wrapper(my_function)",
         lambda: checkpoint_wrapper(torch.sin), TypeError, needs=("nn.Module", "builtin_function_or_method")),
    Case("wrapper-use-reentrant", "checkpoint_wrapper(m, use_reentrant=False)",
         lambda: checkpoint_wrapper(Block(), use_reentrant=False),
         TypeError, needs=("use_reentrant", "checkpoint_impl", "CheckpointImpl.REENTRANT")),
    Case("wrapper-impl-string", "checkpoint_wrapper(m, 'no_reentrant')",
         lambda: checkpoint_wrapper(Block(), "no_reentrant"),
         TypeError, needs=("checkpoint_impl", "CheckpointImpl.NO_REENTRANT", "'no_reentrant'")),
    Case("wrapper-impl-bool", "checkpoint_wrapper(m, checkpoint_impl=False)",
         lambda: checkpoint_wrapper(Block(), checkpoint_impl=False),
         TypeError, needs=("checkpoint_impl", "CheckpointImpl", "False")),
    Case("wrapper-twice", "checkpoint_wrapper on an already wrapped block",
         lambda: checkpoint_wrapper(checkpoint_wrapper(Block())),
         ValueError, needs=("already", "CheckpointWrapper", "once")),
    Case("wrapper-checkpoint-fn-not-callable", "checkpoint_wrapper(m, checkpoint_fn='checkpoint')",
         lambda: checkpoint_wrapper(Block(), checkpoint_fn="checkpoint"),
         TypeError, needs=("checkpoint_fn", "callable", "'checkpoint'")),
    Case("wrapper-context-fn-tuple", "checkpoint_wrapper(m, context_fn=<the contexts>)",
         lambda: checkpoint_wrapper(Block(), context_fn=cc.create_selective_checkpoint_contexts(policies.save_matmuls))(_x()),
         TypeError, needs=("context_fn", "tuple", "functools.partial")),
    Case("offload-wrapper-class", "offload_wrapper(Block) (the class)",
         lambda: offload_wrapper(Block), TypeError, needs=("OffloadWrapper", "nn.Module", "Block")),
    Case("offload-wrapper-on-cpu", "offload_wrapper on a CPU-only machine",
         lambda: offload_wrapper(Block())(_x()).sum().backward(),
         warning=UserWarning, needs=("offload_wrapper", "already on CPU", "nothing to offload")),
    Case("apply-model-not-module", "apply_activation_checkpointing(model.parameters())",
         lambda: apply_activation_checkpointing(Net().parameters()),
         TypeError, needs=("model", "nn.Module", "generator")),
    Case("apply-check-fn-not-callable", "apply_activation_checkpointing(model, check_fn=True)",
         lambda: apply_activation_checkpointing(Net(), check_fn=True),
         TypeError, needs=("check_fn", "callable", "True")),
    Case("apply-check-fn-class", "check_fn=Block (a class, meaning isinstance)",
         lambda: apply_activation_checkpointing(Net(), check_fn=Block),
         TypeError, needs=("check_fn", "Block", "lambda m: isinstance(m, Block)")),
    Case("apply-check-fn-none", "my check_fn forgot its return",
         lambda: apply_activation_checkpointing(Net(), check_fn=lambda m: None),
         warning=UserWarning, needs=("check_fn", "None", "bool")),
    Case("apply-check-fn-matches-nothing", "check_fn matched nothing (wrong class)",
         lambda: apply_activation_checkpointing(Net(), check_fn=lambda m: isinstance(m, nn.Conv2d)),
         warning=UserWarning, needs=("wrapped no", "Net", "check_fn")),
    Case("apply-policy-matches-nothing", "auto_wrap_policy matched nothing",
         lambda: apply_activation_checkpointing(Net(), auto_wrap_policy=lambda module, recurse, nonwrapped_numel: recurse),
         warning=UserWarning, needs=("wrapped no", "auto_wrap_policy")),
    Case("apply-policy-set", "auto_wrap_policy={Block} (a set, as for FSDP's ModuleWrapPolicy)",
         lambda: apply_activation_checkpointing(Net(), auto_wrap_policy={Block}),
         ValueError, needs=("auto_wrap_policy", "ModuleWrapPolicy", "Block")),
    Case("apply-wrapper-fn-impl", "checkpoint_wrapper_fn=CheckpointImpl.NO_REENTRANT",
         lambda: apply_activation_checkpointing(Net(), checkpoint_wrapper_fn=CheckpointImpl.NO_REENTRANT),
         TypeError, needs=("checkpoint_wrapper_fn", "callable", "NO_REENTRANT")),
    Case("apply-wrapper-fn-returns-none", "my checkpoint_wrapper_fn returns None",
         lambda: apply_activation_checkpointing(Net(), checkpoint_wrapper_fn=lambda m: None,
                                                check_fn=lambda m: isinstance(m, Block)),
         TypeError, needs=("checkpoint_wrapper_fn", "NoneType", "nn.Module")),
    Case("apply-wrapper-fn-called", "checkpoint_wrapper_fn=checkpoint_wrapper() (called, no module)",
         lambda: apply_activation_checkpointing(Net(), checkpoint_wrapper_fn=checkpoint_wrapper()),
         TypeError, needs=("missing 1 required positional argument", "module"),
         kept="Python's own error, raised at the user's call of checkpoint_wrapper()"),
    # -- composable (clear on main; issue item 1 belongs to another helper) --------------
    Case("composable-twice", "composable checkpoint applied twice",
         lambda: [__import__("ckpt_compile.composable", fromlist=["checkpoint"]).checkpoint(m)
                  for m in [Block()] * 2],
         Exception, needs=("once", "already applied", "Block")),
    # -- backend options ---------------------------------------------------------------
    Case("backend-unknown-option", "backend_with(memory_budjet=0.5)",
         lambda: cc.backend_with(memory_budjet=0.5),
         ValueError, needs=("'memory_budjet'", "memory_budget", "inner", "report")),
    Case("backend-inner", "backend_with(inner='aot_eager')",
         lambda: cc.backend_with(inner="aot_eager"),
         ValueError, needs=("inner", "'aot_eager'", "inductor", "eager")),
    Case("backend-report-int", "backend_with(report=3)",
         lambda: cc.backend_with(report=3),
         ValueError, needs=("report", "3", "bool or a path")),
    Case("backend-report-missing-folder", "backend_with(report='no/such/folder/r.json')",
         lambda: cc.backend_with(report="/no/such/folder/r.json"),
         ValueError, needs=("report", "/no/such/folder", "folder")),
    Case("backend-with-dict", "backend_with({'inner': 'eager'}) (a dict, not keywords)",
         lambda: cc.backend_with({"inner": "eager"}),
         TypeError, needs=("backend_with", "positional"),
         kept="Python's own error names the function and the positional argument"),
    Case("backend-compile-options-twice", "torch.compile(backend=backend_with(...), options=...)",
         lambda: torch.compile(lambda t: t.sin(), backend=cc.backend_with(inner="eager"),
                               options={"inner": "eager"})(_x()),
         Exception, needs=("backend_with", "options")),
    # -- explain -----------------------------------------------------------------------
    Case("explain-not-callable", "explain('model')",
         lambda: cc.explain("model", _x()),
         TypeError, needs=("model_or_fn", "nn.Module or a function", "str")),
    Case("explain-wrong-shape", "explain(model, x) with the wrong feature size",
         lambda: cc.explain(Net(), torch.randn(4, D + 1), inner="eager"),
         ValueError, needs=("explain", "Net", "example_inputs", "float32[4, 9]")),
    Case("explain-no-inputs", "explain(model) with no example inputs",
         lambda: cc.explain(Net(), inner="eager"),
         ValueError, needs=("explain", "Net", "no example inputs")),
    Case("explain-list-input", "explain(model, [x]) (a list, not *inputs)",
         lambda: cc.explain(Net(), [torch.randn(4, D)], inner="eager"),
         ValueError, needs=("explain", "Net", "list")),
    Case("explain-wrong-dtype", "explain(model, x.double())",
         lambda: cc.explain(Net(), torch.randn(4, D, dtype=torch.float64), inner="eager"),
         ValueError, needs=("explain", "float64[4, 8]", "dtype")),
    Case("explain-nothing-needs-grad", "explain on an eval model with frozen parameters",
         lambda: cc.explain(_frozen_eval_net(), torch.randn(2, D), inner="eager"),
         ValueError, needs=("explain", "requires grad", "requires_grad_")),
    Case("explain-unknown-option", "explain(model, x, memory_budjet=0.5)",
         lambda: cc.explain(Net(), _x(), memory_budjet=0.5),
         ValueError, needs=("'memory_budjet'", "memory_budget")),
    Case("explain-options-dict", "explain(model, x, options={'inner': 'eager'})",
         lambda: cc.explain(Net(), _x(), options={"inner": "eager"}),
         ValueError, needs=("'options'", "inner='eager'")),
    # -- Report / write_picture ----------------------------------------------------------
    Case("picture-not-report", "write_picture('not a report', path)",
         lambda: cc.write_picture("not a report", pathlib.Path(tempfile.mkdtemp()) / "p.html"),
         TypeError, needs=("write_picture", "report", "str", "cc.explain")),
    Case("picture-swapped", "write_picture(path, report)",
         lambda: cc.write_picture(str(pathlib.Path(tempfile.mkdtemp()) / "p.html"), _report()),
         TypeError, needs=("write_picture", "report", "str")),
    Case("picture-dict", "write_picture(report.to_dict(), path)",
         lambda: cc.write_picture(_report().to_dict(), pathlib.Path(tempfile.mkdtemp()) / "p.html"),
         TypeError, needs=("write_picture", "dict", "Report.from_dict")),
    Case("picture-suffix", "write_picture(report, 'cut.pdf')",
         lambda: cc.write_picture(_report(), pathlib.Path(tempfile.mkdtemp()) / "cut.pdf"),
         ValueError, needs=("write_picture", "cut.pdf", ".svg", ".html", ".png")),
    Case("picture-no-folder", "write_picture(report, 'missing/dir/p.html')",
         lambda: cc.write_picture(_report(), "/no/such/dir/p.html"),
         FileNotFoundError, needs=("/no/such/dir/p.html",), kept="Python's own error names the path"),
    Case("report-from-dict-string", "Report.from_dict('report.json') (a path)",
         lambda: cc.Report.from_dict("report.json"),
         ValueError, needs=("from_dict", "str", "Report.read")),
    Case("report-from-dict-empty", "Report.from_dict({})",
         lambda: cc.Report.from_dict({}),
         ValueError, needs=("from_dict", "graphs", "to_dict")),
    Case("report-read-missing", "Report.read('missing.json')",
         lambda: cc.Report.read("/no/such/report.json"),
         ValueError, needs=("Report.read", "/no/such/report.json")),
    Case("report-attribute-typo", "report.saved_byte (typo)",
         lambda: _report().saved_byte,
         AttributeError, needs=("saved_byte",), kept="Python's own AttributeError, naming the attribute"),
    # -- saved_tensor_bytes / autograd_nodes ---------------------------------------------
    Case("saved-bytes-tensor", "saved_tensor_bytes(model(x)) (the output, not a function)",
         lambda: cc.saved_tensor_bytes(Net()(_x())),
         TypeError, needs=("saved_tensor_bytes", "Tensor", "lambda: model(x)")),
    Case("saved-bytes-module", "saved_tensor_bytes(model) (no inputs)",
         lambda: cc.saved_tensor_bytes(Net()),
         TypeError, needs=("saved_tensor_bytes", "Net", "lambda: model(x)")),
    Case("saved-bytes-two-args", "saved_tensor_bytes(model, x)",
         lambda: cc.saved_tensor_bytes(Net(), _x()),
         TypeError, needs=("saved_tensor_bytes", "positional"),
         kept="Python's own error (the signature is docs/api.md's); the argument's docstring shows lambda: model(x)"),
    Case("autograd-nodes-module", "autograd_nodes(model)",
         lambda: cc.autograd_nodes(Net()),
         TypeError, needs=("autograd_nodes", "Tensor", "Net")),
    Case("autograd-nodes-tuple", "autograd_nodes((y1, y2))",
         lambda: cc.autograd_nodes((_x(), _x())),
         TypeError, needs=("autograd_nodes", "Tensor", "tuple")),
    # -- plan --------------------------------------------------------------------------
    Case("plan-not-module", "plan(model.state_dict(), x)",
         lambda: cc.plan(Net().state_dict(), _x(), memory_budget=0.5),
         TypeError, needs=("plan", "model", "nn.Module", "OrderedDict")),
    Case("plan-blocks-instance", "plan(..., blocks=Block()) (an instance)",
         lambda: cc.plan(Net(), _x(), memory_budget=0.5, blocks=Block()),
         TypeError, needs=("blocks", "instance", "Block", "blocks=Block")),
    Case("plan-blocks-string", "plan(..., blocks='layers') (a name)",
         lambda: cc.plan(Net(), _x(), memory_budget=0.5, blocks="layers"),
         TypeError, needs=("blocks", "'layers'", "class", "predicate")),
    Case("plan-blocks-list", "plan(..., blocks=[Block]) (a list)",
         lambda: cc.plan(Net(), _x(), memory_budget=0.5, blocks=[Block]),
         TypeError, needs=("blocks", "list", "tuple")),
    Case("plan-blocks-no-match", "plan(..., blocks=nn.Conv2d): no such layer",
         lambda: cc.plan(Net(), _x(), memory_budget=0.5, blocks=nn.Conv2d),
         ValueError, needs=("blocks", "Conv2d", "no submodule")),
    Case("plan-no-repeated-blocks", "plan on a model without repeated blocks",
         lambda: cc.plan(Block(), _x(), memory_budget=0.5),
         ValueError, needs=("repeated blocks", "Block", "blocks=")),
    Case("plan-wrong-shape", "plan(model, x) with the wrong feature size",
         lambda: cc.plan(Net(), torch.randn(4, D + 1), memory_budget=0.5),
         ValueError, needs=("plan", "Net", "example_inputs", "float32[4, 9]")),
    Case("plan-no-inputs", "plan(model) with no example inputs",
         lambda: cc.plan(Net(), memory_budget=0.5),
         ValueError, needs=("plan", "Net", "no example inputs")),
    Case("plan-wrong-device", "plan with inputs on another device than the model",
         lambda: cc.plan(Net().to("meta"), torch.randn(4, D), memory_budget=0.5),
         ValueError, needs=("plan", "Net", "cpu", "meta")),
    Case("plan-unknown-keyword", "plan(model, x, memory_budget=0.5, budget_kind='peak')",
         lambda: cc.plan(Net(), _x(), memory_budget=0.5, budget_kind="peak"),
         ValueError, needs=("plan", "budget_kind", "example_kwargs")),
    Case("plan-nothing-needs-grad", "plan on an eval model with frozen parameters",
         lambda: cc.plan(_frozen_eval_net(), torch.randn(2, D), memory_budget=0.5),
         ValueError, needs=("plan", "requires grad", "requires_grad_")),
    Case("plan-apply-wrong-model", "plan.apply(a different model)",
         lambda: cc.plan(Net(), _x(), memory_budget=1.0).apply(nn.Sequential(nn.Linear(D, D))),
         ValueError, needs=("apply", "layers.0", "planned for")),
    Case("plan-apply-twice", "plan.apply twice on one model",
         lambda: (lambda p, m: p.apply(p.apply(m)))(cc.plan(_DeepNet(), _x(256, D), memory_budget=0.5), _DeepNet()),
         ValueError, needs=("apply", "already", "once")),
    # -- CLI -------------------------------------------------------------------------
    Case("cli-unknown-command", "python -m ckpt_compile profile",
         _cli("profile"), CliError, needs=("invalid choice", "'profile'", "plan")),
    Case("cli-plan-no-colon", "plan factories (no :function)",
         _cli("plan", "factories", "--memory-budget", "0.5"),
         CliError, needs=("factories", "module:factory")),
    Case("cli-plan-no-module", "plan nosuchmodule:make",
         _cli("plan", "nosuchmodule_xyz:make", "--memory-budget", "0.5"),
         CliError, needs=("nosuchmodule_xyz",)),
    Case("cli-plan-no-function", "plan file.py:missing",
         _cli("plan", "{dir}/factories.py:missing", "--memory-budget", "0.5"),
         CliError, needs=("missing", "factories")),
    Case("cli-plan-factory-model-only", "my factory returns only the model",
         _cli("plan", "{dir}/factories.py:model_only", "--memory-budget", "0.5"),
         CliError, needs=("model_only", "(model, example_inputs)")),
    Case("cli-explain-factory-raises", "my factory raises",
         _cli("explain", "{dir}/factories.py:raises", "--inner", "eager"),
         CliError, needs=("raises", "dataset not found")),
    Case("cli-explain-wrong-shape", "explain factory whose inputs do not fit",
         _cli("explain", "{dir}/factories.py:wrong_shape", "--inner", "eager"),
         CliError, needs=("wrong_shape", "float32[2, 9]")),
    Case("cli-plan-wrong-shape", "plan factory whose inputs do not fit",
         _cli("plan", "{dir}/factories.py:wrong_shape", "--memory-budget", "0.5"),
         CliError, needs=("wrong_shape", "float32[2, 9]")),
    Case("cli-plan-frozen", "plan factory with nothing requiring grad",
         _cli("plan", "{dir}/factories.py:frozen", "--memory-budget", "0.5"),
         CliError, needs=("frozen", "requires grad")),
    Case("cli-explain-inner", "explain --inner aot_eager",
         _cli("explain", "{dir}/factories.py:frozen", "--inner", "aot_eager"),
         CliError, needs=("--inner", "'aot_eager'", "inductor")),
    Case("cli-demo-steps", "demo --steps 1",
         _cli("demo", "--steps", "1"), CliError, needs=("--steps", "at least 2", "1")),
    Case("cli-out-is-file", "explain --out pointing at a file",
         _cli("explain", "{dir}/factories.py:frozen", "--out", "{dir}/factories.py"),
         CliError, needs=("--out", "is a file", "folder")),
]


def _survey() -> None:
    from collections import Counter

    counts: Counter = Counter()
    for case in CASES:
        cls, text = classify(case)
        counts[cls] += 1
        print(f"{cls:8} {case.id:42} {text.splitlines()[0][:150] if text else ''}")
    print(f"{len(CASES)} cases:", ", ".join(f"{n} {cls}" for cls, n in sorted(counts.items())))


if __name__ == "__main__":
    _survey()
