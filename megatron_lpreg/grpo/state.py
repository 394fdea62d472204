"""Moved to ``megatron_lpreg.policy.training_checkpoint``; this re-export (for the trainer and
preflight) goes at the next merge."""

from megatron_lpreg.policy.training_checkpoint import (  # noqa: F401
    STATE_FILE,
    complete_checkpoints,
    load_training_checkpoint,
    prune_checkpoints,
    save_training_checkpoint,
    step_dir,
)
