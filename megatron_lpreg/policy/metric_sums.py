"""Step metrics: accumulate over micro-batches, then combine over data-parallel ranks.

Counts (``lpreg/selected``, token counts) are summed, extremes keep their extreme, everything else
is a weighted mean (weights: tokens or sequences, as the caller says). Combining over DP gathers
the small per-rank sums as objects, so ranks may have seen different metric keys (a rank whose
micro-batches selected nothing reports no ``lpreg/delta_rho``).
"""

from __future__ import annotations

import collections

import torch

from megatron_lpreg.loss.policy_loss import OPTIONAL_METRICS
from megatron_lpreg.parallel import all_gather_object, group_or_none

SUMMED = frozenset({
    "lpreg/selected", "lpreg/candidates", "lpreg/lowest", "loss/tokens", "loss/nonfinite_tokens",
    "kl_cov/selected", "high_entropy/kept", "perf/tokens",
})
MAXED = frozenset({"pg/ratio_max", "response/length_max", "mismatch/seq_max_abs_diff"})
MINNED = frozenset({"pg/ratio_min"})
# Ratios of summed counts: a micro-batch's own value is not averaged, ``reduce`` derives them.
DERIVED = frozenset({"lpreg/selected_share", "lpreg/pass_share"})


def _as_value(v):
    """Floats stay floats; tensors become float64 0-d tensors (on their device: no host sync)."""
    return v.detach().to(torch.float64).reshape(()) if isinstance(v, torch.Tensor) else float(v)


class MetricSums:
    """Values and weights may be floats or 0-d device tensors; ``reduce`` syncs with the host once."""

    def __init__(self):
        self.sums: dict = collections.defaultdict(float)
        self.weights: dict = collections.defaultdict(float)
        self.extremes: dict = {}

    def add(self, metrics: dict, weight=1.0) -> None:
        weight = _as_value(weight)
        for key, value in metrics.items():
            if key in DERIVED:
                continue
            value = _as_value(value)
            if key in SUMMED:
                self.sums[key] = self.sums[key] + value
            elif key in MAXED or key in MINNED:
                self._extreme(key, value)
            elif isinstance(weight, torch.Tensor) or isinstance(value, torch.Tensor):
                device = (value if isinstance(value, torch.Tensor) else weight).device
                w, v = (torch.as_tensor(x, dtype=torch.float64, device=device) for x in (weight, value))
                if key in OPTIONAL_METRICS:  # NaN: this micro-batch has none (the float path omits the key)
                    w = torch.where(torch.isnan(v), torch.zeros_like(w), w)
                # A zero weight must not let a NaN value in (a micro-batch with no tokens).
                self.sums[key] = self.sums[key] + torch.where(w > 0, v * w, torch.zeros_like(w))
                self.weights[key] = self.weights[key] + w
            elif weight > 0:
                self.sums[key] = self.sums[key] + value * weight
                self.weights[key] = self.weights[key] + weight

    def _extreme(self, key: str, value) -> None:
        old = self.extremes.get(key)
        if old is None:
            self.extremes[key] = value
        elif isinstance(old, torch.Tensor) or isinstance(value, torch.Tensor):
            pick = torch.maximum if key in MAXED else torch.minimum
            device = (value if isinstance(value, torch.Tensor) else old).device
            self.extremes[key] = pick(*(torch.as_tensor(x, dtype=torch.float64, device=device) for x in (old, value)))
        else:
            self.extremes[key] = max(old, value) if key in MAXED else min(old, value)

    def merge(self, other: "MetricSums") -> None:
        for key, value in other.sums.items():
            self.sums[key] = self.sums[key] + value
        for key, value in other.weights.items():
            self.weights[key] = self.weights[key] + value
        for key, value in other.extremes.items():
            self._extreme(key, value)

    def host(self) -> "MetricSums":
        """A copy with every value a float: one device-to-host transfer for all of them."""
        out = MetricSums()
        parts = [self.sums, self.weights, self.extremes]
        keys = [(i, k) for i, part in enumerate(parts) for k in part]
        values = torch.stack([torch.as_tensor(parts[i][k], dtype=torch.float64).cpu() for i, k in keys]).tolist() \
            if keys else []
        targets = [out.sums, out.weights, out.extremes]
        for (i, k), v in zip(keys, values):
            targets[i][k] = v
        return out

    def reduce(self, group=None) -> dict[str, float]:
        """The combined metrics over ``group`` (collective when the group has several ranks)."""
        total = self.host()
        group = group_or_none(group)
        if group is not None:
            parts = all_gather_object((dict(total.sums), dict(total.weights), total.extremes), group)
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
