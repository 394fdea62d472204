"""The GRPO algorithm: the loop (``trainer``), rollout and rewards, advantages, dynamic sampling,
reward shaping, rollout/training mismatch, validation and the step's metrics."""

from megatron_lpreg.grpo.advantages import group_advantages, group_stats

__all__ = ["group_advantages", "group_stats"]
