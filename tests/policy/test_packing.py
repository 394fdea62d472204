"""Packed rows: the partition, the layout map, and exactness against the padded layout (TP=1, TP=2)."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_lpreg.policy.batching import RolloutBatch, microbatch
from megatron_lpreg.policy.packing import pack_rows, thd_params, token_budget_packs
from tests.distributed import run_distributed
from tests.policy.test_passes import CaptureGrads, load_policy, random_rollouts
from tests.model.tiny_models import save_tiny_model


@pytest.mark.parametrize("seed", range(5))
def test_packs_cover_every_sequence_within_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 20), rng.randint(1, 200)]) for _ in range(rng.randint(1, 60))]
    budget, multiple = 256, rng.choice([1, 8])
    mbs = token_budget_packs(lengths, budget, pad_to_multiple=multiple)
    assert sorted(i for mb in mbs for row in mb for i in row) == list(range(len(lengths)))
    for mb in mbs:
        row_len = -(-max(lengths[i] for row in mb for i in row) // multiple) * multiple
        assert all(sum(lengths[i] for i in row) <= row_len for row in mb)
        assert len(mb) * row_len <= budget
    packed_tokens = sum(len(mb) * -(-max(lengths[i] for r in mb for i in r) // multiple) * multiple for mb in mbs)
    assert packed_tokens >= sum(lengths)


def test_packs_fill_rows_first_fit_decreasing():
    # Rows as long as the longest (9), at most 27 // 9 = 3 of them: 9 | 5 + 4 | 3 + 3 + 2 + 1.
    assert token_budget_packs([5, 9, 3, 4, 3, 2, 1], 27) == [[[1], [0, 3], [2, 4, 5, 6]]]
    # A budget of 9 holds one row of 9, one of 5, then two rows of 4: 5 and 4 never share a row
    # longer than the micro-batch's longest sequence.
    assert token_budget_packs([5, 9, 3, 4], 9) == [[[1]], [[0]], [[3], [2]]]
    assert token_budget_packs([30, 2], 16) == [[[0]], [[1]]]  # oversized: alone, with a warning


def test_pack_rows_maps_back_to_the_padded_layout():
    g = torch.Generator().manual_seed(0)
    lens = [(3, 4), (2, 1), (4, 6), (1, 2)]
    seqs = [torch.randint(1, 50, (p + r,), generator=g).tolist() for p, r in lens]
    batch = RolloutBatch.from_sequences(seqs, [p for p, _ in lens], torch.zeros(4))
    mb = microbatch(batch, [2, 0, 1, 3], pad_id=0)
    packed = pack_rows(mb, [[2], [0, 1], [3]], pad_id=0)
    assert packed.tokens.shape == (3, 10)
    assert packed.tokens[1].tolist() == seqs[0] + seqs[1]
    assert packed.tokens[2].tolist() == seqs[3] + [0] * 7
    valid = mb.tokens != 0
    assert torch.equal(packed.valid, valid)
    # The map back: row b's token t sits at flat position index[b, t] of the packed rows.
    for packed_values, padded in ((packed.tokens, mb.tokens), (packed.targets, mb.targets)):
        assert torch.equal(packed_values.reshape(-1)[packed.index[valid]], padded[valid])
    # A token sees exactly the earlier tokens of its own sequence (trailing pads: their own segment).
    for row, seg in ((1, [0] * 7 + [1] * 3), (2, [0] * 3 + [1] * 7)):
        mask = packed.attention_mask[row, 0]
        for q in range(10):
            for k in range(10):
                assert bool(mask[q, k]) == (k > q or seg[q] != seg[k])


def _exactness(ctx, directory):
    import copy

    from megatron_lpreg.policy.passes import recompute_logprobs, train
    from megatron_lpreg.loss import LpRegConfig

    out = {}
    for pack in (False, True):
        spec, pc = load_policy(ctx, directory)
        pc.pack_sequences = pack
        batch = random_rollouts(spec.vocab_size, n=10, seed=3)
        cfg = LpRegConfig(rho=0.5, min_selected=1, kl="forward")
        scores = recompute_logprobs(pc, batch, cfg)
        batch.set(old_logprobs=scores.old_logprobs, proxy_logprobs=scores.proxy_logprobs)
        # One micro-batch for the whole mini-batch, so both layouts aggregate the same tokens.
        pc.micro_batch_tokens = 4096
        opt = CaptureGrads(pc.model)
        result = train(pc, copy.copy(batch), cfg, opt, num_minibatches=1, epochs=1)
        out[pack] = scores, opt.grads[0], result.metrics.reduce(None)
    out["shared_rows"] = [max(len(row) for row in mb) for mb in token_budget_packs(batch.lengths, 64)]
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_rows_give_the_padded_numbers(tmp_path, tp):
    directory = save_tiny_model("qwen2", tmp_path / "qwen2")
    for out in run_distributed(_exactness, world_size=tp, tp_size=tp, args=(str(directory),)):
        (plain, grads_plain, m_plain), (packed, grads_packed, m_packed) = out[False], out[True]
        assert max(out["shared_rows"]) > 1  # the scoring pass really put sequences side by side
        for name in ("old_logprobs", "entropy", "proxy_logprobs", "kept_mass"):
            a, b = getattr(plain, name), getattr(packed, name)
            assert torch.equal(torch.isinf(a), torch.isinf(b)), name
            torch.testing.assert_close(a[a.isfinite()], b[b.isfinite()], rtol=1e-5, atol=1e-5)
        assert m_plain["lpreg/selected"] > 0 and m_plain["lpreg/selected"] == m_packed["lpreg/selected"]
        assert m_plain["loss/policy"] == pytest.approx(m_packed["loss/policy"], rel=1e-5, abs=1e-6)
        for n in grads_plain:
            torch.testing.assert_close(grads_plain[n], grads_packed[n], rtol=1e-4, atol=1e-6)


def test_thd_segments_are_the_block_mask_segments():
    """Transformer Engine's THD path (not run: TE needs CUDA) gets what the block mask encodes: the
    rows end to end as one batch, a segment per sequence and per row's trailing padding."""
    g = torch.Generator().manual_seed(0)
    lens = [(3, 4), (2, 1), (4, 6), (1, 2)]  # sequence lengths 7, 3, 10, 3
    seqs = [torch.randint(1, 50, (p + r,), generator=g).tolist() for p, r in lens]
    batch = RolloutBatch.from_sequences(seqs, [p for p, _ in lens], torch.zeros(4))
    mb = microbatch(batch, [2, 0, 1, 3], pad_id=0)
    rows = [[2], [0, 1], [3]]
    masked, thd = pack_rows(mb, rows, pad_id=0), pack_rows(mb, rows, pad_id=0, thd=True)
    assert thd.attention_mask is None
    for name in ("tokens", "targets", "index", "valid"):
        assert torch.equal(getattr(thd, name), getattr(masked, name)), name
    # Rows of 10: [10] | [7, 3] | [3, pad 7].
    assert thd.cu_seqlens.dtype == torch.int32 and thd.cu_seqlens.tolist() == [0, 10, 17, 20, 23, 30]
    assert thd.max_seqlen == 10
    # The segments rebuild the block-diagonal causal mask exactly.
    flat = torch.zeros(30, dtype=torch.long)
    for k, (a, b) in enumerate(zip(thd.cu_seqlens[:-1].tolist(), thd.cu_seqlens[1:].tolist())):
        flat[a:b] = k
    seg = flat.view(3, 10)
    rebuilt = (seg.unsqueeze(2) != seg.unsqueeze(1)) | torch.ones(10, 10, dtype=torch.bool).triu(1)
    assert torch.equal(rebuilt.unsqueeze(1), masked.attention_mask)
    params = thd_params(thd)
    assert params.qkv_format == "thd" and params.max_seqlen_q == params.max_seqlen_kv == 10
    assert params.cu_seqlens_q is thd.cu_seqlens and params.cu_seqlens_kv is thd.cu_seqlens


def test_model_logits_takes_thd_as_one_unmasked_row():
    from megatron_lpreg.model import model_logits

    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"one \[1, T\] THD batch"):
        model_logits(None, ids, packed_seq_params=object())
    with pytest.raises(ValueError, match=r"one \[1, T\] THD batch"):
        model_logits(None, ids[:1], torch.zeros(1, 1, 5, 5, dtype=torch.bool), packed_seq_params=object())
