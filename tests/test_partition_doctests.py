"""The docstring examples of the partitioner modules run and stay true."""
import doctest
import importlib

import pytest

MODULES = ["facts", "problem", "mincut", "budget", "partition_result", "split", "partitioner", "saving", "recompute_tags"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"ckpt_compile.passes.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module.__name__} has no docstring example"
    assert result.failed == 0
