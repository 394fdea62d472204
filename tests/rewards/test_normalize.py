import pytest

from megatron_lpreg.rewards import normalize_answer


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$42$", "42"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\tfrac12", r"\frac{1}{2}"),
        (r"\frac 3 4", r"\frac{3}{4}"),
        ("1/2", r"\frac{1}{2}"),
        ("-3/4", r"-\frac{3}{4}"),
        (r"\left( 1, 2 \right]", "(1,2]"),
        (r"30^\circ", "30"),
        (r"30^{\circ}", "30"),
        (r"x = 3", "3"),
        (r"k=\frac{1}{2}", r"\frac{1}{2}"),
        ("1,000", "1000"),
        ("1,000,000.5", "1000000.5"),
        ("1,2", "1,2"),  # a list, not a thousands separator
        (r"\text{Monday}", "monday"),
        (r"5\text{ cm}", "5"),
        ("12 dollars", "12"),
        (r"50\%", "50"),
        ("7.", "7"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("+007", "7"),
        ("-0.0", "0"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"3\!000", "3000"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"x \leq 3", r"x\le3"),
        (r"\varnothing", r"\emptyset"),
        ("", ""),
    ],
)
def test_normalize(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_does_not_merge_distinct_answers():
    assert normalize_answer("12") != normalize_answer("1,2")
    assert normalize_answer(r"\frac{1}{2}") != normalize_answer(r"\frac{2}{1}")
    assert normalize_answer("x=1,y=2") == "x=1,y=2"  # two assignments are kept as they are
