"""DAPO's soft overlong punishment at its edges, and overlong filtering's loss mask."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.policy.batching import RolloutBatch, microbatch
from megatron_lpreg.grpo.reward_shaping import overlong_penalty, shape_rewards, truncated_mask
from megatron_lpreg.grpo.rollout import GradedRollout
from megatron_lpreg.rollout.engine import Completion


@pytest.mark.parametrize("length, want", [
    (0, 0.0),
    (12, 0.0),  # L_max - B: the last length without punishment
    (13, -0.25),  # one token into the buffer of 4
    (14, -0.5),
    (16, -1.0),  # L = L_max: the full factor
    (18, -1.5),  # beyond L_max (a stop token past the budget): keeps growing, as verl's formula does
])
def test_penalty_is_zero_then_linear_over_the_buffer(length, want):
    assert overlong_penalty(length, max_tokens=16, buffer=4, factor=1.0) == pytest.approx(want, abs=1e-15)


def test_penalty_scales_with_the_factor_and_buffer_zero_is_off():
    assert overlong_penalty(15, max_tokens=16, buffer=4, factor=0.5) == pytest.approx(-0.375)
    assert overlong_penalty(16, max_tokens=16, buffer=16, factor=2.0) == pytest.approx(-2.0)
    assert overlong_penalty(1, max_tokens=16, buffer=16, factor=2.0) == pytest.approx(-0.125)
    assert overlong_penalty(16, max_tokens=16, buffer=0, factor=1.0) == 0.0


def _graded(lengths, finish, rewards):
    comps = [Completion(list(range(1, length + 1)), [0.0] * length, f) for length, f in zip(lengths, finish)]
    return GradedRollout([[7, 8]], comps, list(rewards), ["ok"] * len(comps), n=len(comps))


def test_shape_rewards_adds_the_penalty_to_each_response():
    graded = _graded([4, 13, 16, 16], ["stop", "stop", "stop", "length"], [1.0, 1.0, 0.0, 0.0])
    shape_rewards(graded, max_tokens=16, buffer=4, factor=1.0)
    assert graded.rewards == pytest.approx([1.0, 0.75, -1.0, -1.0])
    assert truncated_mask(graded) == [True, True, True, False]


def test_untrainable_sequences_leave_the_loss_mask_but_keep_their_rows():
    ids = [[5, 6, 7, 8], [5, 6, 9], [5, 1, 2, 3]]
    batch = RolloutBatch.from_sequences(ids, [2, 2, 1], [1.0, -1.0, 0.5], trainable=[True, False, True])
    mb = microbatch(batch, [0, 1, 2], pad_id=0)
    assert mb.loss_mask.sum(-1).tolist() == [2, 0, 3]
    assert [float(batch.loss_tokens([i])) for i in range(3)] == [2, 0, 3]
    with pytest.raises(ValueError, match="trainable must have shape"):
        RolloutBatch.from_sequences(ids, [2, 2, 1], [0.0] * 3, trainable=[True])
