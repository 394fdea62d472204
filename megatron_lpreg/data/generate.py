"""Seeded arithmetic word problems with integer answers, written in verl's prompt schema.

No real math data ships offline, so CPU demos train on these. Difficulty levels:

1. one operation on two-digit numbers ("What is 37 + 48?");
2. one multiplication, or a two-step word problem (``a + b * c``);
3. three-step word problems with an exact division (``(a * b - c) / d``) or ``(a + b) * c - d``.

Every row carries its expression in ``extra_info`` so the answer can be re-derived.
Generation uses its own ``random.Random(seed)``: output depends only on the arguments.
"""

from __future__ import annotations

import json
import os
import random
from typing import Union

Difficulty = Union[int, str]

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar"]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "coins", "cards", "shells", "books"]
_CONTAINERS = ["bags", "boxes", "packs", "jars", "crates"]


def _level1(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b}"
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", f"{a} - {b}"


def _level2(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.4:
        a, b = rng.randint(3, 19), rng.randint(3, 19)
        return f"What is {a} * {b}?", f"{a} * {b}"
    name, item, box = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    a, b, c = rng.randint(5, 60), rng.randint(2, 9), rng.randint(2, 12)
    question = (
        f"{name} has {a} {item}. {name} buys {b} {box} with {c} {item} in each. "
        f"How many {item} does {name} have now?"
    )
    return question, f"{a} + {b} * {c}"


def _level3(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if rng.random() < 0.5:
        a, b, d = rng.randint(3, 12), rng.randint(4, 15), rng.randint(2, 9)
        total = a * b
        # c keeps (total - c) a positive multiple of d.
        k = rng.randint(1, max(1, total // d - 1))
        c = total - k * d
        box = rng.choice(_CONTAINERS)
        question = (
            f"{name} has {a} {box} with {b} {item} in each. {name} gives away {c} {item} and shares "
            f"the rest equally among {d} friends. How many {item} does each friend get?"
        )
        return question, f"({a} * {b} - {c}) / {d}"
    a, b, c = rng.randint(5, 40), rng.randint(5, 40), rng.randint(2, 6)
    d = rng.randint(1, (a + b) * c - 1)
    question = (
        f"{name} collects {a} {item} on Monday and {b} {item} on Tuesday. By Friday the collection has "
        f"grown to {c} times that amount, and then {name} loses {d} {item}. "
        f"How many {item} does {name} have left?"
    )
    return question, f"({a} + {b}) * {c} - {d}"


_LEVELS = {1: _level1, 2: _level2, 3: _level3}


def evaluate_expression(expr: str) -> int:
    """Exact integer value of a generated expression (ints, + - * / and parentheses only)."""
    import ast
    from fractions import Fraction

    ops = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y,
           ast.Mult: lambda x, y: x * y, ast.Div: lambda x, y: x / y}

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression element {ast.dump(node)} in {expr!r}")

    value = ev(ast.parse(expr, mode="eval"))
    if value.denominator != 1:
        raise ValueError(f"{expr!r} is not an integer ({value})")
    return int(value)


def generate_arithmetic_problems(
    n: int, seed: int, data_source: str = "arith", difficulty: Difficulty = "mixed"
) -> list[dict]:
    """``n`` verl-schema rows; ``difficulty`` is 1, 2, 3 or ``"mixed"`` (uniform per problem)."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if difficulty != "mixed" and difficulty not in _LEVELS:
        raise ValueError(f"difficulty must be 1, 2, 3 or 'mixed', got {difficulty!r}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        level = rng.choice(sorted(_LEVELS)) if difficulty == "mixed" else int(difficulty)
        question, expr = _LEVELS[level](rng)
        answer = evaluate_expression(expr)
        rows.append({
            "data_source": data_source,
            "prompt": [{"role": "user", "content": f"{question}\n{BOXED_INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(answer)},
            "extra_info": {"index": i, "question": question, "expression": expr, "difficulty": level},
        })
    return rows


def write_arithmetic_dataset(
    path: str | os.PathLike,
    n: int,
    seed: int,
    data_source: str = "arith",
    difficulty: Difficulty = "mixed",
) -> str:
    """Write ``n`` generated problems as verl-schema JSONL to ``path``; returns the path."""
    path = os.fspath(path)
    rows = generate_arithmetic_problems(n, seed, data_source=data_source, difficulty=difficulty)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
