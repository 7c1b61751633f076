"""Every path the code, the tests and the documents cite is in the repository (issue 17:
they cited documents users never get, and a module that had moved).

A cited path is a token that starts with one of the repository's own top-level entries or
subpackage folders (``ckpt_compile/cli/_demo.py``, ``passes/``, ``eager/``, ``tests/...``),
or any ``*.md`` document. It must exist relative to the repository root, to
``ckpt_compile/``, or to the citing file's folder (``ckpt_compile/passes/...`` is
``passes/...``).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SUFFIXES = (".py", ".md", ".toml", ".sh", ".in", ".cfg", ".txt")
_TOKEN = re.compile(r"(?<![\w/.:-])((?:\.\.?/)*(?:[\w.-]+/)+[\w.-]*|[\w.-]+\.md)(?![\w/-])")
# Documents that once lived outside the repository, cited by a bare name.
_OUTSIDE_DOCUMENTS = re.compile(r"\bNOTES\b|\.\./shared/")


def _files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        paths = [ROOT / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # an unpacked sdist has no git
        paths = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    return sorted(p for p in paths if p.is_file() and (p.suffix in _SUFFIXES or p.name == "run"))


def _roots() -> set[str]:
    """First path components a repository path may start with."""
    top = {p.name for p in ROOT.iterdir() if not p.name.startswith(".venv") and p.name != ".git"}
    parts = {p.name for p in (ROOT / "ckpt_compile").iterdir() if p.is_dir() and p.name != "__pycache__"}
    return (top | parts) - {"build", "dist"} - {p for p in top if p.endswith(".egg-info")}


def _exists(token: str, citing: Path) -> bool:
    candidates = [ROOT / token, ROOT / "ckpt_compile" / token, citing.parent / token]
    if token.startswith("ckpt_compile/passes"):
        candidates.append(ROOT / token.replace("ckpt_compile/passes", "passes", 1))
    return any(c.exists() for c in candidates)


def _cited(text: str, roots: set[str]):
    for match in _TOKEN.finditer(text):
        token = match.group(1).rstrip(".")
        first = token.lstrip("./").split("/", 1)[0]
        if token.endswith(".md") or ("/" in token and first in roots):
            yield text.count("\n", 0, match.start()) + 1, token


def test_the_scan_finds_citations():
    # A broken pattern would pass everything: these are cited today.
    cited = {token for _, token in _cited((ROOT / "README.md").read_text(), _roots())}
    assert {"docs/design.md", "benchmarks/README.md", "tests/test_layout.py"} <= cited
    assert not list(_cited("forward/backward, torch/_functorch/partitioners.py", _roots()))
    # Written in two pieces so that this file does not cite them itself.
    stale = [token for _, token in _cited("see API" + ".md and ckpt_compile/" + "_demo.py", _roots())]
    assert stale == ["API" + ".md", "ckpt_compile/" + "_demo.py"]
    assert not any(_exists(token, ROOT / "README.md") for token in stale)


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_cited_path_exists(path):
    text = path.read_text(errors="replace")
    missing = [f"line {line}: {token}" for line, token in _cited(text, _roots()) if not _exists(token, path)]
    if path != Path(__file__).resolve():
        missing += [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r} (a document outside the repository)"
                    for m in _OUTSIDE_DOCUMENTS.finditer(text)]
    assert not missing, f"{path.relative_to(ROOT)} cites what the repository lacks: {missing}"
