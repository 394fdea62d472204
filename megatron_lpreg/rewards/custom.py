"""A user reward function in place of the math grader (verl's ``custom_reward_function``).

``reward.function: "my_pkg.rewards:score"`` names ``score(response: str, ground_truth: str) -> float``.
It runs in the trainer process on the engine rank: it is the user's own trusted code, and it may
reward things the math grader cannot see (format, length, tool use). An exception or a non-finite
value gives reward 0 with status ``error``, as a grader failure does.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

from .pool import STATUS_ERROR, BatchResult


def import_function(path: str) -> Callable:
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"reward.function={path!r}: expected 'module.path:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.function={path!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise ValueError(f"reward.function={path!r} is not callable")
    return fn


class FunctionReward:
    """Grades with a plain function; the same ``grade_batch_detailed`` as :class:`RewardPool`."""

    def __init__(self, path: str):
        self.fn = import_function(path)

    def grade_batch_detailed(self, responses: Sequence[str], ground_truths: Sequence[str]) -> BatchResult:
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        rewards, statuses = [], []
        for response, truth in zip(responses, ground_truths):
            try:
                value = float(self.fn(response, truth))
                status = "ok" if math.isfinite(value) else STATUS_ERROR
            except Exception:  # noqa: BLE001 - one bad answer must not stop the step
                value, status = 0.0, STATUS_ERROR
            rewards.append(value if status == "ok" else 0.0)
            statuses.append(status)
        return BatchResult(rewards, statuses, [0.0] * len(rewards), 0)

    def close(self) -> None:
        pass
