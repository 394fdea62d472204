import json
import operator
import re

import pytest

from megatron_lpreg.data import (
    PromptDataset,
    evaluate_expression,
    generate_arithmetic_problems,
    write_arithmetic_dataset,
)

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def test_deterministic_by_seed(tmp_path):
    a = write_arithmetic_dataset(tmp_path / "a.jsonl", 50, seed=3)
    b = write_arithmetic_dataset(tmp_path / "b.jsonl", 50, seed=3)
    c = write_arithmetic_dataset(tmp_path / "c.jsonl", 50, seed=4)
    assert open(a).read() == open(b).read()
    assert open(a).read() != open(c).read()
    assert generate_arithmetic_problems(50, 3) == [json.loads(line) for line in open(a)]


def test_answers_are_correct(tmp_path):
    path = write_arithmetic_dataset(tmp_path / "sub" / "train.jsonl", 300, seed=0, data_source="arith")
    rows = [json.loads(line) for line in open(path)]
    ds = PromptDataset(path)  # loads with the default verl field names
    assert len(ds) == 300 and ds.skipped == 0
    for row, rec in zip(rows, ds):
        info = row["extra_info"]
        question, expr = info["question"], info["expression"]
        answer = int(rec.ground_truth)
        assert rec.data_source == "arith"
        content = rec.prompt[0]["content"]
        assert rec.prompt[0]["role"] == "user" and content.startswith(question) and "\\boxed{}" in content
        # The question states exactly the expression's numbers, in order.
        assert re.findall(r"\d+", question) == re.findall(r"\d+", expr)
        # Independent recomputation (Python's own evaluator, float division).
        assert eval(expr, {"__builtins__": {}}) == answer  # noqa: S307 -- our own generated text
        assert evaluate_expression(expr) == answer
        assert answer >= 0
        if info["difficulty"] == 1 or question.startswith("What is"):
            a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question).groups()
            assert OPS[op](int(a), int(b)) == answer


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_difficulty_levels(difficulty):
    rows = generate_arithmetic_problems(40, seed=1, difficulty=difficulty, data_source="arith_val")
    assert {r["extra_info"]["difficulty"] for r in rows} == {difficulty}
    assert {r["data_source"] for r in rows} == {"arith_val"}
    n_ops = [len(re.findall(r"[-+*/]", r["extra_info"]["expression"])) for r in rows]
    assert set(n_ops) == {1: {1}, 2: {1, 2}, 3: {3}}[difficulty]


def test_mixed_covers_all_levels_and_rejects_bad_difficulty():
    rows = generate_arithmetic_problems(60, seed=2)
    assert {r["extra_info"]["difficulty"] for r in rows} == {1, 2, 3}
    with pytest.raises(ValueError, match="difficulty"):
        generate_arithmetic_problems(5, seed=0, difficulty=4)


def test_evaluate_expression_rejects_non_integers_and_code():
    assert evaluate_expression("(3 * 4 - 2) / 5") == 2
    with pytest.raises(ValueError):
        evaluate_expression("7 / 2")
    with pytest.raises(ValueError):
        evaluate_expression("__import__('os')")
