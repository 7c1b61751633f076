"""Every mistake in ``tests/misuse_cases.py`` gets a clear message (issue 22): the expected
error or warning, whose text names the argument, what was received and what is accepted
(each case lists those pieces). ``python tests/misuse_cases.py`` prints the classes."""
import pytest

from misuse_cases import CASES, classify


def test_the_list_is_long_and_each_case_says_what_it_needs():
    assert len(CASES) >= 100
    assert len({case.id for case in CASES}) == len(CASES)
    for case in CASES:
        assert (case.error is None) != (case.warning is None), case.id
        assert case.needs and case.words, case.id


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_mistake_gets_a_clear_message(case):
    expected = "clear" if case.error is not None else "warned"
    got, text = classify(case)
    assert got == expected, f"{case.words}: {got}: {text}\nneeds {case.needs}"
