"""Package discovery: every package under ckpt_compile/ and passes/ ships, found, not listed.

A hand-written list once left ckpt_compile.planner out of the wheel (issue 17); a new
subpackage with an ``__init__.py`` is now picked up with no edit. The top-level passes/
folder ships as ``ckpt_compile.passes`` (package-dir in pyproject.toml), so installing us
never adds a top-level module called ``passes``. Everything else is in pyproject.toml.
"""
from setuptools import find_packages, setup


def _packages() -> list[str]:
    ours = find_packages(include=["ckpt_compile", "ckpt_compile.*"])
    passes = find_packages(include=["passes", "passes.*"])
    return ours + ["ckpt_compile." + name for name in passes]


setup(packages=_packages())
