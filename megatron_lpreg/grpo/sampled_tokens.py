"""What the paper's Figure 1 (c, d) is drawn from, as fixed-bin summaries logged every step.

For each sampled response token, p = pi_old(token) as the trainer recomputes it:

- ``sampled_p/hist_00`` .. ``hist_19``: the share of sampled tokens with p in [i/20, (i+1)/20)
  (the last bin holds p = 1). Early against late steps, this is Fig. 1c: under entropy collapse
  the mass moves to the last bins.
- ``sampled_p/low_share``: the share with p < ``LOW_P``, the low-probability tokens.
- ``sampled_p/low_in_support``: of those, the share inside the min-p proxy's support
  (p >= loss.kappa * max p, the tokens Lp-Reg would keep: "sparks"); the rest are "noise".
- ``sampled_p/low_in_NN`` / ``low_out_NN``: the low-probability tokens by decade of p
  (00: [1e-2, 1e-1), 01: [1e-3, 1e-2), ..., 04: [0, 1e-5)), inside and outside the support,
  as shares of all sampled tokens (Fig. 1d).

Fixed bins make the histograms additive: any run, any model, any window of steps averages them.
Support membership is whether the proxy log-prob is finite, so it needs the proxy (the trainer
computes it for every method when ``logging.sampled_token_metrics`` is on).
"""

from __future__ import annotations

import math

import torch

P_BINS = 20
LOW_P = 0.1
LOW_DECADES = 5


def hist_key(i: int) -> str:
    return f"sampled_p/hist_{i:02d}"


def low_key(inside: bool, decade: int) -> str:
    return f"sampled_p/low_{'in' if inside else 'out'}_{decade:02d}"


def decade_label(decade: int) -> str:
    """The p range of a low-probability decade bin, for figure axes."""
    hi = LOW_P / 10 ** decade
    return f"<{hi:.0e}" if decade == LOW_DECADES - 1 else f"[{hi / 10:.0e},{hi:.0e})"


def sampled_token_metrics(logprobs: torch.Tensor, proxy_logprobs: torch.Tensor | None):
    """(metrics over all sampled tokens, metrics over the low-probability ones, their count); values
    are 0-d tensors on the device. ``logprobs``: flat [R] pi_old of the sampled tokens;
    ``proxy_logprobs``: the min-p proxy's log-probs (-inf outside its support), or None."""
    tokens = logprobs.numel()
    logprobs = logprobs.detach().double()
    p = logprobs.exp()
    bins = (p * P_BINS).long().clamp(max=P_BINS - 1)
    hist = torch.bincount(bins, minlength=P_BINS).double() / tokens
    per_token = {hist_key(i): hist[i] for i in range(P_BINS)}
    low = p < LOW_P
    low_count = low.sum()
    per_token["sampled_p/low_share"] = low_count.double() / tokens
    per_low = {}
    if proxy_logprobs is not None:
        inside = torch.isfinite(proxy_logprobs)
        # -log10 p in (d + 1, d + 2] is decade d: p in [1e-2, 1e-1) -> 0. Clamped so that a -inf
        # log-prob lands in the last bin instead of overflowing the integer cast.
        neg_log10 = (-logprobs / math.log(10)).clamp(max=100.0)
        decade = (torch.ceil(neg_log10) - (1 - math.log10(LOW_P))).long().clamp(0, LOW_DECADES - 1)
        for flag in (True, False):
            chosen = decade[low & (inside if flag else ~inside)]
            counts = torch.bincount(chosen, minlength=LOW_DECADES).double() / tokens
            per_token.update({low_key(flag, d): counts[d] for d in range(LOW_DECADES)})
        per_low["sampled_p/low_in_support"] = (low & inside).sum().double() / low_count.clamp(min=1)
    return per_token, per_low, low_count
