"""Exact KL divergences between the policy and the min-p proxy, over vocab-sharded logits.

The proxy comes from ``proxy_logits`` (pi_old, detached): pi_proxy(v) = p_old(v) / M on the kept set
K = {v : p_old(v) >= tau}, 0 elsewhere (docs/lp_reg.md section 1). Both functions return one value per
row, differentiable w.r.t. ``logits`` only, and all-reduce per-row partial sums instead of
gathering the vocabulary.

forward  (paper Eq. 6): KL(pi_proxy || pi_theta) = sum_{v in K} pi_proxy(v) (log pi_proxy(v) - log pi_theta(v)),
         gradient w.r.t. z: softmax(z) - pi_proxy.
reverse  (paper Fig. 10 ablation): KL(pi_theta|K || pi_proxy), where pi_theta|K is pi_theta renormalised
         on K. The unrestricted KL(pi_theta || pi_proxy) is +inf whenever pi_theta puts any mass outside
         K, i.e. always; the restriction compares the policy's shape on K with the proxy's and leaves
         the mass outside K unpenalised. Gradient w.r.t. z_v: q_v (log q_v - log pi_proxy(v) - D) on K, 0 off K.
"""

from __future__ import annotations

import torch

from megatron_lpreg.loss import shards as S

_FN = "vocab_parallel_{}_kl_to_proxy"


def _proxy_set(y, shard, kappa, threshold):
    """Shifted proxy logits, their exponentials and the kept set of one chunk."""
    my = S.all_reduce_max(S.row_max(y), shard)
    sy = y - my.unsqueeze(1)
    ey = torch.exp(sy)
    sum_y = S.all_reduce_sum(ey.sum(dim=1), shard) if threshold == "fixed" else None
    return sy, ey, S.kept_mask(ey, sum_y, kappa, threshold), my, sum_y


def _recompute_proxy_set(y, my, sum_y, kappa, threshold):
    sy = y - my.unsqueeze(1)
    ey = torch.exp(sy)
    return sy, ey, S.kept_mask(ey, sum_y, kappa, threshold)


def _row_chunks(logits, proxy_logits, shard, chunk_tokens, check: str | None = None):
    """(rows, z, y) per chunk: real columns of both logits in the compute dtype."""
    dtype = S.compute_dtype(logits)
    for rows in S.chunk_slices(logits.shape[0], logits.shape[1], chunk_tokens):
        z = S.local_columns(logits[rows], shard, dtype)
        y = S.local_columns(proxy_logits[rows], shard, dtype)
        if check:
            S.check_finite(z, rows, shard, _FN.format(check))
            S.check_finite(y, rows, shard, _FN.format(check), "proxy logits")
        yield rows, z, y


def _saved_proxy_set(ctx, y, rows, my, sum_y):
    return _recompute_proxy_set(y, my[rows], None if sum_y is None else sum_y[rows], ctx.kappa, ctx.threshold)


class _ForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, proxy_logits, shard, kappa, threshold, chunk_tokens):
        dtype = S.compute_dtype(logits)
        T = logits.shape[0]
        S.check_kappa(kappa)
        out = torch.empty(T, dtype=dtype, device=logits.device)
        log_z, my_all, log_w_all = (torch.empty_like(out) for _ in range(3))
        sum_y_all = torch.empty_like(out) if threshold == "fixed" else None
        for rows, z, y in _row_chunks(logits, proxy_logits, shard, chunk_tokens, check="forward"):
            sy, ey, kept, my, sum_y = _proxy_set(y, shard, kappa, threshold)
            m = S.all_reduce_max(S.row_max(z), shard)
            sz = z - m.unsqueeze(1)
            w = torch.where(kept, ey, 0.0)
            sums = [torch.exp(sz).sum(dim=1), w.sum(dim=1), S.dot_rows(w, sy), S.dot_rows(w, sz)]
            red = S.all_reduce_sum(torch.stack(sums), shard)
            log_s, big_w = torch.log(red[0]), red[1]
            log_w = torch.log(big_w)
            out[rows] = (red[2] - red[3]) / big_w - log_w + log_s
            log_z[rows], my_all[rows], log_w_all[rows] = m + log_s, my, log_w
            if sum_y_all is not None:
                sum_y_all[rows] = sum_y
        ctx.shard, ctx.kappa, ctx.threshold, ctx.chunk_tokens = shard, kappa, threshold, chunk_tokens
        ctx.save_for_backward(logits, proxy_logits, log_z, my_all, log_w_all, sum_y_all)
        return out

    @staticmethod
    def backward(ctx, g):
        logits, proxy_logits, log_z, my, log_w, sum_y = ctx.saved_tensors
        shard = ctx.shard
        grad = torch.zeros_like(logits)
        for rows, z, y in _row_chunks(logits, proxy_logits, shard, ctx.chunk_tokens):
            sy, _, kept = _saved_proxy_set(ctx, y, rows, my, sum_y)
            p = torch.exp(z - log_z[rows].unsqueeze(1))
            r = torch.where(kept, torch.exp(sy - log_w[rows].unsqueeze(1)), 0.0)
            grad[rows, : shard.valid] = p.sub_(r).mul_(g[rows].unsqueeze(1))
        return grad, None, None, None, None, None


