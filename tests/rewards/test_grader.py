import pytest

from megatron_lpreg.rewards import grade
from megatron_lpreg.rewards.grader import grade_detailed

# (response, ground truth, expected reward)
CASES = [
    # equal after normalisation / sympy / math-verify
    (r"The answer is $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
    (r"\boxed{\frac{2}{4}}", "0.5", 1.0),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}", 1.0),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0),
    (r"\boxed{10^{3}}", "1000", 1.0),
    (r"\boxed{2^{10}}", "1024", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{30^\circ}", "30", 1.0),
    (r"\boxed{x=3}", "3", 1.0),
    (r"\boxed{\text{Monday}}", "Monday", 1.0),
    (r"\boxed{\left(1, 2\right]}", "(1,2]", 1.0),
    (r"\boxed{[0,\infty)}", r"[0, \infty)", 1.0),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", 1.0),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    (r"\boxed{2\pi}", r"\pi \cdot 2", 1.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    (r"\boxed{50\%}", "50", 1.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{1.0}", "1", 1.0),
    (r"first \boxed{3}, then corrected: \boxed{4}", "4", 1.0),  # last box wins
    (r"\boxed{\frac{\frac{1}{2}}{2}}", r"\frac14", 1.0),  # nested braces
    (r"\fbox{7}", "7", 1.0),
    # not equal
    (r"first \boxed{4}, then corrected: \boxed{3}", "4", 0.0),
    (r"\boxed{4}", "5", 0.0),
    (r"\boxed{0.333}", r"\frac{1}{3}", 0.0),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
    (r"\boxed{(1,2)}", "(1,2]", 0.0),
    (r"\boxed{(1,2)}", "(2,1)", 0.0),
    (r"\boxed{x}", "y", 0.0),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0),
    (r"\boxed{\text{Tuesday}}", "Monday", 0.0),
    (r"\boxed{1001}", "1000", 0.0),
    (r"\boxed{-2}", "2", 0.0),
    (r"\boxed{}", "0", 0.0),
    ("The answer is 5.", "5", 0.0),  # no box
    (r"\boxed{5", "5", 0.0),  # unclosed box
]


@pytest.mark.parametrize("response, truth, expected", CASES)
def test_grade_table(response, truth, expected):
    assert grade(response, truth, timeout_s=5.0) == expected


def test_grade_returns_floats_and_statuses():
    assert grade_detailed(r"\boxed{2}", "2") == (1.0, "ok")
    assert grade_detailed("nothing", "2") == (0.0, "no_box")
    assert grade_detailed("\\boxed{" + "9" * 2000 + "}", "2") == (0.0, "too_long")
    reward = grade(r"\boxed{2}", "2")
    assert isinstance(reward, float)


def test_ground_truth_may_be_boxed_or_in_dollars():
    assert grade(r"\boxed{\frac{1}{2}}", r"$\boxed{0.5}$") == 1.0
    assert grade(r"\boxed{3}", "$3$") == 1.0
