"""The package layout holds: each part imports only the parts below it, and no module
imports itself back through others. Read from the modules' own import statements
(function-level imports included), so the structure cannot decay silently.
"""
import ast
import importlib
import pathlib
import re

import pytest

import ckpt_compile

ROOT = pathlib.Path(ckpt_compile.__file__).parent
PASSES = pathlib.Path(importlib.import_module("ckpt_compile.passes").__file__).parent

# part -> the parts it may import (besides itself). "top" is ckpt_compile/*.py: the
# public names (__init__ loads them lazily) and the public module paths kept by docs/api.md.
# passes/ is the bottom: its joint-graph facts (passes/facts.py: the expensive-op set,
# bool -> CheckpointPolicy) are shared by the engine and the policies.
# "_budget" is ckpt_compile/_budget.py: the one parser of memory_budget, a leaf shared by
# the backend's options, the planner and the CLI.
ALLOWED = {
    "passes": set(),
    "_budget": set(),
    "eager": {"passes"},
    "policies": {"eager", "passes"},
    "modules": {"eager", "policies", "passes"},
    "diagnostics": {"eager", "passes"},
    "compile": {"eager", "passes", "diagnostics", "_budget"},
    "memory": {"eager", "policies", "modules", "diagnostics", "passes", "_budget"},
    "planner": {"eager", "policies", "modules", "diagnostics", "passes", "memory", "_budget"},
    "cli": {"eager", "policies", "modules", "diagnostics", "passes", "compile", "planner", "memory", "top", "_budget"},
    "top": {"eager", "policies", "modules", "diagnostics", "passes", "compile", "planner", "memory", "cli", "_budget"},
}
SUBPACKAGES = ["eager", "modules", "compile", "diagnostics", "cli", "planner", "memory"]


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(("ckpt_compile",) + parts).removesuffix(".__init__")] = path
    for path in PASSES.rglob("*.py"):
        parts = path.relative_to(PASSES).with_suffix("").parts
        found[".".join(("ckpt_compile", "passes") + parts).removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _part(module: str) -> str:
    pieces = module.split(".")
    if len(pieces) == 1 or (len(pieces) == 2 and pieces[1] not in ALLOWED):
        return "top"  # ckpt_compile, ckpt_compile.wrappers, ckpt_compile.__main__, ...
    return pieces[1]


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """Our modules that ``module`` imports, anywhere in its body, resolved to module names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` depends on mod; `from mod import name` on mod.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("ckpt_compile"):
                out.add(name)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_the_parts_exist_with_a_docstring_that_says_what_they_may_import():
    for name in SUBPACKAGES:
        package = importlib.import_module(f"ckpt_compile.{name}")
        assert package.__doc__ and "import" in package.__doc__, name


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    part = _part(module)
    wrong = sorted(
        target for target in GRAPH[module]
        if _part(target) != part and _part(target) not in ALLOWED[part]
    )
    assert not wrong, f"{module} ({part}) imports {wrong}; {part} may import {sorted(ALLOWED[part])}"


def test_the_engine_knows_nothing_above_it():
    # Only the torch-level facts of passes/facts.py, which import nothing of ours.
    engine = [m for m in MODULES if _part(m) == "eager"]
    assert engine, "no eager modules found"
    for module in engine:
        outside = {t for t in GRAPH[module] if _part(t) != "eager"}
        assert outside <= {"ckpt_compile.passes.facts"}, (module, GRAPH[module])
    assert not GRAPH["ckpt_compile.passes.facts"], GRAPH["ckpt_compile.passes.facts"]


def test_no_import_cycles():
    # The package __init__ files only hand names on (lazily); a cycle through them is not
    # one between modules, so they are left out of the walk.
    graph = {m: {t for t in ts if not MODULES[t].name == "__init__.py"} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, cycles


def test_no_module_is_two_ideas():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"modules over ~400 lines: {long}"


def test_public_paths_keep_working():
    import ckpt_compile.composable as composable
    import ckpt_compile.passes as passes
    import ckpt_compile.wrappers as wrappers

    for name in ckpt_compile.__all__:
        assert getattr(ckpt_compile, name) is not None, name
    assert wrappers.checkpoint_wrapper is ckpt_compile.checkpoint_wrapper
    assert composable.checkpoint.__module__ == "ckpt_compile.modules.composable"
    assert callable(passes.partition) and callable(passes.tag_recompute)


def test_no_function_in_passes_is_over_80_lines():
    # A pass reads top to bottom; a longer function is a state object with named moves
    # waiting to be written (issue 21: the budget solver's swap search was 148 lines).
    long = {}
    for path in sorted(PASSES.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long, f"functions in passes/ over 80 lines: {long}"


def test_no_stack_frame_inspection():
    # Who called is passed as a token or state, never read off the stack (issue 21).
    pattern = re.compile(r"_getframe|currentframe|inspect\.stack|f_locals")
    found = [
        f"{path.name}:{k}" for path in MODULES.values()
        for k, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)
    ]
    assert not found, found
