"""GRPO group-relative advantages.

Rewards are laid out *group-major*: the ``group_size`` responses sampled for prompt ``i`` are rows
``i * G .. (i + 1) * G - 1`` of the reward vector.  The GRPO advantage of response ``j`` in group ``g``
is::

    A = (R - mean_g) / (std_g + eps)        # std_g is the UNBIASED std (torch.std, correction=1)

A group whose rewards are all identical (all correct / all wrong with a binary reward) carries no
learning signal and gets exactly 0 advantage.  ``normalize_std=False`` gives the Dr.GRPO variant
(mean-centering only, ``A = R - mean_g``).

All arithmetic is done in float64 and the result is returned as float32.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "group_stats"]


def _grouped(rewards, group_size: int) -> torch.Tensor:
    """Validate and reshape rewards [N] -> float64 [N // G, G]."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (the unbiased std of a single response is undefined), got {group_size}"
        )
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(
            f"number of rewards ({n}) is not a multiple of group_size ({group_size}); "
            "rewards must be laid out group-major with complete groups"
        )
    r = rewards.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf")
    return r.view(n // group_size, group_size)


def group_advantages(rewards, group_size: int, eps: float = 1e-6, normalize_std: bool = True) -> torch.Tensor:
    """Per-response GRPO advantages, float32 [N] on the device of ``rewards``.

    Args:
        rewards: [N] rewards, group-major (see module docstring).
        group_size: responses per prompt G (>= 2, must divide N).
        eps: added to the group std in the denominator.
        normalize_std: if False, return ``R - mean_g`` (Dr.GRPO); otherwise divide by ``std_g + eps``.

    Groups with identical rewards get exactly 0 (rather than a float round-off residue of ``R - mean``).
    """
    device = rewards.device if isinstance(rewards, torch.Tensor) else torch.device("cpu")
    r = _grouped(rewards, group_size)
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    mean = r.mean(dim=1, keepdim=True)
    adv = r - mean
    if normalize_std:
        std = r.std(dim=1, keepdim=True, correction=1)
        adv = adv / (std + eps)
    constant = (r.amax(dim=1) == r.amin(dim=1)).unsqueeze(1)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.reshape(-1).to(dtype=torch.float32, device=device)


def group_stats(rewards, group_size: int, correct_value: float = 1.0, wrong_value: float = 0.0) -> dict:
    """Diagnostics over the groups of one rollout batch (python floats / ints).

    Keys:
        num_groups, group_size;
        reward_mean: mean reward over all responses;
        frac_all_correct: fraction of groups whose every reward == ``correct_value``;
        frac_all_wrong: fraction of groups whose every reward == ``wrong_value``;
        frac_zero_adv_groups: fraction of groups with identical rewards (0 advantage, no gradient);
            for a binary reward this is frac_all_correct + frac_all_wrong;
        frac_solved_any: fraction of groups with at least one reward == ``correct_value`` (pass@G);
        group_std_mean: mean over groups of the unbiased within-group std.
    With zero groups every fraction/mean is 0.0.
    """
    r = _grouped(rewards, group_size)
    g = r.shape[0]
    if g == 0:
        zero = 0.0
        return {
            "num_groups": 0, "group_size": group_size, "reward_mean": zero, "frac_all_correct": zero,
            "frac_all_wrong": zero, "frac_zero_adv_groups": zero, "frac_solved_any": zero,
            "group_std_mean": zero,
        }
    correct = r == correct_value
    wrong = r == wrong_value
    return {
        "num_groups": g,
        "group_size": group_size,
        "reward_mean": float(r.mean()),
        "frac_all_correct": float(correct.all(dim=1).double().mean()),
        "frac_all_wrong": float(wrong.all(dim=1).double().mean()),
        "frac_zero_adv_groups": float((r.amax(dim=1) == r.amin(dim=1)).double().mean()),
        "frac_solved_any": float(correct.any(dim=1).double().mean()),
        "group_std_mean": float(r.std(dim=1, correction=1).mean()),
    }
