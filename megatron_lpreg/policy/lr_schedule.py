"""The learning-rate schedule: linear warm-up, then constant, linear or cosine decay to ``min_lr``.

megatron-core's own ``OptimizerParamScheduler`` does the arithmetic (Megatron-LM's and verl's
Megatron backend's semantics): during GRPO step s (1-based) the rate is the scheduler's at
``num_steps = s - 1``, so step 1 runs at ``warmup_init``, step ``warmup_steps + 1`` at the peak
``lr``, and past ``decay_steps`` at ``min_lr``. The unit is the GRPO step, as in verl: every
mini-batch update of a step uses that step's rate, and a skipped (non-finite) update does not
shift the schedule. Its position is checkpointed with the optimiser's counters.
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    lr: float  # the peak, reached after warm-up
    warmup_steps: int = 0
    warmup_init: float = 0.0
    decay_style: str = "constant"
    decay_steps: int = 1  # the step count at which a decay reaches min_lr
    min_lr: float = 0.0

    def __post_init__(self):
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style={self.decay_style!r}: expected one of {list(DECAY_STYLES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={self.warmup_steps}: expected >= 0")
        if not 0.0 <= self.min_lr <= self.lr or not 0.0 <= self.warmup_init <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} and lr_warmup_init={self.warmup_init} must lie in "
                             f"[0, lr={self.lr}]")
        if self.decay_style != "constant" and self.warmup_steps >= self.decay_steps:
            raise ValueError(f"lr_warmup_steps={self.warmup_steps} must be below lr_decay_steps "
                             f"({self.decay_steps}): the decay has no steps left")

    @classmethod
    def from_config(cls, optim, total_steps: int) -> "LRSchedule":
        """From ``OptimConfig``; ``lr_decay_steps: 0`` decays over the run's ``total_steps``."""
        return cls(lr=optim.lr, warmup_steps=optim.lr_warmup_steps, warmup_init=optim.lr_warmup_init,
                   decay_style=optim.lr_decay_style, decay_steps=optim.lr_decay_steps or max(total_steps, 1),
                   min_lr=optim.min_lr)

    def scheduler(self, torch_optimizer, weight_decay: float):
        """megatron-core's scheduler over ``torch_optimizer``'s param groups, set to step 0."""
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        return OptimizerParamScheduler(
            torch_optimizer, init_lr=self.warmup_init if self.warmup_steps else self.lr, max_lr=self.lr,
            min_lr=self.min_lr, lr_warmup_steps=self.warmup_steps,
            # megatron needs warmup < decay steps even where a constant rate never reads them.
            lr_decay_steps=max(self.decay_steps, self.warmup_steps + 1), lr_decay_style=self.decay_style,
            start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=1, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False)
