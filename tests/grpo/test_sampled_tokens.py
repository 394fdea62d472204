"""The sampled-token summaries (grpo/sampled_tokens.py) against a float64 count done token by token."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.grpo.sampled_tokens import (
    LOW_DECADES, LOW_P, P_BINS, decade_label, hist_key, low_key, sampled_token_metrics,
)


def _reference(logprobs: list[float], inside: list[bool]):
    """Each token placed in its bins by plain comparisons of p with the bin edges."""
    tokens = len(logprobs)
    hist = [0] * P_BINS
    low = {(flag, d): 0 for flag in (True, False) for d in range(LOW_DECADES)}
    low_count = low_inside = 0
    for lp, flag in zip(logprobs, inside):
        p = math.exp(lp)
        hist[min(int(p * P_BINS), P_BINS - 1)] += 1
        if p < LOW_P:
            low_count += 1
            low_inside += flag
            d = next((d for d in range(LOW_DECADES - 1) if p >= LOW_P / 10 ** (d + 1)), LOW_DECADES - 1)
            low[flag, d] += 1
    out = {hist_key(i): hist[i] / tokens for i in range(P_BINS)}
    out["sampled_p/low_share"] = low_count / tokens
    out.update({low_key(flag, d): n / tokens for (flag, d), n in low.items()})
    return out, {"sampled_p/low_in_support": low_inside / max(low_count, 1)}, low_count


def test_bins_match_a_token_by_token_count():
    g = torch.Generator().manual_seed(0)
    # Probabilities spread over every bin and decade, bin edges and the extremes included.
    p = torch.cat([torch.rand(400, generator=g, dtype=torch.float64),
                   10 ** -(torch.rand(300, generator=g, dtype=torch.float64) * 8),
                   torch.tensor([1.0, 0.95, 0.05, 0.1, 1e-2, 1e-3, 1e-5, 1e-6], dtype=torch.float64)])
    logprobs = torch.cat([p.log(), torch.tensor([-math.inf], dtype=torch.float64)]).float()
    inside = torch.rand(logprobs.numel(), generator=g) < 0.5
    proxy = torch.where(inside, logprobs - 0.1, torch.full_like(logprobs, -math.inf))
    per_token, per_low, low = sampled_token_metrics(logprobs, proxy)
    ref_token, ref_low, ref_count = _reference(logprobs.double().tolist(), inside.tolist())
    assert int(low) == ref_count
    assert {k: float(v) for k, v in per_token.items()} == pytest.approx(ref_token, abs=1e-12)
    assert {k: float(v) for k, v in per_low.items()} == pytest.approx(ref_low, abs=1e-12)
    assert sum(float(per_token[hist_key(i)]) for i in range(P_BINS)) == pytest.approx(1.0)
    low_total = sum(float(per_token[low_key(f, d)]) for f in (True, False) for d in range(LOW_DECADES))
    assert low_total == pytest.approx(float(per_token["sampled_p/low_share"]))


def test_without_the_proxy_only_the_histogram_and_low_share():
    per_token, per_low, low = sampled_token_metrics(torch.log(torch.tensor([0.5, 0.01, 0.99])), None)
    assert set(per_token) == {*(hist_key(i) for i in range(P_BINS)), "sampled_p/low_share"}
    assert per_low == {} and int(low) == 1


def test_decade_labels_name_their_ranges():
    assert [decade_label(d) for d in range(LOW_DECADES)] == [
        "[1e-02,1e-01)", "[1e-03,1e-02)", "[1e-04,1e-03)", "[1e-05,1e-04)", "<1e-05"]
