"""Rollout/training mismatch: metrics by hand and against a float64 loop, the DP max, masking."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.policy.batching import RolloutBatch, microbatch
from megatron_lpreg.policy.metric_sums import MetricSums
from megatron_lpreg.grpo.mismatch import mismatch_metrics, sequence_abs_diffs, trainable_sequences
from tests.distributed import run_distributed


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


def test_metrics_by_hand():
    engine = [_t([0.0, -1.0]), _t([-2.0]), _t([])]
    train = [_t([0.5, -1.0]), _t([-1.0]), _t([])]  # |d| = [0.5, 0], [1], []
    metrics, tokens = mismatch_metrics(engine, train)
    assert tokens == 3
    assert metrics["mismatch/logprob_abs_diff"] == pytest.approx(0.5)
    # NeMo-RL's token_mult_prob_error: token mean of exp(|d|); 1.0 for identical log-probs.
    assert metrics["mismatch/token_mult_prob_error"] == pytest.approx((math.exp(0.5) + 1 + math.e) / 3)
    assert metrics["mismatch/seq_max_abs_diff"] == pytest.approx(1.0)  # sequence means 0.25, 1.0
    assert sequence_abs_diffs(engine, train) == pytest.approx([0.25, 1.0, 0.0])
    same, _ = mismatch_metrics(train, train)
    assert same == {"mismatch/logprob_abs_diff": 0.0, "mismatch/token_mult_prob_error": 1.0,
                    "mismatch/seq_max_abs_diff": 0.0}
    assert mismatch_metrics([_t([])], [_t([])]) == ({}, 0)
    with pytest.raises(ValueError, match="sequence 0"):
        mismatch_metrics([_t([1.0])], [_t([1.0, 2.0])])


def test_metrics_against_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 0, 17, 3, 9]
    train = [-3 * torch.rand(n, generator=g) for n in lengths]
    engine = [t + 0.3 * torch.randn(t.shape, generator=g) for t in train]
    metrics, tokens = mismatch_metrics(engine, train)
    diffs = [[abs(float(a) - float(b)) for a, b in zip(t, e)] for t, e in zip(train, engine)]
    flat = [d for seq in diffs for d in seq]
    assert tokens == len(flat) == sum(lengths)
    assert metrics["mismatch/logprob_abs_diff"] == pytest.approx(sum(flat) / len(flat), rel=1e-12)
    assert metrics["mismatch/token_mult_prob_error"] == pytest.approx(
        sum(math.exp(d) for d in flat) / len(flat), rel=1e-12)
    assert metrics["mismatch/seq_max_abs_diff"] == pytest.approx(max(sum(s) / len(s) for s in diffs if s), rel=1e-12)


def _reduce_body(ctx):
    engine = [_t([0.0, 0.0])] if ctx.rank == 0 else [_t([0.0]), _t([0.0, 0.0, 0.0])]
    train = [_t([0.2, 0.4])] if ctx.rank == 0 else [_t([0.1]), _t([0.0, 0.0, 0.3])]
    sums = MetricSums()
    metrics, tokens = mismatch_metrics(engine, train)
    sums.add(metrics, weight=tokens)
    return sums.reduce(ctx.dp_group)


def test_reduce_over_data_parallel_takes_the_worst_sequence():
    results = run_distributed(_reduce_body, 2, 1)
    assert results[0] == results[1]
    out = results[0]
    # rank 0: sequence mean 0.3 (2 tokens); rank 1: 0.1 and 0.1 (1 + 3 tokens): the max is rank 0's.
    assert out["mismatch/seq_max_abs_diff"] == pytest.approx(0.3)
    assert out["mismatch/logprob_abs_diff"] == pytest.approx((0.6 + 0.1 + 0.3) / 6)
    expected = (math.exp(0.2) + math.exp(0.4) + math.exp(0.1) + 2 + math.exp(0.3)) / 6
    assert out["mismatch/token_mult_prob_error"] == pytest.approx(expected)


def test_masked_sequences_have_no_loss_mask():
    engine = [_t([-1.0, -1.0]), _t([-1.0, -1.0, -1.0]), _t([-2.0])]
    train = [_t([-1.0, -1.1]), _t([-1.0, -1.0, -1.9]), _t([-2.0])]  # means 0.05, 0.3, 0
    keep = trainable_sequences(engine, train, max_abs_diff=0.1)
    assert keep.tolist() == [True, False, True]
    ids = [[5, 6, 7, 8], [5, 9, 10, 11], [5, 12]]
    batch = RolloutBatch.from_sequences(ids, [2, 1, 1], [1.0, -1.0, 0.5], old_logprobs=train,
                                        engine_logprobs=engine, trainable=keep)
    mb = microbatch(batch, [0, 1, 2], pad_id=0)
    assert mb.loss_mask.tolist() == [[False, True, True, False], [False, False, False, False],
                                     [True, False, False, False]]
    # The engine log-probs are laid out like the old ones: response token j at position P - 1 + j.
    assert mb.field("engine_logprobs")[0, 1:3].tolist() == [-1.0, -1.0]
    assert mb.field("engine_logprobs")[1, 0:3].tolist() == [-1.0, -1.0, -1.0]
    assert mb.field("old_logprobs")[1, 2].item() == pytest.approx(-1.9)
    with pytest.raises(ValueError, match="trainable must have shape"):
        RolloutBatch.from_sequences(ids, [2, 1, 1], [0.0] * 3, trainable=[True, True])
    with pytest.raises(ValueError, match="engine_logprobs"):
        RolloutBatch.from_sequences(ids, [2, 1, 1], [0.0] * 3, engine_logprobs=[[0, 0], [0], [0]])


def _trainer_body(ctx, run_dir, policy, data):
    from megatron_lpreg.grpo.trainer import GRPOTrainer
    from megatron_lpreg.policy.passes import train
    from tests.grpo.tiny_run import first_phases, tiny_config

    cfg = tiny_config(run_dir, policy, data, 1, "mismatch.tis_cap=1.2", "validation.files=[]",
                      "checkpoint.every=0", "grpo.mini_batch_prompts=4")
    with GRPOTrainer(cfg) as trainer:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # an engine that drifted from the trainer: a real mismatch to correct
            for p in trainer.engine.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        _, batch, _ = first_phases(trainer)
        old, engine = batch.responses(batch.old_logprobs), batch.responses(batch.engine_logprobs)
        diffs = sequence_abs_diffs(engine, old)
        cfg.mismatch.mask_seq_abs_diff = sorted(diffs)[len(diffs) // 2]  # masks about half
        masked = trainer.mask_mismatched(batch)
        metrics = train(trainer.policy, batch, cfg.loss, trainer.optimizer, num_minibatches=1, epochs=1,
                        tis_cap=cfg.mismatch.tis_cap).metrics.reduce()
        keep = [d <= cfg.mismatch.mask_seq_abs_diff for d in diffs]
        kept = [i for i, k in enumerate(keep) if k]
        weights = torch.cat([torch.exp(old[i].double() - engine[i].double()) for i in kept])
        step_metrics = trainer.train_step()
        return dict(trainable=batch.trainable.tolist(), keep=keep, metrics=metrics, step=step_metrics, masked=masked,
                    kept_tokens=sum(batch.response_lens[i] for i in kept),
                    tis_mean=float(weights.clamp(max=1.2).mean()), tis_capped=float((weights > 1.2).double().mean()))


def test_trainer_masks_sequences_and_weights_tokens(tmp_path, monkeypatch):
    from tests.grpo.tiny_run import make_data, make_policy_dir

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    policy, data = str(make_policy_dir(tmp_path / "policy")), make_data(tmp_path / "data")
    out = run_distributed(_trainer_body, 1, 1, args=(str(tmp_path / "run"), policy, data), timeout_s=300)[0]
    m = out["metrics"]
    assert out["trainable"] == out["keep"] and 0 < sum(out["keep"]) < len(out["keep"])
    assert m["loss/tokens"] == out["kept_tokens"]  # masked sequences' tokens are not trained on
    assert out["masked"] == len(out["keep"]) - sum(out["keep"])
    assert m["mismatch/tis_weight_mean"] == pytest.approx(out["tis_mean"], rel=1e-5)
    assert m["mismatch/tis_capped"] == pytest.approx(out["tis_capped"])
    assert 0 < m["mismatch/tis_capped"] < 1
    step = out["step"]
    assert step["mismatch/logprob_abs_diff"] > 1e-3 and step["mismatch/token_mult_prob_error"] > 1.001
    # The token mean is a length-weighted mean of the sequence means: never above their max.
    assert step["mismatch/seq_max_abs_diff"] >= step["mismatch/logprob_abs_diff"] * (1 - 1e-9)
    assert "mismatch/masked_seqs" in step and "mismatch/tis_weight_mean" in step
