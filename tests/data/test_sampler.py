import json
import random

import numpy as np
import pytest
import torch

from megatron_lpreg.data import PromptSampler, epoch_order


def take(sampler, k):
    return [next(sampler) for _ in range(k)]


def test_epoch_order_deterministic_and_independent_of_global_rng():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    a = epoch_order(50, seed=7, epoch=3)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    np.random.rand(10), torch.rand(10)
    b = epoch_order(50, seed=7, epoch=3)
    assert a == b
    assert sorted(a) == list(range(50))
    assert a != list(range(50))
    assert epoch_order(50, 7, 4) != a
    assert epoch_order(50, 8, 3) != a
    # (seed, epoch) pairs do not alias the way seed + epoch would.
    assert epoch_order(50, 1, 0) != epoch_order(50, 0, 1)
    assert epoch_order(5, 7, 3, shuffle=False) == [0, 1, 2, 3, 4]


def test_batches_follow_epoch_orders_drop_last():
    s = PromptSampler(10, 3, seed=5)
    assert len(s) == 3
    e0 = take(s, 3)
    assert all(len(b) == 3 for b in e0)
    assert sum(e0, []) == epoch_order(10, 5, 0)[:9]
    assert s.state_dict() == {"epoch": 1, "position": 0}
    e1_first = next(s)
    assert e1_first == epoch_order(10, 5, 1)[:3]
    assert e1_first != e0[0]
    assert s.state_dict() == {"epoch": 1, "position": 3}


def test_keep_last_short_batch():
    s = PromptSampler(10, 3, seed=0, drop_last=False)
    assert len(s) == 4
    batches = take(s, 5)
    assert [len(b) for b in batches] == [3, 3, 3, 1, 3]
    assert sorted(sum(batches[:4], [])) == list(range(10))
    assert batches[4] == epoch_order(10, 0, 1)[:3]


def test_no_shuffle_is_sequential():
    s = PromptSampler(7, 2, seed=123, shuffle=False)
    assert take(s, 4) == [[0, 1], [2, 3], [4, 5], [0, 1]]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("stop_after", [0, 1, 4, 5, 11])
def test_resume_equals_uninterrupted(drop_last, stop_after):
    ref = take(PromptSampler(23, 5, seed=11, drop_last=drop_last), 20)

    first = PromptSampler(23, 5, seed=11, drop_last=drop_last)
    head = take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # as if saved in a checkpoint
    assert set(state) == {"epoch", "position"}

    torch.manual_seed(999), np.random.seed(999), random.seed(999)  # a different process, different RNG
    resumed = PromptSampler(23, 5, seed=11, drop_last=drop_last)
    resumed.load_state_dict(state)
    tail = take(resumed, 20 - stop_after)
    assert head + tail == ref


def test_resume_with_different_seed_differs():
    a = PromptSampler(20, 4, seed=1)
    take(a, 2)
    b = PromptSampler(20, 4, seed=2)
    b.load_state_dict(a.state_dict())
    assert next(b) != next(a)


def test_invalid_arguments_and_state():
    with pytest.raises(ValueError):
        PromptSampler(3, 4, seed=0)  # no full batch with drop_last
    assert len(PromptSampler(3, 4, seed=0, drop_last=False)) == 1
    with pytest.raises(ValueError):
        PromptSampler(0, 1, seed=0)
    s = PromptSampler(10, 3, seed=0)
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({"epoch": 0, "position": 9})  # 10th sample is dropped by drop_last
    with pytest.raises(ValueError):
        s.load_state_dict({"epoch": -1, "position": 0})
    s.load_state_dict({"epoch": 2, "position": 3})
    assert next(s) == epoch_order(10, 0, 2)[3:6]
