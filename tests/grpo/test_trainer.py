"""End-to-end GRPO + Lp-Reg runs of a tiny policy on 2 gloo ranks (TP=2, and DP=2), and resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_lpreg.grpo.sampled_tokens import LOW_DECADES, P_BINS, hist_key, low_key
from megatron_lpreg.policy.training_checkpoint import complete_checkpoints
from megatron_lpreg.metrics_file import read_metrics, run_metrics
from tests.distributed import run_distributed
from tests.grpo.tiny_run import tiny_config
from tests.host_tracing import HostTensorTracer, is_host




def _train(ctx, run_dir, policy, data, overrides):
    from megatron_lpreg.grpo.trainer import GRPOTrainer
    from megatron_lpreg.parallel import device_groups_on_cpu

    cfg = tiny_config(run_dir, policy, data, ctx.tp_size, *overrides)
    # Strict device mode: every group acts as an NCCL group, and any tensor a GPU run would hold on
    # the host (tests/host_tracing.py) fails the collective it reaches.
    with HostTensorTracer(), device_groups_on_cpu(is_host), GRPOTrainer(cfg) as trainer:
        initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.fit()
        changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, initial[n])]
        return {"changed": changed, "params": len(initial), "step": trainer.step}


# tp2 refits through shared memory (the CPU default) and trains on-policy (one mini-batch: the old
# log-probs come from the training forward); dp2 streams buckets (its fallback), two mini-batches.
@pytest.mark.parametrize("tp,overrides", [(2, ("grpo.mini_batch_prompts=4",)),
                                          (1, ("rollout.refit_shared_memory=false",))], ids=["tp2", "dp2"])
def test_three_steps(tmp_path, assets, tp, overrides):
    policy, data = assets
    results = run_distributed(_train, world_size=2, tp_size=tp, args=(str(tmp_path), policy, data, overrides),
                              timeout_s=300)
    assert [r["step"] for r in results] == [3, 3]
    for r in results:  # every weight of every rank moved (the TP shards and the replicated norms)
        assert len(r["changed"]) == r["params"]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= {"val/aime/avg@2", "val/arith/avg@1", "val/mean"}
    for row in rows[1:]:
        assert all(v is None or math.isfinite(v) for v in row.values() if isinstance(v, float))
        on_policy = tp == 2
        assert row["optim/steps"] == (1 if on_policy else 2) and row["optim/skipped_steps"] == 0
        assert (row["time/logprob"] == 0) == on_policy  # the separate pass runs only off-policy
        assert row["time/train/forward"] > 0 and row["time/train/backward"] > 0 and row["time/train/optimizer"] > 0
        assert row["perf/mfu"] > 0 and row["perf/tokens_per_s"] > 0  # (the peak is measured: no upper bound)
        # Every response token is trained on once per epoch: 4 prompts x 4 responses, <= 12 tokens each.
        assert row["loss/tokens"] == pytest.approx(16 * row["response/length_mean"]) and row["loss/tokens"] <= 192
        assert 0 < row["reward/mean"] < 1
        # The engine's raw log-probs and the trainer's recomputation agree (same weights after refit).
        assert row["mismatch/logprob_abs_diff"] < 1e-4
        assert row["refit/mb"] > 0
        assert 0 < row["lpreg/kept_mass_mean"] <= 1 and row["memory/rise_refit_mb"] >= 0
        # The sampled-token histogram covers every sampled token once, the low ones split in/out of support.
        assert sum(row[hist_key(i)] for i in range(P_BINS)) == pytest.approx(1.0)
        low = sum(row[low_key(flag, d)] for flag in (True, False) for d in range(LOW_DECADES))
        assert low == pytest.approx(row["sampled_p/low_share"])
        assert low == 0 or 0 <= row["sampled_p/low_in_support"] <= 1
    assert sum(r["lpreg/selected"] for r in rows[1:]) > 0
    assert all(r["lpreg/selected"] <= r["lpreg/lowest"] <= r["lpreg/candidates"] for r in rows[1:])
    assert "val/mean" in rows[2] and "val/best" in rows[2]
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 3]


def test_dp2_global_token_mean_and_batch_percentiles(tmp_path, assets):
    """The loss options that reduce over data parallelism (token counts, percentile pools) in whole
    trainer runs: off-policy (two mini-batches), so the batch scope ranks pi_old's log-probs."""
    policy, data = assets
    overrides = ("loss.loss_agg=global_token_mean", "loss.percentile_scope=batch", "loss.rho=0.2",
                 "grpo.steps=2", "validation.files=[]", "checkpoint.every=0", "checkpoint.save_at_end=false")
    results = run_distributed(_train, world_size=2, tp_size=1, args=(str(tmp_path), policy, data, overrides),
                              timeout_s=300)
    assert [r["step"] for r in results] == [2, 2] and all(len(r["changed"]) == r["params"] for r in results)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert all(v is None or math.isfinite(v) for v in row.values() if isinstance(v, float))
        assert row["optim/steps"] == 2 and row["time/logprob"] > 0
    assert sum(r["lpreg/selected"] for r in rows) > 0