class _ReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, proxy_logits, shard, kappa, threshold, chunk_tokens):
        dtype = S.compute_dtype(logits)
        T = logits.shape[0]
        S.check_kappa(kappa)
        out = torch.empty(T, dtype=dtype, device=logits.device)
        mk_all, log_q_all, my_all, log_w_all = (torch.empty_like(out) for _ in range(4))
        sum_y_all = torch.empty_like(out) if threshold == "fixed" else None
        for rows, z, y in _row_chunks(logits, proxy_logits, shard, chunk_tokens, check="reverse"):
            sy, ey, kept, my, sum_y = _proxy_set(y, shard, kappa, threshold)
            # Stabilise with the max over K: the policy may put almost no mass on K.
            mk = S.all_reduce_max(S.row_max(z.masked_fill(~kept, float("-inf"))), shard)
            sz = z - mk.unsqueeze(1)
            e = torch.where(kept, torch.exp(sz), 0.0)
            w = torch.where(kept, ey, 0.0)
            diff = torch.where(kept, sz - sy, 0.0)
            red = S.all_reduce_sum(torch.stack([e.sum(dim=1), S.dot_rows(e, diff), w.sum(dim=1)]), shard)
            log_q, log_w = torch.log(red[0]), torch.log(red[2])
            out[rows] = red[1] / red[0] - log_q + log_w
            mk_all[rows], log_q_all[rows], my_all[rows], log_w_all[rows] = mk, log_q, my, log_w
            if sum_y_all is not None:
                sum_y_all[rows] = sum_y
        ctx.shard, ctx.kappa, ctx.threshold, ctx.chunk_tokens = shard, kappa, threshold, chunk_tokens
        ctx.save_for_backward(logits, proxy_logits, out, mk_all, log_q_all, my_all, log_w_all, sum_y_all)
        return out

    @staticmethod
    def backward(ctx, g):
        logits, proxy_logits, kl, mk, log_q, my, log_w, sum_y = ctx.saved_tensors
        shard = ctx.shard
        grad = torch.zeros_like(logits)
        for rows, z, y in _row_chunks(logits, proxy_logits, shard, ctx.chunk_tokens):
            sy, _, kept = _saved_proxy_set(ctx, y, rows, my, sum_y)
            log_q_v = z - (mk[rows] + log_q[rows]).unsqueeze(1)
            log_r_v = sy - log_w[rows].unsqueeze(1)
            q = torch.where(kept, torch.exp(log_q_v), 0.0)
            coef = torch.where(kept, log_q_v - log_r_v - kl[rows].unsqueeze(1), 0.0)
            grad[rows, : shard.valid] = q.mul_(coef).mul_(g[rows].unsqueeze(1))
        return grad, None, None, None, None, None


def _kl(fn, logits, proxy_logits, kappa, threshold, group, vocab_size, chunk_tokens):
    if proxy_logits.shape != logits.shape:
        raise ValueError(
            f"proxy_logits shape {tuple(proxy_logits.shape)} != logits shape {tuple(logits.shape)}"
        )
    lead, flat, _ = S.flatten_rows(logits)
    _, flat_proxy, _ = S.flatten_rows(proxy_logits.detach())
    shard = S.vocab_shard(flat, group, vocab_size)
    return fn.apply(flat, flat_proxy, shard, kappa, threshold, chunk_tokens).view(lead)


def vocab_parallel_forward_kl_to_proxy(
    logits, proxy_logits, kappa, threshold="minp", group=None, *, vocab_size=None, chunk_tokens=None
):
    """KL(pi_proxy || pi_theta) per row from vocab-sharded [..., V_local] logits -> [...].

    Differentiable w.r.t. ``logits``; ``proxy_logits`` (same sharding) define the proxy, detached.
    """
    return _kl(_ForwardKL, logits, proxy_logits, kappa, threshold, group, vocab_size, chunk_tokens)


def vocab_parallel_reverse_kl_to_proxy(
    logits, proxy_logits, kappa, threshold="minp", group=None, *, vocab_size=None, chunk_tokens=None
):
    """KL(pi_theta|K || pi_proxy) per row (see the module docstring for the restriction to K)."""
    return _kl(_ReverseKL, logits, proxy_logits, kappa, threshold, group, vocab_size, chunk_tokens)
