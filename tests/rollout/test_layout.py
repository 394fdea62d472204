"""Where rollouts run: every layout covers each replica's prompts once, and the engines' seed slots
number the world's engines without a gap or a repeat."""

from __future__ import annotations

import pytest

from megatron_lpreg.grpo.rollout import prompt_slice
from megatron_lpreg.rollout.layout import RolloutLayoutError, rollout_layout


def _world(kind, tp, dp, **kw):
    return {(dp_rank, tp_rank): rollout_layout(kind, tp_size=tp, tp_rank=tp_rank, dp_rank=dp_rank, dp_size=dp, **kw)
            for dp_rank in range(dp) for tp_rank in range(tp)}


@pytest.mark.parametrize("kind, tp, dp, kw, name, engines", [
    ("vllm", 2, 2, {}, "spmd", 2),
    ("vllm", 4, 2, {"engine_tp": 2}, "spmd", 4),
    ("vllm", 2, 1, {"engine_tp": 1}, "spmd", 2),
    ("hf", 2, 2, {"shared_weights": True}, "sliced", 4),
    ("hf", 2, 2, {"shared_weights": False}, "rank0", 2),
    ("hf", 1, 3, {"shared_weights": True}, "rank0", 3),
])
def test_every_prompt_once_and_one_slot_per_engine(kind, tp, dp, kw, name, engines):
    world = _world(kind, tp, dp, **kw)
    assert {lay.name for lay in world.values()} == {name}
    assert {lay.engines for lay in world.values()} == {engines}
    leaders = [lay for lay in world.values() if lay.leader]
    assert sorted(lay.slot for lay in leaders) == list(range(engines))  # one leader per engine
    assert all(lay.has_engine for lay in leaders)
    for dp_rank in range(dp):
        prompts = 10
        covered = []
        for tp_rank in range(tp):
            lay = world[dp_rank, tp_rank]
            if lay.leader:
                covered += range(prompts)[prompt_slice(prompts, lay.slice_index, lay.slices)]
        assert covered == list(range(prompts))
    # The ranks of one engine sample the same slice with the same seed.
    for lay in world.values():
        if lay.has_engine:
            leader = next(o for o in leaders if o.slot == lay.slot)
            assert (lay.slice_index, lay.slices) == (leader.slice_index, leader.slices)


def test_engine_tp_must_divide_the_trainer_tp():
    with pytest.raises(RolloutLayoutError, match="rollout.tp=3 must divide parallel.tp=4"):
        rollout_layout("vllm", tp_size=4, tp_rank=0, dp_rank=0, dp_size=1, engine_tp=3)
    with pytest.raises(RolloutLayoutError, match="applies to the vllm engine"):
        rollout_layout("hf", tp_size=4, tp_rank=0, dp_rank=0, dp_size=1, engine_tp=2)