# Engine and trainer both compute in bf16 but through different kernels (transformers vs megatron):
# their log-probs differ by rounding, ~1e-2. The README's mismatch section documents this bound.
BF16_LOGPROB_ABS_DIFF = 5e-2


def test_bf16_three_steps_tp2(tmp_path, assets):
    """bf16 end to end at TP=2: bf16 parameters and compute, fp32 main grads and masters."""
    policy, data = assets
    overrides = ("model.dtype=bfloat16", "grpo.mini_batch_prompts=4", "validation.files=[]",
                 "checkpoint.every=0", "checkpoint.save_at_end=false")
    results = run_distributed(_train, world_size=2, tp_size=2, args=(str(tmp_path), policy, data, overrides),
                              timeout_s=300)
    assert [r["step"] for r in results] == [3, 3] and all(r["changed"] for r in results)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert all(v is None or math.isfinite(v) for v in row.values() if isinstance(v, float))
        assert row["optim/skipped_steps"] == 0 and row["loss/tokens"] > 0
        assert 0 < row["mismatch/logprob_abs_diff"] < BF16_LOGPROB_ABS_DIFF
    print("bf16 tp2 mismatch/logprob_abs_diff:", [r["mismatch/logprob_abs_diff"] for r in rows],
          "changed:", [len(r["changed"]) for r in results], "of", results[0]["params"])


def _resume(ctx, root, policy, data):
    from megatron_lpreg.grpo.trainer import GRPOTrainer

    cfg = lambda name: tiny_config(Path(root) / name, policy, data, ctx.tp_size)  # noqa: E731
    with GRPOTrainer(cfg("whole")) as trainer:
        trainer.fit()
        whole = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with GRPOTrainer(cfg("split")) as trainer:
        trainer.fit(max_steps=2)  # "crash" after the step-2 checkpoint
    with GRPOTrainer(cfg("split")) as trainer:
        assert trainer.resumed_from is not None and trainer.step == 2
        trainer.fit()
        return max((p - whole[n]).abs().max().item() for n, p in trainer.model.named_parameters())


def test_resume_continues_identically(tmp_path, assets):
    policy, data = assets
    diffs = run_distributed(_resume, world_size=2, tp_size=2, args=(str(tmp_path), policy, data), timeout_s=400)
    assert max(diffs) == 0.0
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in split] == [0, 1, 2, 3]

    for a, b in zip(whole, split):
        assert run_metrics(a) == run_metrics(b)


def _sliced_rollout(ctx, run_dir, policy, data):
    from megatron_lpreg.grpo.trainer import GRPOTrainer
    from tests.grpo.tiny_run import first_phases

    with GRPOTrainer(tiny_config(run_dir, policy, data, ctx.tp_size, "grpo.steps=1")) as trainer:
        views = trainer.refitter.shared.views
        # One copy of the weights for the group: this rank's engine computes with the shared views.
        one_copy = all(p.data_ptr() == views[n].data_ptr() for n, p in trainer.engine.model.named_parameters())
        calls = []
        generate = trainer.engine.generate
        trainer.engine.generate = lambda prompts, sampling: calls.append(len(prompts)) or generate(prompts, sampling)
        rollout, batch, scores = first_phases(trainer)
        trainer.state.sampler.load_state_dict({"epoch": 0, "position": 0})
        again, _ = trainer.generate(1)
        gap = max((a - b).abs().max() for a, b in zip(batch.responses(batch.engine_logprobs),
                                                       batch.responses(scores.old_logprobs)))
        return {"sliced": trainer.layout.name == "sliced", "one_copy": one_copy, "calls": calls,
                "tokens": [c.token_ids for c in rollout.completions],
                "again": [c.token_ids for c in again.completions], "gap": float(gap)}


def test_tp2_every_rank_generates_its_slice(tmp_path, assets):
    """The transformers engine at TP=2: each rank samples half of the replica's prompts on the shared
    weights, both ranks end with the same whole rollout, the samples repeat, the log-probs match."""
    policy, data = assets
    results = run_distributed(_sliced_rollout, world_size=2, tp_size=2, args=(str(tmp_path), policy, data),
                              timeout_s=300)
    for r in results:
        assert r["sliced"] and r["one_copy"]
        assert r["calls"] == [2, 2]  # 4 prompts per step: 2 each, twice
        assert r["tokens"] == r["again"] and len(r["tokens"]) == 16
        assert r["gap"] < 1e-5
    assert results[0]["tokens"] == results[1]["tokens"]
