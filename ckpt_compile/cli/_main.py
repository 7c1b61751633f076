"""Command line: ``python -m ckpt_compile --help``.

- ``demo``: train a small GPT-style model with and without checkpointing, eager and
  compiled, print the tables, and write the report and its picture to a folder.
- ``explain module:factory``: import ``factory`` (a function returning ``(model,
  example_inputs)``), print what ``backend="ckpt"`` saves and recomputes for it.
- ``plan module:factory (--memory-budget B | --peak-memory B) [--optimizer adamw|sgd]``:
  print ``ckpt_compile.plan``'s per-block choice for that model under a budget of saved
  activations or of the training step's peak.
- ``memory module:factory``: print the estimated peak of one training step (``_memory``).

``--memory-budget`` (``explain`` and ``plan``) means what ``memory_budget`` means in
Python (``ckpt_compile._budget``): activation bytes saved for the backward, parameters,
buffers and inputs never counted; ``0.5`` is a fraction of what the model saves with no
checkpointing, ``1048576`` is bytes, ``512MiB`` / ``8GB`` / ``"1.5 GiB"`` are sizes
(binary and decimal units as written); ``0`` and ``1`` are ambiguous and refused.

Errors (a bad ``module:factory``, a factory that raises, bad options) are one line on
stderr with exit status 2, as argparse reports usage errors.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pathlib
import sys
from typing import Any

_PROG = "python -m ckpt_compile"


class _UsageError(Exception):
    """A one-line error for the user (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (argparse prints the usage first): the same
    shape and exit status 2 as every other error of this command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_BUDGET_HELP = ("activation bytes saved for the backward (parameters and inputs never count): a fraction in "
                "(0, 1] of what the model saves with no checkpointing (0.25), bytes (1048576), or a size "
                "(512MiB, 2GiB, 1.5GB; KiB/MiB/GiB are powers of 1024, kB/MB/GB of 1000)")


def parse_budget(text: str) -> float | int:
    """``--memory-budget``'s text as ``memory_budget`` takes it: ``"0.25"`` -> 0.25 (a
    fraction), ``"1048576"`` and ``"2GiB"`` -> bytes; anything else is a one-line error."""
    from ckpt_compile._budget import parse_memory_budget

    try:
        return parse_memory_budget(text, name="--memory-budget").value
    except (TypeError, ValueError) as e:
        raise _UsageError(str(e)) from e


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description="Activation checkpointing for PyTorch: demos and diagnostics.",
    )
    from ckpt_compile import __version__

    parser.add_argument("--version", action="version", version=f"ckpt_compile {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="train a small GPT-style model with and without checkpointing and compare",
        description="Train a small GPT-style model for a few steps, eager (no checkpointing, "
        "ckpt_compile.checkpoint, selective) and compiled (no checkpointing, torch.compile + "
        'torch.utils.checkpoint, backend="ckpt"); print side-by-side tables and write the '
        "report (JSON) and its picture (HTML) to a folder.",
    )
    demo.add_argument("--steps", type=int, default=5, help="training steps per variant, at least 2 (default 5)")
    demo.add_argument("--out", default=None, help="folder for report.json and report.html (default: a new temp folder)")
    # Sizes and the compiler, for tests and experiments (hidden from --help).
    for flag, default in (("--blocks", 2), ("--d-model", 128), ("--seq", 64), ("--batch", 4), ("--heads", 4)):
        demo.add_argument(flag, type=int, default=default, help=argparse.SUPPRESS)
    demo.add_argument("--compiler", choices=("eager", "inductor"), default="eager",
                      help="eager (default): compiled graphs run without code generation, about a minute "
                      "on 2 CPU cores; inductor: generated code, several minutes (cold compiles)")
    demo.add_argument("--skip-eager", action="store_true", help=argparse.SUPPRESS)

    explain = sub.add_parser(
        "explain", help="print what backend='ckpt' saves and recomputes for your model",
        description="Import FACTORY (module:function or path/to/file.py:function), call it with "
        "no arguments; it returns (model, example_inputs). Prints the report of "
        "ckpt_compile.explain(model, *example_inputs).",
    )
    explain.add_argument("factory", metavar="module:factory")
    explain.add_argument("--memory-budget", default="1.0", metavar="B", help=_BUDGET_HELP + " (default 1.0)")
    explain.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                         help="compile the partitioned graphs with inductor (default) or run them as they are")
    explain.add_argument("--out", default=None, help="also write report.json and report.html (the picture) here")
    explain.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")

    plan = sub.add_parser(
        "plan", help="choose what to checkpoint per block to fit a memory budget",
        description="Import FACTORY (module:function or path/to/file.py:function), call it with "
        "no arguments; it returns (model, example_inputs). Prints the plan of "
        "ckpt_compile.plan(model, *example_inputs, memory_budget=B or peak_memory=B): per block, no checkpoint, "
        "full, a selective policy or CPU offload (for a peak, also one segment over consecutive blocks), "
        "with the fewest recompute FLOPs that fit.",
    )
    plan.add_argument("factory", metavar="module:factory")
    budgets = plan.add_mutually_exclusive_group(required=True)
    budgets.add_argument("--memory-budget", metavar="B", help=_BUDGET_HELP)
    budgets.add_argument("--peak-memory", metavar="B",
                         help="the peak of live device bytes one training step may reach (parameters, gradients, "
                         "optimizer state, activations, temporaries; estimated on fake tensors): a size (8GiB, "
                         "512MiB, 8GB) or bytes")
    plan.add_argument("--optimizer", choices=("adamw", "sgd", "none"), default=None,
                      help="the step --peak-memory is about: adamw (torch.optim.AdamW), sgd (SGD with momentum "
                      "0.9) or none (default: none, no optimizer step)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    from ckpt_compile.cli import _memory

    _memory.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "memory":
            from ckpt_compile.cli import _memory

            return _memory.run(args, _call_factory, _out_folder, _UsageError)
        return _explain(args)
    except _UsageError as e:
        print(f"{_PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2


def _demo(args) -> int:
    if args.steps < 2:  # step times are medians of the steps after the first
        raise _UsageError(f"--steps must be at least 2, got {args.steps}")
    for flag in ("blocks", "d_model", "seq", "batch", "heads"):
        if getattr(args, flag) < 1:
            raise _UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.d_model % args.heads:
        raise _UsageError(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    out_dir = _out_folder(args.out)
    from ckpt_compile.cli._demo import run_demo

    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen

    run_demo(args.steps, out_dir=out_dir, blocks=args.blocks, d_model=args.d_model, seq=args.seq,
             batch=args.batch, heads=args.heads, compiler=args.compiler, eager=not args.skip_eager)
    return 0


def _explain(args) -> int:
    import json

    import ckpt_compile as cc

    budget = parse_budget(args.memory_budget)
    out_dir = _out_folder(args.out)  # before the compile, which may take minutes
    model, inputs = _call_factory(args.factory)
    try:
        report = cc.explain(model, *inputs, memory_budget=budget, inner=args.inner)
    except Exception as e:
        raise _UsageError(f"explain({args.factory}) failed: {_first_line(e)}") from e
    print(json.dumps(report.to_dict(), indent=1, sort_keys=True) if args.json else report)
    if out_dir is not None:
        from ckpt_compile.compile._explain import write_report_files

        for path in write_report_files(report, out_dir):
            print(f"wrote {path}")
    return 0


def _first_line(error: Exception) -> str:
    """What failed, in one line. Our own errors (``ValueError``: bad options, an infeasible
    budget) are their message; anything else is named by its type. torch.compile wraps other
    backend errors in ``BackendCompilerFailed``, whose first line only names the backend:
    the error it wraps says what failed."""
    if not isinstance(error, ValueError):
        error = getattr(error, "inner_exception", None) or error
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def _out_folder(out: str | None) -> pathlib.Path | None:
    """``--out``, created now: a path that cannot be a folder fails before the work."""
    if out is None:
        return None
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise _UsageError(f"--out {out!r} is a file; give a folder (created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _UsageError(f"--out {out!r}: cannot create the folder ({e.strerror}); "
                          "give a folder path you can write to") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise _UsageError(f"--out {out!r} is not writable; give a folder path you can write to")
    return path


def _plan(args) -> int:
    import json

    import ckpt_compile as cc

    from ckpt_compile._budget import parse_size
    from ckpt_compile.cli._memory import _optimizer

    if args.peak_memory is None:
        if args.optimizer is not None:
            raise _UsageError("--optimizer describes the step of --peak-memory; --memory-budget counts saved "
                              "activations only")
        budget = dict(memory_budget=parse_budget(args.memory_budget))
    else:
        try:
            parse_size(args.peak_memory, name="--peak-memory")  # errors name the flag
        except (TypeError, ValueError) as e:
            raise _UsageError(str(e)) from e
        budget = dict(peak_memory=args.peak_memory, optimizer=_optimizer(args.optimizer or "none"))
    model, inputs = _call_factory(args.factory)
    try:
        plan = cc.plan(model, *inputs, **budget)
    except (TypeError, ValueError) as e:  # ours: already one line that names the fix
        raise _UsageError(f"plan({args.factory}) failed: {e}") from e
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _UsageError(f"plan({args.factory}) failed: {type(e).__name__}: {first}") from e
    print(json.dumps(plan.to_dict(), indent=1, sort_keys=True) if args.json else plan)
    return 0


def _call_factory(spec: str) -> tuple[Any, tuple]:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise _UsageError(f"expected module:factory (for example mypkg.models:make), got {spec!r}")
    module = _import(module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise _UsageError(f"{module_name!r} has no function {attr!r}")
    try:
        made = factory()
    except Exception as e:
        raise _UsageError(f"factory {spec} raised {type(e).__name__}: {e}") from e
    if not (isinstance(made, (tuple, list)) and len(made) == 2 and callable(made[0])):
        raise _UsageError(f"factory {spec} must return (model, example_inputs), got {type(made).__name__}")
    model, inputs = made
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _import(name: str):
    """A module by dotted name (found from the current folder too), or a ``.py`` file."""
    try:
        if not name.endswith(".py"):
            sys.path.insert(0, "")  # as `python -c` does; `python -m` already has it
            try:
                return importlib.import_module(name)
            finally:
                sys.path.remove("")
        path = pathlib.Path(name)
        if not path.is_file():
            raise _UsageError(f"no such file: {name}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except _UsageError:
        raise
    except Exception as e:
        raise _UsageError(f"cannot import {name!r}: {type(e).__name__}: {e}") from e

