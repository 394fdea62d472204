"""The policy-loss configuration. Defaults are the published Lp-Reg settings (docs/lp_reg.md).

The verl baselines are the same objective with other fields set; ``LpRegConfig.preset(name)``
returns them so a user writes ``preset: gspo`` instead of remembering five numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

_CHOICES = {
    "threshold": ("minp", "fixed"),
    "proxy_source": ("old", "current"),
    "kl": ("k3", "forward", "reverse"),
    "percentile_scope": ("microbatch", "batch", "batch_all_tokens"),
    "ratio_level": ("token", "sequence"),
    "loss_agg": ("token_mean", "seq_mean_token_mean", "global_token_mean"),
    "ref_kl_type": ("k1", "k2", "k3"),
}


@dataclass
class LpRegConfig:
    # Lp-Reg (docs/lp_reg.md sections 1-3).
    enabled: bool = True  # false: plain GRPO (or the baseline a preset selects)
    kappa: float = 0.02  # min-p ratio (minp) or absolute probability floor (fixed)
    threshold: str = "minp"  # proxy filter: p >= kappa * max p (minp) or p >= kappa (fixed)
    proxy_source: str = "old"  # proxy from pi_old (scoring pass) or from pi_theta per training micro-batch
    rho: float = 0.01  # fraction of negative-advantage tokens examined (0.005 for Qwen2.5-32B)
    beta: float = 1.0  # weight of the Lp-Reg term
    kl: str = "k3"  # k3 sampled-token estimator, exact forward KL(proxy || policy), or reverse on K
    kl_clamp: float = 10.0  # k3 estimator clamp, as in the reference code
    percentile_scope: str = "microbatch"  # where the rho percentile is taken (README: the loss options)
    min_selected: int = 2  # reference-code quirk: fewer than this many lowest tokens -> none
    regularize_positive: float = 0.0  # "Pos & Neg" ablation: fraction of positive tokens examined
    # Policy-gradient clip: 1.0 / 9.0 means r in [0, 10].
    eps_low: float = 1.0  # lower clip: r >= 1 - eps_low (selected Lp-Reg tokens are not clipped)
    eps_high: float = 9.0  # upper clip: r <= 1 + eps_high
    clip_ratio_c: float = 0.0  # dual clip (verl): for A < 0 the loss is at most -A * c, c > 1; 0 = off
    # verl baselines, all off by default.
    ratio_level: str = "token"  # "sequence" = GSPO's length-normalised sequence ratio
    entropy_coef: float = 0.0  # entropy bonus: loss -= coef * H
    kl_cov_ratio: float = 0.0  # KL-Cov: fraction of tokens with the largest cov(logp, A) penalised
    kl_cov_coef: float = 1.0  # KL-Cov penalty weight
    high_entropy_fraction: float = 1.0  # 0.2 = train only on the top-20% entropy tokens ("80/20")
    loss_agg: str = "token_mean"  # token_mean over the mini-batch, per-sequence means, or global tokens
    # KL to the initial policy as a loss term (off in the paper): a frozen reference model is built.
    ref_kl_coef: float = 0.0  # weight of the per-token KL to the reference policy; 0 = off, no reference model
    ref_kl_type: str = "k3"  # k1: l - l_ref, k2: (l - l_ref)^2 / 2, k3: verl's low_var_kl (clamped)

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"LpRegConfig.{name}={value!r}: expected one of {list(allowed)}")
        for name in ("rho", "regularize_positive", "kl_cov_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"LpRegConfig.{name}={value!r}: a fraction in [0, 1] is expected")
        if not 0.0 < self.kappa <= 1.0:
            raise ValueError(f"LpRegConfig.kappa={self.kappa!r}: expected 0 < kappa <= 1")
        if not 0.0 < self.high_entropy_fraction <= 1.0:
            raise ValueError(
                f"LpRegConfig.high_entropy_fraction={self.high_entropy_fraction!r}: expected (0, 1]"
            )
        if self.eps_low < 0 or self.eps_high < 0 or self.eps_low > 1:
            raise ValueError(
                f"LpRegConfig: clip bounds eps_low={self.eps_low}, eps_high={self.eps_high} must be "
                "non-negative with eps_low <= 1"
            )
        if self.clip_ratio_c != 0.0 and not self.clip_ratio_c > 1.0:
            raise ValueError(f"LpRegConfig.clip_ratio_c={self.clip_ratio_c!r}: expected > 1 (or 0 = off)")
        if self.min_selected < 1:
            raise ValueError(f"LpRegConfig.min_selected={self.min_selected}: expected >= 1")
        if self.kl_clamp <= 0 or self.beta < 0 or self.entropy_coef < 0 or self.kl_cov_coef < 0:
            raise ValueError("LpRegConfig: kl_clamp must be > 0; beta, entropy_coef, kl_cov_coef >= 0")
        if self.ref_kl_coef < 0:
            raise ValueError(f"LpRegConfig.ref_kl_coef={self.ref_kl_coef!r}: expected >= 0")

    @classmethod
    def preset(cls, name: str, **overrides) -> "LpRegConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown loss preset {name!r}; known: {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"LpRegConfig has no field(s) {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    "lp_reg": {},
    # Plain GRPO with PPO's symmetric clip, and DAPO's clip-higher.
    "grpo": {"enabled": False, "eps_low": 0.2, "eps_high": 0.2},
    "clip_higher": {"enabled": False, "eps_low": 0.2, "eps_high": 0.28},
    "entropy_bonus": {"enabled": False, "eps_low": 0.2, "eps_high": 0.28, "entropy_coef": 0.001},
    # KL-Cov (Cui et al. 2025) as in verl: no ratio clip, |logp - logp_old| on the top 0.2% cov tokens.
    "kl_cov": {"enabled": False, "eps_low": 1.0, "eps_high": math.inf, "kl_cov_ratio": 0.002},
    # Beyond the 80/20 rule (Wang et al. 2025): DAPO clip-higher on the top-20% entropy tokens only.
    "80_20": {"enabled": False, "eps_low": 0.2, "eps_high": 0.28, "high_entropy_fraction": 0.2},
    # GSPO (Zheng et al. 2025): sequence-level ratio, tiny clip range, sequence-mean aggregation.
    "gspo": {
        "enabled": False, "ratio_level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4,
        "loss_agg": "seq_mean_token_mean",
    },
}
