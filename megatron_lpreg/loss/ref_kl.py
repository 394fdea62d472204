"""Per-token KL to a frozen reference policy, the estimators verl's ``kl_penalty`` names.

With ``d = l - l_ref`` (log-probs of the sampled token under the policy and the reference):

    k1 = d                                  unbiased for KL(pi || pi_ref) as a value, not as a gradient
    k2 = d^2 / 2                            verl "mse"
    k3 = exp(-d) + d - 1                    verl "low_var_kl" (Schulman's low-variance estimator)

k3 clamps ``-d`` to [-20, 20] before the exponential and the result to [-10, 10], as verl does, so a
token the reference finds impossible cannot blow the loss up. k1 and k2 are unclamped, as in verl.
All tensors are [B, S] response tokens; nothing is sharded.
"""

from __future__ import annotations

import torch

REF_KL_TYPES = ("k1", "k2", "k3")


def ref_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate [B, S]; differentiable w.r.t. ``logprobs`` (``ref_logprobs`` is a constant)."""
    ref_logprobs = ref_logprobs.detach().to(logprobs.dtype)
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kind == "k3":
        log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown reference KL estimator {kind!r}; expected one of {list(REF_KL_TYPES)}")
