"""Unsharded float64 references, written the plain way (full softmax, Python loops over tokens).

Deliberately independent of megatron_lpreg.loss: no shared helpers, so a shared mistake can't hide.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def probs(logits):
    return torch.softmax(logits.double(), dim=-1)


def logprobs(logits, target):
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def entropy(logits):
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kept_set(logits, kappa, threshold):
    p = probs(logits)
    tau = kappa * p.max(dim=-1, keepdim=True).values if threshold == "minp" else kappa
    return p >= tau


def proxy_distribution(logits, kappa, threshold):
    p = probs(logits)
    keep = kept_set(logits, kappa, threshold)
    kept_p = torch.where(keep, p, torch.zeros_like(p))
    return kept_p / kept_p.sum(-1, keepdim=True), keep


def proxy_logprobs(logits, target, kappa, threshold):
    r, keep = proxy_distribution(logits.detach(), kappa, threshold)
    out = torch.full(target.shape, NEG_INF, dtype=torch.float64)
    for i in range(target.numel()):
        if keep[i, target[i]]:
            out[i] = math.log(r[i, target[i]].item())
    return out


def kept_mass(logits, kappa, threshold):
    p = probs(logits)
    return torch.where(kept_set(logits, kappa, threshold), p, torch.zeros_like(p)).sum(-1)


def forward_kl(logits, proxy_logits, kappa, threshold):
    r, keep = proxy_distribution(proxy_logits.detach(), kappa, threshold)
    logp = torch.log_softmax(logits.double(), dim=-1)
    log_r = torch.where(keep, torch.log(torch.where(keep, r, torch.ones_like(r))), torch.zeros_like(r))
    return torch.where(keep, r * (log_r - logp), torch.zeros_like(r)).sum(-1)


def reverse_kl(logits, proxy_logits, kappa, threshold):
    r, keep = proxy_distribution(proxy_logits.detach(), kappa, threshold)
    z = logits.double().masked_fill(~keep, NEG_INF)
    log_q = torch.log_softmax(z, dim=-1)
    log_q = torch.where(keep, log_q, torch.zeros_like(log_q))  # no -inf * 0 in the backward
    log_r = torch.log(torch.where(keep, r, torch.ones_like(r)))
    return torch.where(keep, log_q.exp() * (log_q - log_r), torch.zeros_like(r)).sum(-1)


def tis_weights(old, engine, cap):
    """min(exp(l_old - l_engine), cap) element by element (truncated importance sampling)."""
    out = torch.empty_like(old, dtype=torch.float64)
    for i in range(old.numel()):
        out.view(-1)[i] = min(math.exp(old.reshape(-1)[i].item() - engine.reshape(-1)[i].item()), cap)
    return out


def policy_loss(lp, old, proxy, adv, mask, cfg, exact_kl=None, entropy_t=None, thresholds=None, pg_weight=None):
    """Sections 2-4 token by token. Returns (token-mean loss, selected positions).
    pg_weight: per-token constant multiplying the policy-gradient term only (not D_t)."""
    B, S = lp.shape
    adv = adv.unsqueeze(-1).expand(B, S) if adv.dim() == 1 else adv
    valid = [(b, s) for b in range(B) for s in range(S) if mask[b, s]]
    lpd = {t: lp[t].item() for t in valid}

    def lowest(side):
        frac = cfg.rho if side == "neg" else cfg.regularize_positive
        if frac == 0:
            return []
        sign_ok = (lambda a: a < 0) if side == "neg" else (lambda a: a > 0)
        if cfg.percentile_scope == "batch_all_tokens":
            pool = list(valid)
        else:
            pool = [t for t in valid if sign_ok(adv[t].item())]
        if cfg.percentile_scope == "microbatch":
            k = int(len(pool) * frac)
            if k < cfg.min_selected:
                return []
            chosen = sorted(pool, key=lambda t: lpd[t])[:k]
        else:
            thr = getattr(thresholds, side)
            if thr is None:
                return []
            chosen = [t for t in pool if lpd[t] <= thr]
        return [t for t in chosen if sign_ok(adv[t].item())]

    selected = [t for t in lowest("neg") + lowest("pos") if lpd[t] < proxy[t].item()]
    losses = []
    for t in valid:
        r = torch.exp(lp[t] - old[t])
        a = adv[t] * (1.0 if pg_weight is None else pg_weight[t].item())
        if t in selected:
            if cfg.kl == "k3":
                d = proxy[t] - lp[t]
                reg = torch.clamp(torch.exp(d) - d - 1, -cfg.kl_clamp, cfg.kl_clamp)
            else:
                reg = exact_kl[t]
            loss_t = -a * r + cfg.beta * reg
        else:
            clipped = torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high)
            loss_t = torch.maximum(-a * r, -a * clipped)
            if cfg.clip_ratio_c and a < 0:
                loss_t = torch.minimum(loss_t, -a * cfg.clip_ratio_c)
        if cfg.entropy_coef:
            loss_t = loss_t - cfg.entropy_coef * entropy_t[t]
        losses.append(loss_t)
    total = torch.stack(losses).sum() / len(valid) if valid else lp.sum() * 0
    return total, sorted(selected)
