"""Which tokens Lp-Reg regularises (docs/lp_reg.md section 2), and the percentile used to pick them.

Per side (negative advantages always, positive ones for the "Pos & Neg" ablation):
  pool  = valid tokens with A < 0 (A > 0), or all valid tokens for ``batch_all_tokens``
  k     = int(fraction * |pool|) as the reference code computes it; k < min_selected -> nothing
  S     = the k pool tokens with the lowest current log-prob (no grad), restricted to the side's sign
  S'    = {t in S : l_t < log pi_proxy(o_t)}

``microbatch`` scope picks exactly k per call, as the reference code does (ties at the k-th value go
to the earlier token, as its stable sort has them), with k kept on the device (``lowest_k``). The batch
scopes pick by a threshold computed once over the whole mini-batch (all micro-batches, all DP ranks):
every token with l <= the k-th lowest value, so tokens tied with the k-th are all taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lpreg.parallel import all_gather

from megatron_lpreg.loss.config import LpRegConfig

SIDES = ("neg", "pos")


def _fraction(config: LpRegConfig, side: str) -> float:
    return config.rho if side == "neg" else config.regularize_positive


def _sign_mask(advantages: torch.Tensor, side: str) -> torch.Tensor:
    return advantages < 0 if side == "neg" else advantages > 0


def _pool(advantages, mask, config, side):
    if config.percentile_scope == "batch_all_tokens":
        return mask
    return mask & _sign_mask(advantages, side)


def num_selected(n_pool: int, fraction: float, min_selected: int) -> int:
    """k for a pool of n tokens: int(fraction * n), 0 when below the min_selected quirk."""
    k = int(n_pool * fraction)
    return k if k >= min_selected else 0


@dataclass
class SelectionThresholds:
    """k-th lowest log-prob per side over a whole mini-batch (batch scopes); None = select nothing."""

    neg: float | None
    pos: float | None
    pool_sizes: dict


def _gather_values(values: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return values
    n = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    all_gather(sizes, n, group)
    sizes = torch.cat(sizes).tolist()  # one read of all ranks' sizes: the padding needs them
    padded = torch.full((max(sizes),), float("inf"), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    out = [torch.empty_like(padded) for _ in sizes]
    all_gather(out, padded, group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def selection_thresholds(logprobs, advantages, mask, config: LpRegConfig, group=None):
    """Percentile thresholds over a mini-batch for the ``batch`` / ``batch_all_tokens`` scopes.

    logprobs / advantages / mask: one [B, S] tensor each, or lists of them (one per micro-batch);
    advantages may be [B]. group: the data-parallel group, so all DP ranks agree (None = local).
    Called once per mini-batch. It reads back, per side, the pool's size (a data-dependent gather,
    and kthvalue takes k on the host) and the k-th value (a float); with DP, the ranks' sizes once.
    """
    if isinstance(logprobs, torch.Tensor):
        logprobs, advantages, mask = [logprobs], [advantages], [mask]
    lp_all = torch.cat([lp.detach().reshape(-1) for lp in logprobs]).to(torch.float64)
    adv_all = torch.cat([_expand(a, lp).reshape(-1) for a, lp in zip(advantages, logprobs)])
    mask_all = torch.cat([m.bool().reshape(-1) for m in mask])
    out, sizes = {}, {}
    for side in SIDES:
        frac = _fraction(config, side)
        if frac == 0.0:
            out[side], sizes[side] = None, 0
            continue
        pool = _gather_values(lp_all[_pool(adv_all, mask_all, config, side)], group)
        k = num_selected(pool.numel(), frac, config.min_selected)
        sizes[side] = pool.numel()
        out[side] = float(torch.kthvalue(pool, k).values) if k else None
    return SelectionThresholds(out["neg"], out["pos"], sizes)


def _expand(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(-1).expand_as(like) if advantages.dim() == 1 else advantages


@dataclass
class Selection:
    lowest: torch.Tensor  # bool [B, S]: S, both sides
    selected: torch.Tensor  # bool [B, S]: S'
    candidates: int  # |N|: valid tokens with A < 0
    lowest_count: int
    delta_rho_logprob: float | None  # the negative side's percentile threshold, as a log-prob


@dataclass
class SelectionTensors:
    """``Selection`` with the counts as 0-d device tensors, so nothing waits for the device."""

    lowest: torch.Tensor
    selected: torch.Tensor
    candidates: torch.Tensor  # int64
    lowest_count: torch.Tensor  # int64
    # The negative side's threshold: a float (batch scopes), a 0-d tensor that is NaN when nothing
    # was taken (microbatch scope), or None (the side never takes a percentile).
    delta_rho_logprob: torch.Tensor | float | None


def lowest_k(values: torch.Tensor, pool: torch.Tensor, k: torch.Tensor, k_max: int) -> tuple:
    """Bool mask of the ``k`` lowest ``values`` among ``pool`` (1-D), and the k-th lowest value
    (NaN for k = 0), without reading k back to the host.

    k: 0-d int64 tensor, at most ``k_max`` (a host bound from the shape), so a topk of k_max finds
    the k-th value; the mask is then every pool value below it plus, of those equal to it, the
    earliest ones up to k in all: the stable sorted() rule of the reference (topk's own choice
    among ties is unspecified). A NaN value is never taken.
    """
    nan = float("nan")
    if k_max <= 0 or values.numel() == 0:
        return torch.zeros_like(pool), values.new_full((), nan)
    key = torch.where(pool, values, nan)  # out of the pool: below or equal to nothing
    top = torch.topk(key, min(k_max, key.numel()), largest=False).values
    # Slot 0 stands for k = 0: NaN, so that nothing is below or equal to it.
    kth = torch.cat([top.new_full((1,), nan), top]).gather(0, k.view(1)).squeeze(0)
    below = key < kth
    tied = key == kth
    return below | (tied & (tied.cumsum(0) <= k - below.sum())), kth


def _k_lowest(lp_flat, pool_flat, frac: float, min_selected: int, n_pool=None):
    """S of one side in the microbatch scope: the k = int(frac * |pool|) lowest (none below
    min_selected), and the k-th lowest log-prob (NaN when k = 0). n_pool: |pool| if known."""
    k_max = int(pool_flat.numel() * frac)
    if k_max < min_selected:  # |pool| <= numel: k is below the quirk whatever the data
        return torch.zeros_like(pool_flat), lp_flat.new_full((), float("nan"))
    n = pool_flat.sum() if n_pool is None else n_pool
    # float64 product and floor: bit for bit Python's int(n * frac) for the n of any real batch.
    k = torch.floor(n.to(torch.float64) * frac).to(torch.int64)
    k = k * (k >= min_selected)
    return lowest_k(lp_flat, pool_flat, k, k_max)


def select_tokens_tensors(logprobs, proxy_logprobs, advantages, mask, config,
                          thresholds=None) -> SelectionTensors:
    """``select_tokens`` without host syncs: counts and the threshold stay on the device."""
    lp = logprobs.detach()
    adv = _expand(advantages, lp)
    mask = mask.bool()
    negative = mask & (adv < 0)
    candidates = negative.sum()
    all_tokens = config.percentile_scope == "batch_all_tokens"
    lowest = None
    delta = None
    for side in SIDES:
        frac = _fraction(config, side)
        if frac == 0.0:
            continue
        if all_tokens:
            pool = mask
        else:
            pool = negative if side == "neg" else mask & _sign_mask(adv, side)
        if config.percentile_scope == "microbatch":
            n_pool = candidates if side == "neg" else None
            chosen, side_thr = _k_lowest(lp.reshape(-1), pool.reshape(-1), frac, config.min_selected, n_pool)
            side_lowest = chosen.view_as(mask)
        else:
            if thresholds is None:
                raise ValueError(
                    f"percentile_scope={config.percentile_scope!r} needs mini-batch thresholds: "
                    "call selection_thresholds() over the mini-batch first"
                )
            side_thr = thresholds.neg if side == "neg" else thresholds.pos
            if side_thr is None:
                continue
            side_lowest = pool & (lp <= side_thr)
        if all_tokens:  # S drawn from all tokens; only the side's own sign is regularised
            side_lowest = side_lowest & _sign_mask(adv, side)
        lowest = side_lowest if lowest is None else lowest | side_lowest
        if side == "neg":
            delta = side_thr
    if lowest is None:
        lowest = torch.zeros_like(mask)
    selected = lowest & (lp < proxy_logprobs)
    return SelectionTensors(
        lowest=lowest,
        selected=selected,
        candidates=candidates,
        lowest_count=lowest.sum(),
        delta_rho_logprob=delta,
    )


def select_tokens(logprobs, proxy_logprobs, advantages, mask, config, thresholds=None) -> Selection:
    """S and S' for one micro-batch. ``thresholds`` are required for the batch scopes."""
    sel = select_tokens_tensors(logprobs, proxy_logprobs, advantages, mask, config, thresholds)
    delta = sel.delta_rho_logprob
    on_device = isinstance(delta, torch.Tensor)
    parts = [sel.candidates, sel.lowest_count] + ([delta] if on_device else [])
    host = torch.stack([t.to(torch.float64) for t in parts]).tolist()  # the one sync
    if on_device:
        delta = None if math.isnan(host[2]) else host[2]  # NaN: the side took nothing (k = 0)
    return Selection(sel.lowest, sel.selected, int(host[0]), int(host[1]), delta)
