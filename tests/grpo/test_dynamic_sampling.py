"""Dynamic sampling: which groups are kept, the cap, and the equal split over DP replicas."""

from __future__ import annotations

import pytest

from megatron_lpreg.grpo.dynamic_sampling import sample_groups, take_groups, varied_groups
from megatron_lpreg.grpo.rollout import GradedRollout
from megatron_lpreg.rollout.engine import Completion
from tests.distributed import run_distributed

N = 2  # responses per prompt


def _round(rnd: int, rank: int, varied: list[bool]) -> GradedRollout:
    """One replica's round: group g's prompt is [rnd, rank, g]; varied groups get rewards (0, 1)."""
    rewards = [r for v in varied for r in ((0.0, 1.0) if v else (1.0, 1.0))]
    comps = [Completion([rnd, rank, g, j], [0.0] * 4, "stop") for g in range(len(varied)) for j in range(N)]
    return GradedRollout([[rnd, rank, g] for g in range(len(varied))], comps, rewards, ["ok"] * len(comps), N,
                         generate_s=1.0, reward_s=0.5)


def test_varied_groups_and_take_groups():
    assert varied_groups([0, 1, 1, 1, 0, 0, 0.5, 0.25], 2) == [True, False, False, True]
    with pytest.raises(ValueError, match="groups of 2"):
        varied_groups([0, 1, 1], 2)
    g = take_groups(_round(0, 0, [True, False, True]), [2, 0])
    assert g.prompt_ids == [[0, 0, 2], [0, 0, 0]] and g.rewards == [0.0, 1.0, 0.0, 1.0]
    assert [c.token_ids[2] for c in g.completions] == [2, 2, 0, 0]


def _single(plan, target, granule, max_rounds):
    drawn = []

    def draw(rnd):
        drawn.append(rnd)
        return _round(rnd, 0, plan[rnd]), 1

    out, truncated, metrics = sample_groups(draw, target=target, granule=granule, max_rounds=max_rounds,
                                            dp_rank=0, dp_size=1)
    return out, truncated, metrics, drawn


def test_rounds_until_enough_groups_then_the_first_ones_in_order():
    plan = [[True, False, False, True], [False, False, False, False], [True, True, True, False]]
    out, truncated, metrics, drawn = _single(plan, target=4, granule=2, max_rounds=10)
    assert drawn == [0, 1, 2]
    assert out.prompt_ids == [[0, 0, 0], [0, 0, 3], [2, 0, 0], [2, 0, 1]]  # round 2's third group is surplus
    assert metrics == {"sampling/rounds": 3.0, "sampling/kept_groups": 5.0, "sampling/dropped_groups": 7.0,
                       "sampling/trained_groups": 4.0}
    assert (out.generate_s, out.reward_s) == (3.0, 1.5) and truncated == pytest.approx(3 / 12)


def test_at_the_cap_trains_on_a_multiple_of_the_granule_or_on_the_first_round():
    plan = [[True, False, False, False], [True, True, False, False], [True] * 4]
    out, _, metrics, drawn = _single(plan, target=4, granule=2, max_rounds=2)
    assert drawn == [0, 1] and metrics["sampling/kept_groups"] == 3.0
    assert metrics["sampling/trained_groups"] == 2.0 and out.prompt_ids == [[0, 0, 0], [1, 0, 0]]
    none = [[False] * 4] * 2
    out, _, metrics, _ = _single(none, target=4, granule=2, max_rounds=2)
    assert out.prompt_ids == [[0, 0, g] for g in range(4)]  # as drawn: zero advantage everywhere
    assert metrics["sampling/trained_groups"] == 4.0 and metrics["sampling/kept_groups"] == 0.0


# Replica 0 keeps most of its groups, replica 1 few: the chosen groups must still split evenly.
PLAN = {0: [[True, True, False], [True, True, True]], 1: [[False, False, True], [False, False, False]]}


def _dp_body(ctx):
    def draw(rnd):
        return _round(rnd, ctx.dp_rank, PLAN[ctx.dp_rank][rnd]), 0

    out, _, metrics = sample_groups(draw, target=6, granule=2, max_rounds=5, dp_rank=ctx.dp_rank,
                                    dp_size=ctx.dp_size, dp_group=ctx.dp_group)
    return out.prompt_ids, out.rewards, metrics


def test_data_parallel_replicas_get_equal_shares_of_the_global_order():
    results = run_distributed(_dp_body, world_size=2, tp_size=1, timeout_s=120)
    # Global order (round, replica, group): r0: [0,0,0] [0,0,1] [0,1,2]; r1: [1,0,0] [1,0,1] [1,0,2].
    assert results[0][0] == [[0, 0, 0], [0, 0, 1], [0, 1, 2]]
    assert results[1][0] == [[1, 0, 0], [1, 0, 1], [1, 0, 2]]
    for prompts, rewards, metrics in results:
        assert len(rewards) == 3 * N and all(varied_groups(rewards, N))
        assert metrics == {"sampling/rounds": 2.0, "sampling/kept_groups": 6.0,
                           "sampling/dropped_groups": 6.0, "sampling/trained_groups": 6.0}
