import time

import pytest

from megatron_lpreg.rewards import last_boxed
from megatron_lpreg.rewards.extract import find_last_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{2}", "2"),  # last one wins
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not delimiters
        (r"\boxed{a\\b}", r"a\\b"),
        (r"\fbox{7}", "7"),
        (r"\boxed{3} and \fbox{4}", "4"),
        (r"\fbox{4} and \boxed{3}", "3"),
        (r"$\boxed 5$ done", "5"),
        ("\\boxed 12\nmore", "12"),
        (r"\boxed{}", ""),
        (r"\boxed {7}", "7"),
        (r"\boxed{x^{2}} \boxedfoo{9}", "x^{2}"),  # \boxedfoo is another macro
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, status",
    [
        ("no answer here", "no_box"),
        (r"\boxed{1} then \boxed{2", "unclosed"),  # truncated generation: last box is broken
        (r"the answer is \boxed", "unclosed"),
        ("\\boxed{" + "1" * 2000 + "}", "too_long"),
        (None, "no_box"),
    ],
)
def test_no_usable_box(text, status):
    assert find_last_boxed(text, 1000) == (None, status)
    assert last_boxed(text) is None


def test_max_chars_boundary():
    assert last_boxed("\\boxed{" + "1" * 10 + "}", max_chars=10) == "1" * 10
    assert last_boxed("\\boxed{" + "1" * 11 + "}", max_chars=10) is None
    assert last_boxed("\\boxed{" + "1" * 11 + "}", max_chars=None) == "1" * 11


def test_huge_inputs_are_linear():
    start = time.perf_counter()
    assert last_boxed("x" * 5_000_000 + r"\boxed{2}") == "2"
    assert last_boxed("{" * 5_000_000 + r"\boxed{2}") == "2"
    assert last_boxed(r"\boxed{" + "{" * 5_000_000) is None
    assert last_boxed(r"\boxedx" * 500_000) is None
    assert last_boxed("\\" * 5_000_000) is None
    assert time.perf_counter() - start < 5.0
