"""What users install is what we test (issue 17: a wheel shipped without ckpt_compile.planner).

Builds the wheel and the sdist from a copy of the source tree, offline and without build
isolation (the build backend comes from the ``test`` extra), checks that each holds every
module of the source tree, installs the wheel into a ``--target`` folder and, in a
``python -I -S`` subprocess whose ``sys.path`` is that folder and torch's site only (no
editable install can shadow it), imports every module and plans a tiny model.
"""
from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import ckpt_compile as cc

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package it ships as.
SOURCES = {"ckpt_compile": "ckpt_compile", "passes": "ckpt_compile/passes"}


def _source_modules() -> dict[str, str]:
    """Every module of the source tree: path in the repository -> path in the wheel."""
    found = {}
    for folder, shipped in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts or not (path.parent / "__init__.py").exists():
                continue
            relative = path.relative_to(ROOT / folder).as_posix()
            found[f"{folder}/{relative}"] = f"{shipped}/{relative}"
    return found


def _module_name(wheel_path: str) -> str:
    return wheel_path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _subpackages(modules: dict[str, str]) -> set[str]:
    return {_module_name(p) for p in modules.values() if p.endswith("/__init__.py")}


def _run(*command: str, cwd: Path | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel, sdist) built from a copy of the source tree (building writes build/ and
    *.egg-info next to the sources; the checkout stays as it is)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "*.egg-info", "__pycache__", "build", "dist", "out", "ckpt_report*"))
    dist = tmp / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(dist), str(source))
    _run(sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
         str(dist), cwd=source)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    return wheel, sdist


def test_the_source_tree_has_the_subpackages_we_know_of():
    # The derivation below must see the tree (a broken walk would make the checks vacuous).
    assert {"ckpt_compile.planner", "ckpt_compile.passes", "ckpt_compile.eager"} <= _subpackages(_source_modules())


def test_wheel_holds_every_module_and_the_backend_entry_point(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(archive.read(entry_points).decode())
    missing = sorted(set(_source_modules().values()) - names)
    assert not missing, f"{wheel.name} lacks {missing}"
    assert not any(n.startswith(("passes/", "tests/")) for n in names), "a top-level passes/ or tests/ shipped"
    assert parser["torch_dynamo_backends"]["ckpt"] == "ckpt_compile:backend"


def test_sdist_holds_every_module(built):
    _, sdist = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = sorted(set(_source_modules()) - names)
    assert not missing, f"{sdist.name} lacks {missing}"
    assert {"pyproject.toml", "setup.py", "README.md", "tests/conftest.py"} <= names


_MODELS = """
import torch


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16)) for _ in range(3)])
    return model, (torch.randn(256, 16, requires_grad=True),)
"""
# Run as `python -I -S`: no site-packages, no .pth files (an editable install's finder
# lives in one), no user site, no PYTHON* variables; the path is set by hand.
_INSTALLED_CHECK = """
import importlib, json, runpy, sys
target, torch_site, models, names = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
sys.path[:0] = [target, torch_site, models]
for name in names:
    module = importlib.import_module(name)
    assert module.__file__.startswith(target), f"{name} imported from {module.__file__}"
import ckpt_compile as cc
from tiny_models import make
model, inputs = make()
print(json.dumps(cc.plan(model, *inputs, memory_budget=0.5).to_dict()))
print("--- python -m ckpt_compile plan --json ---", flush=True)
sys.argv = ["ckpt_compile", "plan", "tiny_models:make", "--memory-budget", "0.5", "--json"]
try:
    runpy.run_module("ckpt_compile", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code in (0, None), f"python -m ckpt_compile plan exited with {e.code}"
"""


def _untimed(plan: dict) -> dict:
    # The summary carries the planning time, which differs run to run.
    return {key: value for key, value in plan.items() if key not in ("planning_seconds", "summary")}


def test_installed_wheel_imports_everything_and_plans(built, tmp_path):
    wheel, _ = built
    target = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel))
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny_models.py").write_text(_MODELS)
    names = sorted(_module_name(p) for p in _source_modules().values() if not p.endswith("__main__.py"))
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    out = _run(sys.executable, "-I", "-S", "-c", _INSTALLED_CHECK, str(target), torch_site, str(models), json.dumps(names))
    api_text, cli_text = out.split("--- python -m ckpt_compile plan --json ---")
    from_api, from_cli = json.loads(api_text), json.loads(cli_text)

    namespace: dict = {}
    exec(_MODELS, namespace)
    model, inputs = namespace["make"]()
    here = json.loads(json.dumps(cc.plan(model, *inputs, memory_budget=0.5).to_dict()))
    assert _untimed(from_api) == _untimed(here)
    assert _untimed(from_cli) == _untimed(here)
    assert here["predicted_saved_bytes"] <= here["budget_bytes"]
