import logging
import random

import pytest
import torch

from megatron_lpreg.grpo import (
    RolloutBatch,
    collate,
    padded_length,
    split_for_data_parallel,
    token_budget_microbatches,
)


def mb_cost(mb, lengths, pad):
    return len(mb) * padded_length(max(lengths[i] for i in mb), pad)


@pytest.mark.parametrize("seed", range(60))
def test_partition_and_budget_random(seed):
    rng = random.Random(seed)
    n = rng.randint(0, 200)
    lengths = [rng.randint(1, 300) for _ in range(n)]
    max_tokens = rng.choice([64, 128, 256, 512, 1000, 4096])
    pad = rng.choice([1, 1, 8, 64])
    mbs = token_budget_microbatches(lengths, max_tokens, pad_to_multiple=pad)
    flat = [i for mb in mbs for i in mb]
    assert sorted(flat) == list(range(n))  # partition: every index exactly once
    assert all(mb for mb in mbs)
    for mb in mbs:
        if len(mb) == 1:
            continue
        assert mb_cost(mb, lengths, pad) <= max_tokens
    for mb in mbs:
        for i in mb:
            if padded_length(lengths[i], pad) > max_tokens:
                assert mb == [i]  # oversized sequence alone
    # within-bin ascending, bins ordered by first index
    assert all(mb == sorted(mb) for mb in mbs)
    assert [mb[0] for mb in mbs] == sorted(mb[0] for mb in mbs)
    # deterministic
    assert token_budget_microbatches(list(lengths), max_tokens, pad_to_multiple=pad) == mbs


def test_simple_packing_by_hand():
    # Descending: 6 (idx 2), 4 (0), 4 (3), 3 (1), 2 (4). Budget 12:
    # bin A max 6 holds 2 -> [2, 0]; bin B max 4 holds 3 -> [3, 1, 4].
    assert token_budget_microbatches([4, 3, 6, 4, 2], 12) == [[0, 2], [1, 3, 4]]
    # pad_to_multiple=8: every length pads to 8 -> one seq per 12-token bin... 8 <= 12 but 16 > 12.
    assert token_budget_microbatches([4, 3, 6, 4, 2], 12, pad_to_multiple=8) == [[0], [1], [2], [3], [4]]
    assert token_budget_microbatches([4, 3, 6, 4, 2], 40, pad_to_multiple=8) == [[0, 1, 2, 3, 4]]


def test_budget_is_tight_not_loose():
    lengths = [10] * 10
    mbs = token_budget_microbatches(lengths, 30)
    assert [len(mb) for mb in mbs] == [3, 3, 3, 1]
    assert token_budget_microbatches(lengths, 100) == [list(range(10))]
    assert token_budget_microbatches(lengths, 99) == [list(range(9)), [9]]


def test_long_sequence_alone_and_reported(caplog):
    lengths = [5, 50, 5, 5]
    with caplog.at_level(logging.WARNING, logger="megatron_lpreg.grpo.batching"):
        mbs = token_budget_microbatches(lengths, 20)
    assert [1] in mbs
    assert sorted(i for mb in mbs for i in mb) == [0, 1, 2, 3]
    assert mbs == [[0, 2, 3], [1]]
    assert "exceed max_tokens=20" in caplog.text and "[1]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_lpreg.grpo.batching"):
        token_budget_microbatches([5, 5], 20)
    assert caplog.text == ""


def test_microbatch_edge_inputs():
    assert token_budget_microbatches([], 100) == []
    assert token_budget_microbatches([7], 1) == [[0]]
    with pytest.raises(ValueError):
        token_budget_microbatches([1], 0)
    with pytest.raises(ValueError):
        token_budget_microbatches([1], 10, pad_to_multiple=0)
    with pytest.raises(ValueError):
        token_budget_microbatches([-1], 10)


def make_batch(with_token_fields=True):
    seqs = [([5, 6, 7], [8, 9]), ([1], [2, 3, 4, 10]), ([11, 12], [])]
    return RolloutBatch(
        input_ids=[torch.tensor(p + r) for p, r in seqs],
        prompt_lens=[len(p) for p, _ in seqs],
        response_lens=[len(r) for _, r in seqs],
        advantages=torch.tensor([0.5, -1.0, 2.0]),
        old_logprobs=[torch.tensor([-0.1, -0.2]), torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.zeros(0)]
        if with_token_fields else None,
        proxy_logprobs=[torch.tensor([-0.3, -0.4]), torch.tensor([-5.0, -6.0, -7.0, -8.0]), torch.zeros(0)]
        if with_token_fields else None,
    )


