"""Binary math reward for RLVR (GRPO): last ``\\boxed{}`` of a response vs the ground truth."""

from .extract import last_boxed
from .grader import grade
from .normalize import normalize_answer
from .pool import RewardPool

__all__ = ["RewardPool", "grade", "last_boxed", "normalize_answer"]
