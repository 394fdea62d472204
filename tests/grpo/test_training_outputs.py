"""What a run leaves behind besides metrics: HF exports, the best checkpoint, sample responses."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_lpreg.metrics_file import read_metrics
from megatron_lpreg.policy.training_checkpoint import best_checkpoint, complete_checkpoints
from tests.distributed import run_distributed
from tests.grpo.tiny_run import tiny_config

TOKENS = [[3, 17, 42, 5, 9, 11, 2, 30]]


def _run(ctx, run_dir, policy, data, overrides):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lpreg.grpo.trainer import GRPOTrainer
    from megatron_lpreg.model.build import model_logits

    cfg = tiny_config(run_dir, policy, data, ctx.tp_size, *overrides)
    with GRPOTrainer(cfg) as trainer:
        trainer.fit()
        trainer.model.eval()
        with torch.no_grad():
            logits = model_logits(trainer.model, torch.tensor(TOKENS))
            if ctx.tp_size > 1:
                logits = gather_from_tensor_model_parallel_region(logits)
        return logits[..., :trainer.spec.vocab_size]


def test_hf_exports_best_checkpoint_and_samples(tmp_path, assets):
    """One TP=2 run checks all three (each alone would cost a run)."""
    from transformers import AutoModelForCausalLM

    policy, data = assets
    overrides = ("grpo.steps=3", "grpo.mini_batch_prompts=4", "validation.every=1", "validation.at_start=false",
                 "checkpoint.every=0", "checkpoint.keep_last=1", "checkpoint.save_best=true",
                 "checkpoint.hf_every=2", "logging.samples_per_step=6")
    ours = run_distributed(_run, world_size=2, tp_size=2, args=(str(tmp_path), policy, data, overrides),
                           timeout_s=400)[0]
    # HF exports at step 2 and at the end; transformers loads them and gives our model's logits.
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["step_000002", "step_000003"]
    final = tmp_path / "hf" / "step_000003"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(TOKENS)).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # The best checkpoint by validation is named and survives keep_last=1.
    rows = read_metrics(tmp_path / "metrics.jsonl")
    best_step = int(rows[-1]["val/best_step"])
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert best["step"] == best_step and best["val/mean"] == rows[-1]["val/best"]
    assert best_checkpoint(tmp_path) == Path(tmp_path) / "checkpoints" / best["path"]
    kept = [s for s, _ in complete_checkpoints(tmp_path)]
    assert kept == sorted({best_step, 3})
    # Sample responses: 6 per step (the first prompt groups) and per validation source, with rewards.
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    train = [r for r in samples if r["kind"] == "train"]
    assert [r["step"] for r in train] == [s for s in (1, 2, 3) for _ in range(6)]
    val = [r for r in samples if r["kind"] == "val"]
    assert {(r["step"], r["data_source"]) for r in val} == {(s, d) for s in (1, 2, 3) for d in ("aime", "arith")}
    for r in samples:
        assert r["prompt"] and r["response"] is not None and r["ground_truth"] and r["reward"] in (0.0, 1.0)
        assert r["response_len"] <= 12 and r["finish_reason"] in ("stop", "length")
    assert any(r["reward"] == 1.0 for r in train)
