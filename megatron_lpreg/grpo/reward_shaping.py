"""DAPO's length handling: the soft overlong punishment and overlong filtering (both off by default).

Soft overlong punishment (DAPO eq. 13, verl's ``overlong_buffer``): with ``L_max = rollout.max_tokens``
and a buffer of ``B`` tokens, a response of ``L`` tokens (its stop token included, as verl counts it)
gets

    penalty(L) = min(0, -(L - (L_max - B)) / B * factor)

added to its reward: 0 up to ``L_max - B`` tokens, then falling linearly to ``-factor`` at ``L_max``.
It is applied before the group advantages, so it shifts a group's ranking toward shorter answers.

Overlong filtering (``reward.mask_truncated``): a response cut off at ``L_max`` keeps its reward
in its group's statistics but none of its tokens enter the loss, so the policy is not pushed away
from a line of reasoning only because it ran out of room.
"""

from __future__ import annotations

from megatron_lpreg.grpo.rollout import GradedRollout


def overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float) -> float:
    """The soft overlong punishment of one response (<= 0); ``buffer`` 0 is no punishment."""
    if buffer <= 0:
        return 0.0
    expected = max_tokens - buffer
    return min(0.0, -(length - expected) / buffer * factor)


def shape_rewards(graded: GradedRollout, *, max_tokens: int, buffer: int, factor: float) -> None:
    """Add the overlong penalty to ``graded.rewards`` (in place, before advantages and filtering)."""
    graded.rewards = [r + overlong_penalty(len(c.token_ids), max_tokens, buffer, factor)
                      for r, c in zip(graded.rewards, graded.completions)]


def truncated_mask(graded: GradedRollout) -> list[bool]:
    """Per sequence: True if it may enter the loss, False if the engine cut it at ``max_tokens``."""
    return [c.finish_reason != "length" for c in graded.completions]
