"""``python -m ckpt_compile``: help, explain module:factory, errors, and a tiny demo, each
in a subprocess as a user runs them."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from ckpt_compile._budget import ACCEPTED

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ckpt_compile", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    folder = tmp_path_factory.mktemp("factories")
    (folder / "user_models.py").write_text(textwrap.dedent("""
        import torch
        import ckpt_compile as cc

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.l1, self.l2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

            def forward(self, x):
                h = cc.checkpoint(lambda t: self.l2(self.l1(t).relu()).relu(), x, use_reentrant=False)
                return (h * h).sum()

        def make():
            torch.manual_seed(0)
            return Net(), (torch.randn(32, 64),)

        class TwoRegions(torch.nn.Module):
            # The first region's output feeds the second region and comes from a matmul:
            # it must be saved (a region boundary), so a tiny budget cannot be met.
            def __init__(self):
                super().__init__()
                self.a, self.b = Net(), Net()

            def forward(self, x):
                h = cc.checkpoint(lambda t: self.a.l2(self.a.l1(t).relu()).relu(), x, use_reentrant=False)
                h = cc.checkpoint(lambda t: self.b.l2(self.b.l1(t).relu()).relu(), h, use_reentrant=False)
                return (h * h).sum()

        def make_two():
            torch.manual_seed(0)
            return TwoRegions(), (torch.randn(32, 64),)

        def broken():
            raise RuntimeError("no weights here")

        def wrong():
            return 3
    """))
    return folder


def test_help_lists_the_commands(tmp_path):
    result = _run("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "explain" in result.stdout
    result = _run(cwd=tmp_path)
    assert result.returncode == 0 and "usage: python -m ckpt_compile" in result.stdout


def test_explain_prints_the_same_report_as_the_api(factories, tmp_path):
    import ckpt_compile as cc
    sys.path.insert(0, str(factories))
    try:
        import user_models
    finally:
        sys.path.remove(str(factories))
    model, inputs = user_models.make()
    want = cc.explain(model, *inputs, inner="eager")
    result = _run("explain", "user_models:make", "--inner", "eager", "--json", cwd=factories)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    for key in ("forward_nodes", "backward_nodes", "saved_tensors", "saved_bytes", "recomputed_nodes",
                "recompute_flops", "baseline"):
        assert got[key] == want.to_dict()[key]
    result = _run("explain", str(factories / "user_models.py") + ":make", "--inner", "eager",
                  "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(want).splitlines()[0]) and want.summary() in result.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["saved_bytes"] == want.saved_bytes
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("spec, message", [
    ("no_such_module:make", "cannot import 'no_such_module': ModuleNotFoundError: No module named 'no_such_module'"),
    ("user_models", "expected module:factory (for example mypkg.models:make), got 'user_models'"),
    ("user_models:missing", "'user_models' has no function 'missing'"),
    ("user_models:broken", "factory user_models:broken raised RuntimeError: no weights here"),
    ("user_models:wrong", "factory user_models:wrong must return (model, example_inputs), got int"),
    ("missing.py:make", "no such file: missing.py"),
])
def test_explain_errors_are_one_line_exit_2(factories, spec, message):
    result = _run("explain", spec, cwd=factories)
    assert result.returncode == 2
    assert result.stderr == f"python -m ckpt_compile explain: error: {message}\n"


@pytest.mark.parametrize("args, message", [
    (("explain", "user_models:make", "--memory-budget", "1.5"),
     "python -m ckpt_compile explain: error: --memory-budget=1.5: a float is a fraction and must be in (0, 1]; "
     f"write {ACCEPTED}"),
    (("explain", "user_models:make", "--memory-budget", "1"),
     "python -m ckpt_compile explain: error: --memory-budget=1 is ambiguous: write 1.0 for all the activation bytes "
     "saved with no checkpointing, or a size such as '512MiB' for bytes"),
    (("plan", "user_models:make", "--memory-budget", "4 GiBs"),
     f"python -m ckpt_compile plan: error: --memory-budget='4 GiBs' is not a budget; write {ACCEPTED}"),
    (("explain", "user_models:make", "--inner", "aot_eager"),
     "python -m ckpt_compile explain: error: argument --inner: invalid choice: 'aot_eager' (choose from "
     "'inductor', 'eager') (see python -m ckpt_compile explain --help)"),
    (("plot",), "python -m ckpt_compile: error: argument COMMAND: invalid choice: 'plot' (choose from 'demo', "
     "'explain', 'plan', 'memory') (see python -m ckpt_compile --help)"),
    (("demo", "--steps", "1"), "python -m ckpt_compile demo: error: --steps must be at least 2, got 1"),
])
def test_usage_errors_are_one_line_exit_2(factories, args, message):
    # argparse's own errors print the usage first: ours are one line, like every other error.
    result = _run(*args, cwd=factories)
    assert (result.returncode, result.stderr) == (2, message + "\n")


def test_explain_infeasible_budget_keeps_the_hint(factories):
    # The infeasible budget is found inside torch.compile, which wraps backend errors: the
    # line must still be our message, with the smallest feasible budget.
    result = _run("explain", "user_models:make_two", "--memory-budget", "0.01", "--inner", "eager", cwd=factories)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(
        'python -m ckpt_compile explain: error: explain(user_models:make_two) failed: backend="ckpt": options '
        "memory_budget=0.01 is infeasible for this graph")
    assert re.search(r"Use memory_budget >= 0\.\d+\.$", result.stderr.strip()), result.stderr


@pytest.mark.parametrize("command", [("explain", "user_models:make"), ("demo",)])
@pytest.mark.parametrize("out, message", [
    ("a_file", "--out 'a_file' is a file; give a folder (created if missing)"),
    ("a_file/sub", "--out 'a_file/sub': cannot create the folder (Not a directory); give a folder path you can "
     "write to"),
])
def test_bad_out_fails_before_the_work(factories, tmp_path, command, out, message):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "user_models.py").write_text((factories / "user_models.py").read_text())
    result = _run(*command, "--out", out, cwd=tmp_path, timeout=60)  # no compile: seconds
    assert (result.returncode, result.stderr) == (2, f"python -m ckpt_compile {command[0]}: error: {message}\n")
    assert result.stdout == ""


def test_demo_tiny_writes_report_and_picture(tmp_path):
    out = tmp_path / "demo"
    result = _run("demo", "--steps", "2", "--blocks", "1", "--d-model", "32", "--heads", "2", "--seq", "16",
                  "--batch", "2", "--compiler", "eager", "--out", str(out), cwd=tmp_path, timeout=500)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for variant in ("no checkpointing", "ckpt_compile.checkpoint (non-reentrant)",
                    "torch.compile, no checkpointing", "torch.compile + torch.utils.checkpoint",
                    'backend="ckpt" + ckpt_compile.checkpoint'):
        assert variant in text
    assert "[3/3]" in text and "compiled in" in text  # progress on the long steps
    report = json.loads((out / "report.json").read_text())
    assert report["saved_bytes"] < report["baseline"]["saved_bytes"]
    # One definition of saved bytes, stated once: the table's measured figure for
    # backend="ckpt" is the report's (the partitioner's count of the same thing).
    assert text.count("saved activations = ") == 1
    ours = next(line for line in text.splitlines() if line.startswith('backend="ckpt" + ckpt_compile.checkpoint'))
    assert f"{report['saved_bytes'] / 2**20:9.2f} MiB" in ours
    verdict = text[text.index("Verdict:"):].splitlines()
    # Each variant draws its own dropout stream although steps interleave: losses equal.
    assert "final loss equal" in verdict[1]
    assert verdict[2].startswith('  compiled: backend="ckpt" keeps ')
    assert f"wrote {out / 'report.html'}" in text
    html = (out / "report.html").read_text()
    ET.fromstring(html[html.index("<svg"):html.index("</svg>") + len("</svg>")])


def test_demo_bad_sizes_exit_2(tmp_path):
    result = _run("demo", "--blocks", "0", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "python -m ckpt_compile demo: error: --blocks must be at least 1, got 0\n"


def test_verdict_is_computed_from_the_figures():
    from ckpt_compile.cli._demo import verdict

    def row(saved, step, first=1.0, loss=1.0):
        # warm steps alternate fast and slow (load): the ratio is the median of per-step ratios
        times = [first, step, 2 * step, step]
        return {"saved_bytes": saved, "step_s": step, "times": times, "first_s": first, "loss": loss}

    lines = verdict([row(100, 1.0), row(5, 1.5)], [row(200, 1.0, 10.0), row(50, 1.2, 10.0), row(38, 1.2, 5.0)])
    assert lines == [
        "eager: ckpt_compile.checkpoint keeps 5% of the saved activations at 1.50x the step time of no "
        "checkpointing; final loss equal",
        'compiled: backend="ckpt" keeps 19% of the saved activations at 1.20x the step time of torch.compile '
        "without checkpointing; torch.compile + torch.utils.checkpoint keeps 25% of the saved activations at "
        "1.20x the step time",
        'backend="ckpt" against torch.compile + torch.utils.checkpoint: 0.76x the saved activations, 1.00x the '
        "step time, 0.50x the compile time",
    ]


def test_version_is_the_installed_distributions(tmp_path):
    # One source of truth: pyproject.toml reads ckpt_compile.__version__ (setuptools dynamic).
    import importlib.metadata

    import ckpt_compile as cc

    assert cc.__version__ == importlib.metadata.version("ckpt-compile")
    result = _run("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"ckpt_compile {cc.__version__}\n")


def test_verdict_step_ratio_compares_steps_run_back_to_back():
    from ckpt_compile.cli._demo import verdict

    def row(times):
        return {"saved_bytes": 100, "step_s": sorted(times[1:])[1], "times": times, "first_s": 1.0, "loss": 1.0}

    # Load came and went: steps 2 and 3 were slow for both variants. Per-step ratios
    # (1.5, 1.5, 0.5) say 1.5x; a ratio of medians (1.5 / 3) would say 0.5x.
    base, ours = row([1.0, 1.0, 3.0, 3.0]), row([1.0, 1.5, 4.5, 1.5])
    assert "at 1.50x the step time" in verdict([base, ours], [base, base, base])[0]
