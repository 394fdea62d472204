import logging
import random

import pytest
import torch

from megatron_lpreg.policy.batching import RolloutBatch, microbatch, padded_length, token_budget_microbatches


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
    with caplog.at_level(logging.WARNING, logger="megatron_lpreg.policy.batching"):
        mbs = token_budget_microbatches(lengths, 20)
    assert [1] in mbs
    assert sorted(i for mb in mbs for i in mb) == [0, 1, 2, 3]
    assert mbs == [[0, 2, 3], [1]]
    assert "exceed max_tokens=20" in caplog.text and "[1]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_lpreg.policy.batching"):
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


def make_batch(with_token_fields=True, trainable=None):
    seqs = [([5, 6, 7], [8, 9]), ([1], [2, 3, 4, 10]), ([11, 12], [])]
    fields = dict(old_logprobs=[[-0.1, -0.2], [-1.0, -2.0, -3.0, -4.0], []],
                  proxy_logprobs=[[-0.3, -0.4], [-5.0, -6.0, -7.0, -8.0], []]) if with_token_fields else {}
    return RolloutBatch.from_sequences([p + r for p, r in seqs], [len(p) for p, _ in seqs], [0.5, -1.0, 2.0],
                                       trainable=trainable, **fields)


def test_flat_layout():
    batch = make_batch()
    assert batch.tokens.tolist() == [5, 6, 7, 8, 9, 1, 2, 3, 4, 10, 11, 12]
    assert batch.seq_starts == [0, 5, 10] and batch.response_starts == [0, 2, 6]
    assert batch.old_logprobs.tolist() == pytest.approx([-0.1, -0.2, -1.0, -2.0, -3.0, -4.0])
    assert [v.tolist() for v in batch.responses(batch.proxy_logprobs)] == [
        pytest.approx([-0.3, -0.4]), [-5.0, -6.0, -7.0, -8.0], []]
    assert batch.sequence_ids().tolist() == [0, 0, 1, 1, 1, 1]
    assert float(batch.loss_tokens([0, 1, 2])) == 6.0
    masked = make_batch(trainable=[True, False, True])
    assert masked.trained_mask().tolist() == [True, True, False, False, False, False]
    assert float(masked.loss_tokens([0, 1])) == 2.0


def test_microbatch_alignment_by_hand():
    mb = microbatch(make_batch(), [0], pad_id=0)
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 9]]
    assert mb.targets.tolist() == [[6, 7, 8, 9, 0]]
    assert mb.loss_mask.tolist() == [[False, False, True, True, False]]
    assert mb.field("old_logprobs")[0].tolist() == pytest.approx([0, 0, -0.1, -0.2, 0])
    assert mb.field("proxy_logprobs")[0].tolist() == pytest.approx([0, 0, -0.3, -0.4, 0])
    assert mb.field("ref_logprobs") is None
    assert mb.advantages.tolist() == [0.5]
    assert mb.loss_mask.dtype == torch.bool and mb.tokens.dtype == torch.long


def test_microbatch_padding_and_multi_rows():
    mb = microbatch(make_batch(trainable=[True, True, False]), [2, 1, 0], pad_id=-7, pad_to_multiple=4)
    assert mb.tokens.shape == (3, 8)  # max len 5 -> 8
    assert mb.tokens.tolist() == [
        [11, 12, -7, -7, -7, -7, -7, -7],
        [1, 2, 3, 4, 10, -7, -7, -7],
        [5, 6, 7, 8, 9, -7, -7, -7],
    ]
    assert mb.targets.tolist() == [
        [12, -7, -7, -7, -7, -7, -7, -7],
        [2, 3, 4, 10, -7, -7, -7, -7],
        [6, 7, 8, 9, -7, -7, -7, -7],
    ]
    assert mb.loss_mask.int().tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
    ]
    assert mb.field("old_logprobs")[1].tolist() == [-1.0, -2.0, -3.0, -4.0, 0, 0, 0, 0]
    assert mb.advantages.tolist() == [2.0, -1.0, 0.5]
    assert mb.seq_lens == [2, 5, 5]
    untrained = microbatch(make_batch(trainable=[False, True, True]), [0], pad_id=0)
    assert not untrained.loss_mask.any()


@pytest.mark.parametrize("seed", range(10))
def test_microbatch_random_invariants_and_scatter_roundtrip(seed):
    rng = random.Random(seed)
    n = 12
    prompts = [[rng.randint(1, 99) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    responses = [[rng.randint(100, 199) for _ in range(rng.randint(0, 9))] for _ in range(n)]
    old = [[float(t) for t in r] for r in responses]  # logprob := token id, to track alignment
    batch = RolloutBatch.from_sequences([p + r for p, r in zip(prompts, responses)], [len(p) for p in prompts],
                                        torch.randn(n), old_logprobs=old)
    out = torch.full((batch.response_tokens,), -1.0)
    for rows in token_budget_microbatches(batch.lengths, 40, pad_to_multiple=4):
        mb = microbatch(batch, rows, pad_id=0, pad_to_multiple=4)
        assert mb.tokens.shape[1] % 4 == 0
        assert mb.tokens.numel() <= 40 or len(rows) == 1
        old_bs = mb.field("old_logprobs")
        for row, i in enumerate(rows):
            mask = mb.loss_mask[row]
            assert int(mask.sum()) == len(responses[i])
            assert mb.targets[row][mask].tolist() == responses[i]  # response tokens (>= 100) only
            assert old_bs[row][mask].tolist() == [float(t) for t in responses[i]]
            assert (old_bs[row][~mask] == 0).all()
        compact = mb.response_targets()
        # Compact values round-trip through the padded layout and land in the batch's flat order.
        assert torch.equal(mb.expand(compact.float()).reshape(-1)[mb.response_index], compact.float())
        index = mb.compact_index().reshape(-1)
        assert torch.equal(index[mb.response_index], torch.arange(compact.numel()))
        assert (index >= 0).sum() == compact.numel()
        mb.scatter(out, compact.float())
    assert out.tolist() == [float(t) for r in responses for t in r]


def test_rollout_batch_validation():
    ok = dict(sequences=[[1, 2, 3]], prompt_lens=[1], advantages=[0.0])
    assert len(RolloutBatch.from_sequences(**ok)) == 1 and RolloutBatch.from_sequences(**ok).lengths == [3]
    with pytest.raises(ValueError, match="prompt_len >= 1"):
        RolloutBatch.from_sequences(**{**ok, "prompt_lens": [0]})
    with pytest.raises(ValueError, match="advantages"):
        RolloutBatch.from_sequences(**{**ok, "advantages": [0.0, 1.0]})
    with pytest.raises(ValueError, match="old_logprobs"):
        RolloutBatch.from_sequences(**ok, old_logprobs=[[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="tokens"):
        RolloutBatch(torch.tensor([1, 2]), [1], [2], torch.zeros(1))
    with pytest.raises(IndexError):
        microbatch(RolloutBatch.from_sequences(**ok), [1], pad_id=0)
    with pytest.raises(ValueError):
        microbatch(RolloutBatch.from_sequences(**ok), [], pad_id=0)
