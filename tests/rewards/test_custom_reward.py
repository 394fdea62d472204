"""User reward functions (rewards/custom.py) run in the RewardPool's workers, both signatures."""

from __future__ import annotations

import os

import pytest

from megatron_lpreg.rewards import RewardPool
from megatron_lpreg.rewards.custom import takes_verl_signature


def test_the_signature_decides_the_call():
    from tests.rewards.hooks import short_score, verl_score

    assert takes_verl_signature(verl_score) and not takes_verl_signature(short_score)
    assert takes_verl_signature(lambda *args: 0.0) and not takes_verl_signature(len)


def test_verl_compute_score_gets_source_truth_and_extra_info_in_a_worker():
    with RewardPool(2, timeout_s=3.0, memory_mb=None, function="tests.rewards.hooks:verl_score") as pool:
        result = pool.grade_batch_detailed(
            ["7", "7", "8", "DICT", "RAISE", "PID", "HANG"], ["7", "7", "7", "1", "1", "1", "1"],
            ["math", "gsm", "math", "math", "math", "math", "math"],
            [None, {"bonus": 2.0}, {"bonus": 0.5}, None, None, None, None])
    assert result.rewards[:5] == [1.0, 3.25, 0.5, 0.5, 0.0]
    assert result.statuses[:5] == ["ok", "ok", "ok", "ok", "error"]
    assert result.rewards[5] not in (0.0, float(os.getpid()))  # graded in a worker process, not here
    assert result.statuses[6] == "timeout" and result.rewards[6] == 0.0


def test_short_form_keeps_its_values_and_nan_is_an_error():
    with RewardPool(1, memory_mb=None, function="tests.rewards.hooks:short_score") as pool:
        result = pool.grade_batch_detailed(["the answer is 4", "no"], ["4", "4"])
    assert result.rewards == [0.75, 0.0] and result.statuses == ["ok", "error"]


def test_a_bad_function_path_fails_before_any_worker_starts():
    with pytest.raises(ValueError, match="cannot import"):
        RewardPool(1, function="tests.rewards.hooks:no_such_fn")
