"""``python -m ckpt_compile``: help, explain module:factory, errors, and a tiny demo, each
in a subprocess as a user runs them."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

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


def test_explain_bad_budget_is_one_line_exit_2(factories):
    result = _run("explain", "user_models:make", "--memory-budget", "2", cwd=factories)
    assert result.returncode == 2
    assert result.stderr.startswith("python -m ckpt_compile explain: error: explain(user_models:make) failed: ValueError:")
    assert "memory_budget" in result.stderr and len(result.stderr.splitlines()) == 1


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
    assert f"wrote {out / 'report.html'}" in text
    html = (out / "report.html").read_text()
    ET.fromstring(html[html.index("<svg"):html.index("</svg>") + len("</svg>")])


def test_demo_bad_sizes_exit_2(tmp_path):
    result = _run("demo", "--steps", "0", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "python -m ckpt_compile demo: error: --steps must be at least 1, got 0\n"
