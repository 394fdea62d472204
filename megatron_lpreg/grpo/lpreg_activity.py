"""A warning when Lp-Reg has regularised no token for several steps in a row, with the reason.

Lp-Reg examines k = int(rho x |N|) tokens per percentile scope (|N|: the scope's negative-advantage
response tokens; a micro-batch by default) and none at all when k < ``loss.min_selected`` (the
released code's rule), then keeps those inside the proxy's support that the policy gives less than
the proxy does. With small batches or a small rho, k stays below ``min_selected`` and the run is
plain GRPO; ``lpreg/selected`` says so in the metrics, but nothing else would.
"""

from __future__ import annotations

import math

from megatron_lpreg.loss.selection import num_selected

INACTIVE_STEPS = 5  # steps in a row with no regularised token before the warning


class LpRegActivity:
    """Fed each step's metrics; returns the warning once per stretch of ``steps`` inactive steps."""

    def __init__(self, loss_cfg, steps: int = INACTIVE_STEPS):
        self.cfg = loss_cfg
        self.steps = steps
        self.inactive = 0  # steps in a row with lpreg/selected == 0
        self.candidates = 0  # the most negative-advantage tokens of one of those steps
        self.lowest = 0  # tokens examined in all of them
        self.delta_rho = None  # the last examined step's lpreg/delta_rho

    def update(self, metrics: dict) -> str | None:
        if "lpreg/lowest" not in metrics:  # Lp-Reg is off (plain GRPO or another baseline)
            return None
        if metrics["lpreg/selected"]:
            self.inactive, self.candidates, self.lowest = 0, 0, 0
            return None
        self.inactive += 1
        self.candidates = max(self.candidates, int(metrics.get("lpreg/candidates") or 0))
        self.lowest += int(metrics["lpreg/lowest"] or 0)
        if metrics["lpreg/lowest"]:
            self.delta_rho = metrics.get("lpreg/delta_rho")
        if self.inactive != self.steps:
            return None
        return f"Lp-Reg regularised no token in the last {self.steps} steps: {self.reason()}"

    def reason(self) -> str:
        c = self.cfg
        candidates, lowest, delta = self.candidates, self.lowest, self.delta_rho
        if candidates == 0:
            return ("no response token had a negative advantage (every group's rewards were equal: all right "
                    "or all wrong)")
        if lowest == 0:
            scope = {"microbatch": "micro-batch", "batch": "mini-batch"}.get(c.percentile_scope, "mini-batch")
            need = math.ceil(c.min_selected / c.rho)  # then exactly, as the selection rounds
            while need > 1 and num_selected(need - 1, c.rho, c.min_selected):
                need -= 1
            while not num_selected(need, c.rho, c.min_selected):
                need += 1
            return (f"k = int(rho x negative-advantage tokens) < loss.min_selected={c.min_selected} in every "
                    f"{scope} (rho={c.rho:g}; at most {candidates} such tokens in a step): a {scope} "
                    f"needs at least {need} of them; raise loss.rho, the prompts or tokens per {scope}"
                    + (" (grpo.micro_batch_tokens), or set loss.percentile_scope=batch"
                       if c.percentile_scope == "microbatch" else "") + " (docs/lp_reg.md)")
        return (f"the {lowest} lowest-probability negative-advantage tokens examined in them were all outside the "
                f"proxy's support (p < kappa x max p, kappa={c.kappa:g}) or not under-weighted by the policy"
                + (f" (their largest probability lpreg/delta_rho={delta:.3g})" if delta is not None else "")
                + "; raise loss.rho to examine more, or lower loss.kappa (docs/lp_reg.md)")
