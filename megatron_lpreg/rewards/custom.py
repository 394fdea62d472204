"""A user reward function in place of the math grader (verl's ``custom_reward_function``).

``reward.function: "my_pkg.rewards:score"`` names either verl's
``compute_score(data_source, solution_str, ground_truth, extra_info=None)`` (a float, or a dict
whose ``"score"`` is the reward, as verl accepts) or the short ``score(response, ground_truth)``;
the form is read from the signature (three or more positional parameters: verl's). It runs in
the reward pool's workers (``rewards.pool``) under the same per-answer time and memory limits as
the math grader, so a slow or crashing function costs its answer, not the step. ``extra_info``
is the prompt row's ``extra_info`` column (None where the row has none). An exception or a
non-finite value gives reward 0 with status ``error``, as a grader failure does.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable

from .grader import STATUS_OK

STATUS_ERROR = "error"  # an exception or a bad value while grading (the pool's status too)


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


def takes_verl_signature(fn: Callable) -> bool:
    """verl's ``(data_source, solution_str, ground_truth, extra_info=None)`` or the short form."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the short form
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)


def call_reward(fn: Callable, verl: bool, data_source: str, response: str, ground_truth: str,
                extra_info) -> tuple[float, str]:
    """(reward, status) of one response; never raises."""
    try:
        value = fn(data_source, response, ground_truth, extra_info) if verl else fn(response, ground_truth)
        if isinstance(value, dict):
            value = value["score"]
        value = float(value)
    except MemoryError:  # the pool retires a worker that hit its memory limit
        raise
    except Exception:  # noqa: BLE001 - one bad answer must not stop the step
        return 0.0, STATUS_ERROR
    return (value, STATUS_OK) if math.isfinite(value) else (0.0, STATUS_ERROR)
