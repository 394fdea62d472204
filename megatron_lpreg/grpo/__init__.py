"""GRPO rollout utilities: group-relative advantages, token-budget micro-batching and collation."""

from megatron_lpreg.grpo.advantages import group_advantages, group_stats
from megatron_lpreg.grpo.batching import (
    RolloutBatch,
    collate,
    padded_length,
    split_for_data_parallel,
    token_budget_microbatches,
)

__all__ = [
    "RolloutBatch", "collate", "group_advantages", "group_stats", "padded_length",
    "split_for_data_parallel", "token_budget_microbatches",
]
