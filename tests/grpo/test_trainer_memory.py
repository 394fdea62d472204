"""The trainer logs each phase's peak memory, and a refit's rise stays under model size + a few buckets.

TP=2 on 2 gloo ranks, one step of a 4-layer policy (~16 MB of float32 weights) with 1 MB refit
buckets, through the bucketed stream and through shared memory. Streamed, the engine sleeps at level
2 between rollout and refit (weights freed), so the refit re-allocates them: its rise is the model
plus what the stream holds at once; a refit that gathered the whole model before writing would rise
by a second model's worth, which is what the bound is there to catch.
"""

from __future__ import annotations

import sys

import pytest

from megatron_lpreg.metrics_file import read_metrics
from tests.distributed import run_distributed
from tests.grpo.tiny_run import make_data, make_policy_dir, tiny_config

MB = 1024 ** 2
PHASES = ("rollout", "logprob", "train", "refit")


def _one_step(ctx, run_dir, policy, data, shared):
    from megatron_lpreg.grpo.trainer import GRPOTrainer
    from megatron_lpreg.memory import parameter_bytes

    cfg = tiny_config(run_dir, policy, data, ctx.tp_size, "grpo.steps=1", "validation.at_start=false",
                      "validation.every=0", "checkpoint.save_at_end=false", "checkpoint.every=0",
                      "rollout.refit_bucket_mb=1", "rollout.max_tokens=8",
                      f"rollout.refit_shared_memory={str(shared).lower()}")
    with GRPOTrainer(cfg) as trainer:
        trainer.fit()
        return {"enabled": trainer.memory.enabled, "shard_bytes": parameter_bytes(trainer.model),
                "engine_bytes": parameter_bytes(trainer.engine.model) if trainer.engine else 0}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peaks need Linux /proc")
@pytest.mark.parametrize("shared", [False, True], ids=["streamed", "shared_memory"])
def test_phase_peaks_logged_and_refit_bounded_by_model_plus_bucket(tmp_path, monkeypatch, shared):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Every large tensor its own mapping: a freed one leaves the resident set at once (see memory.py).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    policy = str(make_policy_dir(tmp_path / "policy", hidden_size=256, intermediate_size=1024,
                                 num_hidden_layers=4))
    data = make_data(tmp_path / "data")
    results = run_distributed(_one_step, world_size=2, tp_size=2,
                              args=(str(tmp_path / "run"), policy, data, shared), timeout_s=300)
    if not results[0]["enabled"]:
        pytest.skip("/proc/self/clear_refs cannot reset VmHWM here")
    (row,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] == 1]
    model_bytes = results[0]["engine_bytes"]
    assert model_bytes > 15 * MB
    assert row["memory/model_mb"] == pytest.approx(results[0]["shard_bytes"] / MB)
    assert results[0]["shard_bytes"] == results[1]["shard_bytes"]
    for phase in PHASES:
        peak, rise = row[f"memory/peak_{phase}_mb"], row[f"memory/rise_{phase}_mb"]
        # The peak holds the process (torch, the model); the rise is the phase's own.
        assert 0 <= rise < peak and peak > row["memory/model_mb"], (phase, peak, rise)
    rise = row["memory/rise_refit_mb"] * MB
    if shared:  # each rank writes its shards into the engine's weights: nothing to allocate
        assert rise < 1 * MB, rise / MB
    else:
        # The engine slept at level 2 through training (its weights freed), so the refit allocates
        # them again: the rise is the model, plus what the stream holds at once (a bucket merged on
        # the receiver, its receive buffer). A refit that gathered the whole model before writing
        # would add a second model's worth.
        assert rise >= model_bytes, (rise / MB, model_bytes / MB)
        assert rise < 1.5 * model_bytes, (rise / MB, model_bytes / MB)
    print({k: round(v, 1) for k, v in row.items() if k.startswith("memory/")}, model_bytes / MB)
