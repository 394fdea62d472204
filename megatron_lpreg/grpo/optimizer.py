"""Moved to ``megatron_lpreg.policy.optimizer``; this re-export (for the trainer) goes at the
next merge."""

from megatron_lpreg.policy.optimizer import PolicyOptimizer  # noqa: F401
