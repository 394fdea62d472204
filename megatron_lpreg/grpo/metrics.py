"""Step metrics: accumulate over micro-batches, then combine over data-parallel ranks.

Counts (``lpreg/selected``, token counts) are summed, extremes keep their extreme, everything else
is a weighted mean (weights: tokens or sequences, as the caller says). Combining over DP gathers
the small per-rank sums as objects, so ranks may have seen different metric keys (a rank whose
micro-batches selected nothing reports no ``lpreg/delta_rho``).
"""

from __future__ import annotations

import collections
import math

import torch.distributed as dist

SUMMED = frozenset({
    "lpreg/selected", "lpreg/candidates", "lpreg/lowest", "loss/tokens", "loss/nonfinite_tokens",
    "kl_cov/selected", "high_entropy/kept",
})
MAXED = frozenset({"pg/ratio_max", "response/length_max", "mismatch/seq_max_abs_diff"})
MINNED = frozenset({"pg/ratio_min"})


class MetricSums:
    def __init__(self):
        self.sums: dict[str, float] = collections.defaultdict(float)
        self.weights: dict[str, float] = collections.defaultdict(float)
        self.extremes: dict[str, float] = {}

    def add(self, metrics: dict[str, float], weight: float = 1.0) -> None:
        for key, value in metrics.items():
            value = float(value)
            if key in SUMMED:
                self.sums[key] += value
            elif key in MAXED:
                self.extremes[key] = max(self.extremes.get(key, -math.inf), value)
            elif key in MINNED:
                self.extremes[key] = min(self.extremes.get(key, math.inf), value)
            elif weight > 0:
                self.sums[key] += value * weight
                self.weights[key] += weight

    def merge(self, other: "MetricSums") -> None:
        for key, value in other.sums.items():
            self.sums[key] += value
        for key, value in other.weights.items():
            self.weights[key] += value
        for key, value in other.extremes.items():
            pick = max if key in MAXED else min
            self.extremes[key] = pick(self.extremes[key], value) if key in self.extremes else value

    def reduce(self, group=None) -> dict[str, float]:
        """The combined metrics over ``group`` (collective when the group has several ranks)."""
        total = self
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            parts = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, (dict(self.sums), dict(self.weights), self.extremes), group=group)
            total = MetricSums()
            for sums, weights, extremes in parts:
                part = MetricSums()
                part.sums.update(sums)
                part.weights.update(weights)
                part.extremes.update(extremes)
                total.merge(part)
        out = {}
        for key, value in total.sums.items():
            if key in SUMMED:
                out[key] = value
            elif total.weights.get(key, 0.0) > 0:
                out[key] = value / total.weights[key]
        out.update(total.extremes)
        if "lpreg/selected" in out and out.get("loss/tokens"):
            out["lpreg/selected_share"] = out["lpreg/selected"] / out["loss/tokens"]
        if out.get("lpreg/lowest"):
            out["lpreg/pass_share"] = out["lpreg/selected"] / out["lpreg/lowest"]
        return dict(sorted(out.items()))
