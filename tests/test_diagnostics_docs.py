"""The public diagnostics helpers (docs/api.md, "Diagnostics") carry runnable examples that
stay true, and are reachable from ``ckpt_compile`` itself."""
import doctest

import pytest

import ckpt_compile as cc

PUBLIC = ["Report", "write_picture", "saved_tensor_bytes", "autograd_nodes", "explain"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_helper_has_a_runnable_example(name):
    assert name in cc.__all__
    obj = getattr(cc, name)
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(obj, name) if t.examples]
    assert tests, f"cc.{name} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_report_round_trips_through_its_public_name(tmp_path):
    report = cc.Report.from_dict({"graphs": []})
    path = tmp_path / "r.json"
    report.write(path)
    assert cc.Report.read(path) == report
