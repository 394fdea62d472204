"""A tiny policy (random Qwen2 over the tiny test tokenizer), prompt files and a run config."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_lpreg.config import load_config
from megatron_lpreg.data import write_arithmetic_dataset
from tests.data.tiny_tokenizer import build_tiny_tokenizer
from tests.grpo.rewards import parity_reward  # noqa: F401 - run configs name it here too


def make_policy_dir(directory, **shape) -> Path:
    """A tiny random Qwen2 policy with the tiny tokenizer; ``shape`` overrides config fields."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    tok = build_tiny_tokenizer()
    fields = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, rms_norm_eps=1e-6, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model("qwen2", architectures=["Qwen2ForCausalLM"], **{**fields, **shape})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # logits of O(1) spread, so the policy is far from uniform
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def make_data(directory) -> dict[str, str]:
    directory = Path(directory)
    return {
        "train": write_arithmetic_dataset(directory / "train.jsonl", 24, seed=0),
        "val_aime": write_arithmetic_dataset(directory / "val_aime.jsonl", 2, seed=1, data_source="aime"),
        "val_arith": write_arithmetic_dataset(directory / "val_arith.jsonl", 2, seed=2),
    }


def tiny_config(run_dir, policy_dir, data: dict, tp: int, *overrides: str):
    return load_config(None, [
        f"run_dir={run_dir}", f"model.path={policy_dir}", "model.dtype=float32", f"parallel.tp={tp}",
        f"data.train_files=[{data['train']}]", "data.template=chat",
        f"validation.files=[{data['val_aime']}, {data['val_arith']}]", "validation.every=2",
        "validation.samples={aime: 2}", "validation.max_tokens=6",
        "rollout.n=4", "rollout.max_tokens=12", "reward.function=tests.grpo.rewards:parity_reward",
        "reward.num_workers=2",
        "grpo.steps=3", "grpo.prompts_per_step=4", "grpo.mini_batch_prompts=2", "grpo.micro_batch_tokens=256",
        "optim.lr=1e-3", "loss.rho=0.2", "checkpoint.every=2", "logging.wandb_mode=offline",
        "logging.console=false", *overrides,
    ])


def first_phases(trainer, step: int = 1):
    """What ``train_step`` does up to its updates: (graded rollout, batch with log-probs, scores)."""
    from megatron_lpreg.grpo.advantages import group_advantages
    from megatron_lpreg.grpo.rollout import to_batch
    from megatron_lpreg.policy.passes import recompute_logprobs

    rollout, _ = trainer.generate(step)
    advantages = group_advantages(torch.tensor(rollout.rewards), rollout.n)
    batch = to_batch(rollout, advantages, None, trainer.ctx.device)
    scores = recompute_logprobs(trainer.policy, batch, trainer.cfg.loss)
    batch.set(old_logprobs=scores.old_logprobs, proxy_logprobs=scores.proxy_logprobs,
              ref_logprobs=scores.ref_logprobs)
    return rollout, batch, scores
