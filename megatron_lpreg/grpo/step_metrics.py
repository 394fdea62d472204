"""A step's metrics: what the rollout produced, what the loss saw, what the optimiser did.

Per-token quantities are summed on the device; everything meets the host in one ``reduce`` per step
(``MetricSums``), which also combines the data-parallel ranks.
"""

from __future__ import annotations

import torch

from megatron_lpreg.grpo.advantages import group_stats
from megatron_lpreg.grpo.mismatch import mismatch_metrics
from megatron_lpreg.grpo.reward_shaping import overlong_penalty
from megatron_lpreg.grpo.rollout import GradedRollout
from megatron_lpreg.grpo.sampled_tokens import sampled_token_metrics
from megatron_lpreg.policy.batching import RolloutBatch
from megatron_lpreg.policy.metric_sums import MetricSums
from megatron_lpreg.policy.passes import Scores


def rollout_metrics(graded: GradedRollout, batch: RolloutBatch, scores: Scores, truncated: float,
                    reward_cfg, max_tokens: int, sampled_tokens: bool = False) -> MetricSums:
    """Rewards, response lengths, entropy, Lp-Reg's kept mass and the engine/trainer mismatch;
    ``sampled_tokens``: the sampled-token probability summaries (grpo.sampled_tokens) too."""
    sums = MetricSums()
    stats = group_stats(torch.tensor(graded.rewards), graded.n)
    groups = stats["num_groups"]
    sums.add({"reward/mean": stats["reward_mean"]}, weight=len(graded.rewards))
    sums.add({"reward/all_correct_groups": stats["frac_all_correct"],
              "reward/all_wrong_groups": stats["frac_all_wrong"]}, weight=groups)
    sums.add({"data/prompt_truncated": truncated / max(groups, 1)}, weight=groups)
    for comp, status in zip(graded.completions, graded.statuses):
        length = len(comp.token_ids)
        if reward_cfg.overlong_buffer:
            penalty = overlong_penalty(length, max_tokens, reward_cfg.overlong_buffer, reward_cfg.overlong_penalty)
            sums.add({"reward/overlong_penalty": penalty, "reward/overlong_penalized": float(penalty < 0)})
        if reward_cfg.mask_truncated:
            sums.add({"response/loss_masked": float(comp.finish_reason == "length")})
        sums.add({
            "response/length_mean": length,
            "response/length_max": length,
            "response/truncated": float(comp.finish_reason == "length"),
            "reward/graded_ok": float(status == "ok"),
            "reward/timeouts": float(status == "timeout"),
        })
    tokens = batch.response_tokens
    if tokens:
        sums.add({"entropy/mean": scores.entropy.sum() / tokens}, weight=tokens)
        if scores.kept_mass is not None:  # Lp-Reg: M of the proxy under pi_old
            sums.add({"lpreg/kept_mass_mean": scores.kept_mass.sum() / tokens}, weight=tokens)
        if sampled_tokens:
            proxy = scores.proxy_logprobs if scores.kept_mass is not None else None
            per_token, per_low, low = sampled_token_metrics(scores.old_logprobs, proxy)
            sums.add(per_token, weight=tokens)
            sums.add(per_low, weight=low)
    # The engine's own log-probs against the trainer's recomputation: the rollout/train gap.
    mismatch, tokens = mismatch_metrics(batch.responses(batch.engine_logprobs), batch.responses(scores.old_logprobs))
    sums.add(mismatch, weight=tokens)
    return sums


def optimizer_metrics(results) -> dict[str, float]:
    """The last optimiser step's norm and learning rate, and how many steps were skipped."""
    return {
        "optim/grad_norm": results[-1].grad_norm,
        "optim/lr": results[-1].lr,
        "optim/skipped_steps": float(sum(not r.stepped for r in results)),
        "optim/steps": float(len(results)),
    }