def test_collate_alignment_by_hand():
    batch = make_batch()
    out = collate(batch, [0], pad_id=0)
    assert out["tokens"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["targets"].tolist() == [[6, 7, 8, 9, 0]]
    assert out["loss_mask"].tolist() == [[False, False, True, True, False]]
    assert out["targets"][0, 2] == 8 and out["targets"][0, 3] == 9
    assert out["old_logprobs"][0].tolist() == pytest.approx([0, 0, -0.1, -0.2, 0])
    assert out["proxy_logprobs"][0].tolist() == pytest.approx([0, 0, -0.3, -0.4, 0])
    assert out["advantages"].tolist() == [0.5]
    assert out["loss_mask"].dtype == torch.bool and out["tokens"].dtype == torch.long


def test_collate_padding_and_multi_rows():
    batch = make_batch()
    out = collate(batch, [2, 1, 0], pad_id=-7, pad_to_multiple=4)
    assert out["tokens"].shape == (3, 8)  # max len 5 -> 8
    assert out["tokens"].tolist() == [
        [11, 12, -7, -7, -7, -7, -7, -7],
        [1, 2, 3, 4, 10, -7, -7, -7],
        [5, 6, 7, 8, 9, -7, -7, -7],
    ]
    assert out["targets"].tolist() == [
        [12, -7, -7, -7, -7, -7, -7, -7],
        [2, 3, 4, 10, -7, -7, -7, -7],
        [6, 7, 8, 9, -7, -7, -7, -7],
    ]
    assert out["loss_mask"].int().tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
    ]
    assert out["old_logprobs"][1].tolist() == [-1.0, -2.0, -3.0, -4.0, 0, 0, 0, 0]
    assert out["proxy_logprobs"][1].tolist() == [-5.0, -6.0, -7.0, -8.0, 0, 0, 0, 0]
    assert out["advantages"].tolist() == [2.0, -1.0, 0.5]
    assert out["seq_lens"].tolist() == [2, 5, 5]
    assert out["prompt_lens"].tolist() == [2, 1, 3]
    assert out["response_lens"].tolist() == [0, 4, 2]
    assert out["indices"].tolist() == [2, 1, 0]
    assert out["position_ids"].tolist() == [list(range(8))] * 3
    assert "old_logprobs" not in collate(make_batch(False), [0], pad_id=0)


@pytest.mark.parametrize("seed", range(10))
def test_collate_random_invariants(seed):
    rng = random.Random(seed)
    n = 12
    prompts = [[rng.randint(1, 99) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    responses = [[rng.randint(100, 199) for _ in range(rng.randint(0, 9))] for _ in range(n)]
    old = [torch.tensor([float(t) for t in r]) for r in responses]  # logprob := token id, to track alignment
    batch = RolloutBatch(
        input_ids=[torch.tensor(p + r, dtype=torch.long) for p, r in zip(prompts, responses)],
        prompt_lens=[len(p) for p in prompts], response_lens=[len(r) for r in responses],
        advantages=torch.randn(n), old_logprobs=old,
    )
    for mb in token_budget_microbatches(batch.lengths, 40, pad_to_multiple=4):
        out = collate(batch, mb, pad_id=0, pad_to_multiple=4)
        assert out["tokens"].shape[1] % 4 == 0
        assert out["tokens"].numel() <= 40 or len(mb) == 1
        for row, i in enumerate(mb):
            mask = out["loss_mask"][row]
            assert int(mask.sum()) == len(responses[i])
            assert out["targets"][row][mask].tolist() == responses[i]  # response tokens (>= 100) only
            assert out["old_logprobs"][row][mask].tolist() == [float(t) for t in responses[i]]
            assert (out["old_logprobs"][row][~mask] == 0).all()


def test_rollout_batch_validation():
    ok = dict(input_ids=[torch.tensor([1, 2, 3])], prompt_lens=[1], response_lens=[2], advantages=torch.zeros(1))
    assert len(RolloutBatch(**ok)) == 1 and RolloutBatch(**ok).lengths == [3]
    with pytest.raises(ValueError):
        RolloutBatch(**{**ok, "response_lens": [3]})
    with pytest.raises(ValueError):
        RolloutBatch(**{**ok, "prompt_lens": [0], "response_lens": [3]})
    with pytest.raises(ValueError):
        RolloutBatch(**{**ok, "advantages": torch.zeros(2)})
    with pytest.raises(ValueError):
        RolloutBatch(**ok, old_logprobs=[torch.zeros(3)])
    with pytest.raises(IndexError):
        collate(RolloutBatch(**ok), [1], pad_id=0)
    with pytest.raises(ValueError):
        collate(RolloutBatch(**ok), [], pad_id=0)


def test_split_for_data_parallel():
    assert split_for_data_parallel(8, 2, 0) == [0, 1, 2, 3]
    assert split_for_data_parallel(8, 2, 1) == [4, 5, 6, 7]
    parts = [split_for_data_parallel(12, 4, r) for r in range(4)]
    assert sum(parts, []) == list(range(12))
    assert split_for_data_parallel(0, 2, 1) == []
    with pytest.raises(ValueError, match="equally"):
        split_for_data_parallel(10, 4, 0)
    with pytest.raises(ValueError):
        split_for_data_parallel(8, 2, 2)
    with pytest.raises(ValueError):
        split_for_data_parallel(8, 0, 0)
