"""Moved to ``megatron_lpreg.policy.optimizer``; this re-export goes at the next merge."""

from megatron_lpreg.policy.optimizer import PolicyOptimizer, StepResult  # noqa: F401
