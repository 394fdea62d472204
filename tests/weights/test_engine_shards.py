"""The layout arithmetic of the shard-to-shard refit into vLLM (weights/engine_shards.py), against
float64 references built from the full HF tensors: no vLLM needed."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.model.hf_config import padded_vocab_size
from megatron_lpreg.weights import tp_rules
from megatron_lpreg.weights.engine_shards import copy_qkv_split, engine_name, megatron_vocab_rows, vocab_moves


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_reorder_gives_vllms_local_q_k_v(tp, bias):
    heads, groups, d, hidden = 8, 4, 3, 5
    g = torch.Generator().manual_seed(0)
    rest = () if bias else (hidden,)
    q, k, v = (torch.randn((n * d,) + rest, generator=g, dtype=torch.float64) for n in (heads, groups, groups))
    for rank in range(tp):
        shard = tp_rules.shard_qkv(q, k, v, rank, tp, groups)  # Megatron's local rows
        # vLLM's QKVParallelLinear on rank r: its query heads, then its KV heads' k, then v
        expected = torch.cat([t.chunk(tp, dim=0)[rank] for t in (q, k, v)])
        dest = torch.full_like(expected, float("nan"))
        copy_qkv_split(dest, shard, groups // tp, heads // groups * d, d)
        assert torch.equal(dest, expected)


def _vllm_rows(vocab: int, tp: int, pad_to: int = 64) -> list[range]:
    """vLLM's real rows per rank (VocabParallelEmbedding: pad to 64, equal blocks)."""
    per = -(-vocab // pad_to) * pad_to // tp
    return [range(min(r * per, vocab), min((r + 1) * per, vocab)) for r in range(tp)]


@pytest.mark.parametrize("tp,vocab", [(1, 101), (2, 101), (2, 300), (2, 256)])
def test_vocab_moves_fill_every_engine_row_from_megatron_shards(tp, vocab):
    hidden = 3
    full = torch.randn(vocab, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    padded = padded_vocab_size(vocab, tp)
    shards = [tp_rules.shard_vocab(full, r, tp, padded) for r in range(tp)]
    src, dst = megatron_vocab_rows(padded // tp, vocab, tp), _vllm_rows(vocab, tp)
    engine = [torch.full((len(rows) + 5, hidden), float("nan"), dtype=torch.float64) for rows in dst]
    moves = vocab_moves(src, dst)
    for s, d, rows in moves:  # what the exchange carries, rank s's shard rows into rank d's engine rows
        engine[d][rows.start - dst[d].start:rows.stop - dst[d].start] = \
            shards[s][rows.start - src[s].start:rows.stop - src[s].start]
    for d, rows in enumerate(dst):
        assert torch.equal(engine[d][:len(rows)], full[rows.start:rows.stop])
    crossing = [m for m in moves if m[0] != m[1]]
    assert bool(crossing) == (src != dst)
    if (tp, vocab) == (2, 101):  # Megatron: rank 0 holds 0-100 (128 rows); vLLM: 0-63 and 64-100
        assert crossing == [(0, 1, range(64, 101))]


def test_engine_names_fuse_qkv_and_gate_up():
    assert engine_name("model.layers.3.self_attn.k_proj.bias") == ("model.layers.3.self_attn.qkv_proj.bias", 1)
    assert engine_name("model.layers.0.mlp.up_proj.weight") == ("model.layers.0.mlp.gate_up_proj.weight", 1)
    assert engine_name("model.layers.0.self_attn.o_proj.weight") == ("model.layers.0.self_attn.o_proj.weight", 0)
    assert engine_name("lm_head.weight") == ("lm_head.weight", 0)
