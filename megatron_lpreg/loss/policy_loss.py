"""The policy-gradient objective with Lp-Reg and the verl baselines (paper Eq. 5-7, the released code's k3).

All per-token tensors are [B, S] (response tokens; advantages may be [B]); nothing here is sharded:
the vocab-parallel work happened when the log-probs were computed.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from megatron_lpreg.loss.config import LpRegConfig
from megatron_lpreg.loss.ref_kl import ref_kl
from megatron_lpreg.loss.selection import SelectionThresholds, _expand, lowest_k, select_tokens_tensors

ExactKL = torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None


def aggregate(token_losses, mask, mode="token_mean", global_tokens=None) -> torch.Tensor:
    """Reduce per-token losses [B, S] over ``mask`` (docs/lp_reg.md section 5).

    token_mean: sum / tokens in this micro-batch. seq_mean_token_mean: mean over non-empty sequences
    of each sequence's token mean. global_token_mean: sum / ``global_tokens`` (the token count of the
    whole mini-batch over all DP ranks), so micro-batch losses add up to the exact global mean.
    """
    mask = mask.bool()
    masked = torch.where(mask, token_losses, torch.zeros_like(token_losses))
    if mode == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        lengths = mask.sum(dim=-1)
        per_seq = masked.sum(dim=-1) / lengths.clamp(min=1)
        return per_seq.sum() / (lengths > 0).sum().clamp(min=1)
    if mode == "global_token_mean":
        if not global_tokens:
            raise ValueError("loss_agg='global_token_mean' needs global_tokens (mini-batch token count)")
        return masked.sum() / global_tokens
    raise ValueError(f"unknown loss aggregation {mode!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """0-d mean over ``mask``, 0 when empty; the same bits as dividing by the host count.

    count: ``mask.sum().clamp(min=1)`` when the caller already has it (several means share a mask).
    """
    return torch.where(mask, x, 0.0).sum() / (mask.sum().clamp(min=1) if count is None else count)


def _masked_extreme(x: torch.Tensor, mask: torch.Tensor, largest: bool) -> torch.Tensor:
    fill = float("-inf") if largest else float("inf")
    filled = torch.where(mask, x, torch.full_like(x, fill))
    value = filled.amax() if largest else filled.amin()
    return torch.where(mask.any(), value, torch.zeros_like(value))


# Metrics that are only reported when they exist; the tensor variant carries NaN for "absent".
OPTIONAL_METRICS = frozenset({"lpreg/delta_rho"})


def metrics_to_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Tensor metrics -> Python floats with one host sync; NaN optional metrics are dropped."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    host = dict(zip(tensors, torch.stack([v.detach().to(torch.float64).reshape(())
                                          for v in tensors.values()]).tolist())) if tensors else {}
    out = {}
    for key, value in metrics.items():
        value = host[key] if key in host else float(value)
        if key in OPTIONAL_METRICS and math.isnan(value):
            continue
        out[key] = value
    return out


def _log_ratio(logprobs, old_logprobs, mask, config):
    if config.ratio_level == "token":
        return logprobs - old_logprobs
    # GSPO: s_i = exp(mean_t(l - l_old)) carried on each token as sg[s_i] * pi / sg[pi].
    diff = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs)).detach()
    seq = diff.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return (logprobs - logprobs.detach() + seq.unsqueeze(-1)).clamp(max=10.0)


def _top_fraction(scores, mask, fraction):
    """Bool mask of the max(1, int(fraction * n)) largest ``scores`` among valid tokens (verl's rule).

    ``lowest_k`` of the negated scores: k stays a tensor (topk would need it on the host); ties at
    the k-th value go to the earlier tokens. NaN scores rank largest, as in topk.
    """
    flat_mask = mask.reshape(-1)
    k_max = max(1, int(flat_mask.numel() * fraction))
    # With no valid token k = 1 still takes nothing: nothing is in the pool.
    k = torch.floor(flat_mask.sum().to(torch.float64) * fraction).to(torch.int64).clamp(min=1)
    neg = (-scores.detach().reshape(-1)).nan_to_num(nan=float("-inf"), posinf=float("inf"),
                                                   neginf=float("-inf"))
    return lowest_k(neg, flat_mask, k, k_max)[0].view_as(mask)


def _regulariser(logprobs, proxy_logprobs, selected, config, exact_kl: ExactKL):
    """D_t on S' (zero elsewhere), with no inf/NaN reachable through unselected tokens."""
    if config.kl == "k3":
        # Unselected tokens may have proxy = -inf; substitute l so no branch ever sees inf.
        # Elsewhere d = 0 and D = 0 exactly, so no mask is needed on the result.
        safe = torch.where(selected, proxy_logprobs, logprobs.detach())
        d = safe - logprobs
        return (torch.exp(d) - d - 1.0).clamp(-config.kl_clamp, config.kl_clamp)
    if exact_kl is None:
        raise ValueError(
            f"LpRegConfig.kl={config.kl!r} needs exact_kl: a [B, S] tensor of per-token "
            "KL values or a callable(selected_mask) -> values of the selected tokens"
        )
    if callable(exact_kl):
        values = exact_kl(selected)
        # The one host sync of this path: the callable returns a data-dependent number of rows
        # (it has gathered them by the mask, itself a sync), and a wrong count must not scatter.
        n_sel = int(selected.sum())
        if values.shape != (n_sel,):
            raise ValueError(f"exact_kl callable returned shape {tuple(values.shape)}, expected ({n_sel},)")
        return torch.zeros_like(logprobs).masked_scatter(selected, values.to(logprobs.dtype))
    return torch.where(selected, exact_kl.to(logprobs.dtype), torch.zeros_like(logprobs))


def lp_reg_policy_loss_tensors(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    proxy_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LpRegConfig,
    exact_kl: ExactKL = None,
    *,
    entropy: torch.Tensor | None = None,
    thresholds: SelectionThresholds | None = None,
    global_tokens: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    pg_weight: torch.Tensor | None = None,
):
    """``lp_reg_policy_loss`` with the metrics as 0-d tensors on the log-probs' device.

    No host sync for kl='k3' (kl='forward'/'reverse' with a callable: one, see ``_regulariser``), so
    a trainer can sum the metrics over micro-batches on the device and read them once per step.
    The keys and values are those of ``lp_reg_policy_loss``, except ``lpreg/delta_rho``: present
    whenever a percentile can be taken, NaN where none was (``metrics_to_floats`` drops it then).
    Counts are int64, means in the log-probs' dtype, shares float64.
    """
    mask = mask.bool()
    adv = _expand(advantages, logprobs).to(logprobs.dtype)
    if entropy is None and (config.entropy_coef > 0 or config.high_entropy_fraction < 1.0):
        raise ValueError("entropy_coef > 0 or high_entropy_fraction < 1 needs the per-token entropy")
    nonfinite = mask & ~(torch.isfinite(logprobs) & torch.isfinite(old_logprobs) & torch.isfinite(adv))

    log_ratio = _log_ratio(logprobs, old_logprobs, mask, config)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    if pg_weight is not None:
        # w >= 0 commutes with the max, so weighting both branches weights the clipped surrogate.
        w = pg_weight.detach().to(logprobs.dtype)
        pg_unclipped, pg_clipped = w * pg_unclipped, w * pg_clipped
    token_loss = torch.maximum(pg_unclipped, pg_clipped)
    dual = None
    if config.clip_ratio_c > 0:
        # verl's dual clip: a negative-advantage token's loss is capped at -A * c, so one token
        # with a huge ratio cannot dominate. Lp-Reg's S' and KL-Cov's tokens replace it below.
        pg_dual = -adv * config.clip_ratio_c
        if pg_weight is not None:
            pg_dual = w * pg_dual
        dual = (adv < 0) & (token_loss > pg_dual)
        token_loss = torch.where(dual, pg_dual, token_loss)
    metrics: dict[str, torch.Tensor] = {}

    if config.kl_cov_ratio > 0:
        with torch.no_grad():
            lp_d = logprobs.detach()
            cov = (adv - _masked_mean(adv, mask)) * (lp_d - _masked_mean(lp_d, mask))
            kl_cov = _top_fraction(cov, mask, config.kl_cov_ratio)
        penalised = pg_unclipped + config.kl_cov_coef * (logprobs - old_logprobs).abs()
        token_loss = torch.where(kl_cov, penalised, token_loss)
        metrics["kl_cov/selected"] = kl_cov.sum()

    if config.enabled:
        sel = select_tokens_tensors(logprobs, proxy_logprobs, adv, mask, config, thresholds)
        reg = _regulariser(logprobs, proxy_logprobs, sel.selected, config, exact_kl)
        weighted = reg if config.beta == 1.0 else config.beta * reg  # x * 1.0 is x: skip the op
        token_loss = torch.where(sel.selected, pg_unclipped + weighted, token_loss)
        n_sel = sel.selected.sum()
        f64 = torch.float64
        n_sel64 = n_sel.to(f64)
        metrics.update({
            "lpreg/candidates": sel.candidates,
            "lpreg/lowest": sel.lowest_count,
            "lpreg/selected": n_sel,
            # Python's int / int is a float64 division: the same bits as the float variant had.
            "lpreg/pass_share": n_sel64 / sel.lowest_count.to(f64).clamp(min=1),
            "lpreg/selected_share": n_sel64 / mask.sum().to(f64).clamp(min=1),
            "lpreg/kl_mean": _masked_mean(reg.detach(), sel.selected, n_sel.clamp(min=1)),
        })
        delta = sel.delta_rho_logprob
        if delta is not None:
            # exp in float32, as it always was (the threshold went through torch.tensor(float)).
            if isinstance(delta, torch.Tensor):
                metrics["lpreg/delta_rho"] = delta.detach().to(torch.float32).exp()
            else:
                # A host float (batch scopes): filled on the device, as copying a host tensor there
                # would wait for its queue (on an accelerator its exp may differ in the last bit).
                metrics["lpreg/delta_rho"] = torch.full((), delta, dtype=torch.float32,
                                                        device=logprobs.device).exp()
    else:
        # |N| and |S'| are always reported, so a plain-GRPO run's logs line up with an Lp-Reg run's.
        metrics["lpreg/candidates"] = (mask & (adv < 0)).sum()
        metrics["lpreg/selected"] = torch.zeros((), dtype=torch.int64, device=logprobs.device)

    loss_mask = mask
    if config.high_entropy_fraction < 1.0:
        loss_mask = mask & _top_fraction(entropy, mask, config.high_entropy_fraction)
        metrics["high_entropy/kept"] = loss_mask.sum()
    if config.entropy_coef > 0:
        token_loss = token_loss - config.entropy_coef * entropy
    if config.ref_kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("ref_kl_coef > 0 needs ref_logprobs (log-probs of the reference policy)")
        kl = ref_kl(logprobs, ref_logprobs, config.ref_kl_type)
        token_loss = token_loss + config.ref_kl_coef * kl
        metrics["loss/ref_kl"] = _masked_mean(kl.detach(), loss_mask)

    loss = aggregate(token_loss, loss_mask, config.loss_agg, global_tokens)

    with torch.no_grad():
        r = ratio.detach()
        clipped = pg_clipped > pg_unclipped
        n_tokens = mask.sum()
        n_mask = n_tokens.clamp(min=1)
        n_loss = n_mask if loss_mask is mask else loss_mask.sum().clamp(min=1)
        metrics.update({
            "loss/tokens": n_tokens,
            "loss/nonfinite_tokens": nonfinite.sum(),
            "pg/clipfrac": _masked_mean(clipped.to(r.dtype), loss_mask, n_loss),
            # The two clip bounds separately: r > 1 + eps_high binds for A > 0, r < 1 - eps_low for A < 0.
            "pg/clipfrac_high": _masked_mean((clipped & (adv > 0)).to(r.dtype), loss_mask, n_loss),
            "pg/clipfrac_low": _masked_mean((clipped & (adv < 0)).to(r.dtype), loss_mask, n_loss),
            "pg/ratio_mean": _masked_mean(r, mask, n_mask),
            "pg/ratio_max": _masked_extreme(r, mask, largest=True),
            "pg/ratio_min": _masked_extreme(r, mask, largest=False),
            "pg/approx_kl": _masked_mean((old_logprobs - logprobs).detach(), mask, n_mask),
        })
        if dual is not None:
            metrics["pg/clipfrac_dual"] = _masked_mean(dual.to(r.dtype), loss_mask, n_loss)
        if entropy is not None:
            metrics["entropy/mean"] = _masked_mean(entropy.detach(), mask, n_mask)
    return loss, metrics


def lp_reg_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    proxy_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LpRegConfig,
    exact_kl: ExactKL = None,
    *,
    entropy: torch.Tensor | None = None,
    thresholds: SelectionThresholds | None = None,
    global_tokens: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    pg_weight: torch.Tensor | None = None,
):
    """docs/lp_reg.md sections 2-4 for one micro-batch -> (loss, metrics).

    logprobs: current log pi_theta(o_t), differentiable; old_logprobs: log pi_old (trainer-computed);
    proxy_logprobs: log pi_proxy(o_t), -inf where filtered; advantages: [B, S] or [B]; mask: valid
    response tokens. exact_kl: for kl='forward'/'reverse', per-token values [B, S] or a callable taking
    the bool mask of S' and returning its values in row-major order (so only those rows are computed).
    entropy: per-token entropy [B, S], needed for entropy_coef > 0 (differentiable) and
    high_entropy_fraction < 1. thresholds: from ``selection_thresholds`` for the batch scopes.
    ref_logprobs: log pi_ref(o_t) of the frozen reference policy [B, S], needed for ref_kl_coef > 0:
    ``ref_kl_coef * KL_t`` is added to every token's loss and aggregated with it.
    pg_weight: optional [B, S] per-token weight of the policy-gradient term (truncated importance
    sampling, ``grpo/mismatch.py``), treated as a constant; the Lp-Reg term D_t is not weighted.
    The loss is aggregated by ``config.loss_agg`` (token mean by default).
    """
    loss, metrics = lp_reg_policy_loss_tensors(
        logprobs, old_logprobs, proxy_logprobs, advantages, mask, config, exact_kl, entropy=entropy,
        thresholds=thresholds, global_tokens=global_tokens, ref_logprobs=ref_logprobs, pg_weight=pg_weight,
    )
    return loss, metrics_to_floats(metrics)
