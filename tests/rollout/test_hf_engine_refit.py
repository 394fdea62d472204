"""Refit from TP=2 Megatron shards into the transformers engine: the engine then scores sequences
exactly as our Megatron forward does, before and after the Megatron weights change."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.model.tiny_models import FAMILIES, save_tiny_model

SEQUENCES = [[3, 17, 42, 5, 99, 100, 7], [1, 2], [64, 8, 8, 8, 30]]
BUCKET = 4096  # bytes: smaller than the embedding (101 x 64 x 4), so it must go in a bucket alone


def _megatron_logprobs(ctx, model, spec, sequences):
    from megatron_lpreg.loss import vocab_parallel_logprobs
    from megatron_lpreg.model import model_logits

    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        logits = model_logits(model, ids)[:, :-1]
        logp = vocab_parallel_logprobs(logits, ids[:, 1:], group=ctx.tp_group, vocab_size=spec.vocab_size)
    return [logp[i, :len(s) - 1] for i, s in enumerate(sequences)]


def _tp_model_and_engine(ctx, directory):
    """This rank's Megatron shards of the HF model in ``directory``, and a weightless HF engine on TP rank 0."""
    from transformers import AutoConfig

    from megatron_lpreg.model import build_gpt_model, parse_hf_config
    from megatron_lpreg.rollout import HFEngine
    from megatron_lpreg.weights import hf_to_megatron_shard
    from megatron_lpreg.weights.hf_files import HFCheckpoint

    spec = parse_hf_config(directory)
    model = build_gpt_model(spec).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shard in hf_to_megatron_shard(spec, HFCheckpoint(directory), ctx.tp_rank, ctx.tp_size):
            params[name].copy_(shard)
    engine = HFEngine.from_config(AutoConfig.from_pretrained(directory)) if ctx.tp_rank == 0 else None
    return spec, model, engine


def _body(ctx, dirs: dict):
    from megatron_lpreg.rollout import EngineStateError, SamplingParams
    from megatron_lpreg.weights.stream import RefitStats, stream_hf_weights

    results = {}
    for family, directory in dirs.items():
        spec, model, engine = _tp_model_and_engine(ctx, directory)
        if engine is not None:
            with pytest.raises(EngineStateError, match="refit first"):
                engine.score(SEQUENCES)
        rounds = []
        for round_ in range(2):
            if round_ == 1:  # a "training step"; replicated parameters must stay equal across ranks
                g = torch.Generator().manual_seed(100)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
                if engine is not None:
                    engine.sleep(level=2)  # weights dropped: the refit must bring all of them back
            stats = RefitStats()
            for bucket in stream_hf_weights(model, spec, tp_group=ctx.tp_group, bucket_bytes=BUCKET,
                                            dst_tp_rank=0, stats=stats):
                if engine is not None:
                    engine.update_weights(bucket)
                else:
                    assert bucket == []
            ours = _megatron_logprobs(ctx, model, spec, SEQUENCES)
            theirs = engine.score(SEQUENCES) if engine is not None else None
            rounds.append((ours, theirs, stats.bytes, stats.buckets, stats.largest_bucket_bytes))
        generated = None
        if engine is not None:
            engine.wake()
            sampling = SamplingParams(n=3, temperature=1.0, max_tokens=6, stop_token_ids=(7,), seed=11)
            first = engine.generate([[3, 17, 42], [5, 6]], sampling)
            again = engine.generate([[3, 17, 42], [5, 6]], sampling)
            rescored = engine.score([[3, 17, 42] + first[0][0].token_ids])[0][2:]
            generated = (first, again, rescored)
        results[family] = (rounds, generated)
    return results if ctx.tp_rank == 0 else None


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refit_models")
    return {f: str(save_tiny_model(f, root / f, seed=i)) for i, f in enumerate(FAMILIES)}


def test_refit_from_tp2_shards_makes_engine_match_megatron(model_dirs):
    results = run_distributed(_body, 2, 2, args=(model_dirs,))[0]
    for family in FAMILIES:
        rounds, (first, again, rescored) = results[family]
        before, after = rounds
        for ours, theirs, nbytes, buckets, largest in rounds:
            for a, b in zip(ours, theirs):
                assert a.shape == b.shape and (a - b).abs().max() < 1e-5, family
            assert buckets > 3 and nbytes > 0
        # The refit really moved new weights: scores changed between the rounds.
        assert max((a - b).abs().max() for a, b in zip(before[0], after[0])) > 1e-3, family
        # Seeded sampling is reproducible; n completions per prompt; raw log-probs = re-scoring.
        assert [[c.token_ids for c in p] for p in first] == [[c.token_ids for c in p] for p in again]
        assert [len(p) for p in first] == [3, 3]
        for prompt in first:
            for c in prompt:
                assert len(c.token_ids) == len(c.logprobs) <= 6
                assert c.finish_reason == ("stop" if c.token_ids[-1] == 7 else "length")
                assert c.finish_reason == "stop" or len(c.token_ids) == 6
        assert torch.allclose(torch.tensor(first[0][0].logprobs), rescored, atol=1e-4), family
