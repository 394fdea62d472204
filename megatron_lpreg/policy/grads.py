"""Gradient finalisation between backward and the optimizer step, kept apart from the optimizer (as
megatron keeps ``finalize_model_grads`` apart from its optimizers).

- ``sum_partial_over_tp``: replicated parameters whose gradient each TP rank holds only part of
  (``is_tp_partial``) get the sum of the parts, so every TP rank holds the same full gradient.
- ``average_over_dp``: the mean gradient over the data-parallel group (bucketed all-reduce);
  ``reduce_scatter_over_dp`` gives only this rank's slice of it (ZeRO-1), and
  ``all_gather_over_dp`` brings the updated slices back.
- ``grad_norm``: the global L2 norm over TP shards (replicas counted once) and, for ZeRO-1, over
  the DP slices.

Every function takes its process group explicitly; None means no group (this rank is alone and no
collective is issued, ``megatron_lpreg.parallel.group_or_none``). Every rank of a group must make
the same calls with tensors of the same shapes. Gradients are fp32.
"""

from __future__ import annotations

import math

import torch

from megatron_lpreg.parallel import (all_gather_into, all_reduce, group_or_none, group_rank, group_size,
                                     reduce_scatter_into)


def is_tp_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is this TP rank's shard of a larger tensor (megatron marks those)."""
    return getattr(param, "tensor_model_parallel", False)


def is_tp_partial(name: str, param: torch.Tensor) -> bool:
    """A replicated parameter whose gradient each TP rank holds only part of, so the parts must be
    summed over TP (megatron's ``finalize_model_grads`` does the same): q/k layernorms see only
    the rank's heads, sequence-parallel norms only the rank's tokens."""
    if is_tp_sharded(param):
        return False
    return "q_layernorm" in name or "k_layernorm" in name or getattr(param, "sequence_parallel", False)


def sum_partial_over_tp(grads: list[torch.Tensor], tp_group, bucket_numel: int) -> None:
    """Sum ``grads`` (the ``is_tp_partial`` ones, any shapes) over ``tp_group``, in place."""
    _all_reduce(grads, tp_group, average=False, bucket_numel=bucket_numel)


def average_over_dp(grads: list[torch.Tensor], dp_group, bucket_numel: int) -> None:
    """Average ``grads`` (every trainable parameter's, any shapes) over ``dp_group``, in place."""
    _all_reduce(grads, dp_group, average=True, bucket_numel=bucket_numel)


def _all_reduce(grads: list[torch.Tensor], group, *, average: bool, bucket_numel: int) -> None:
    """One all-reduce per bucket of consecutive grads (at most ``bucket_numel`` elements unless a
    single grad is larger, all on one device): few large messages instead of one per tensor."""
    if group_or_none(group) is None:
        return
    bucket: list[torch.Tensor] = []
    numel = 0
    for g in grads:
        if bucket and (numel + g.numel() > bucket_numel or g.device != bucket[0].device):
            _all_reduce_bucket(bucket, group, average)
            bucket, numel = [], 0
        bucket.append(g)
        numel += g.numel()
    if bucket:
        _all_reduce_bucket(bucket, group, average)


def _all_reduce_bucket(bucket: list[torch.Tensor], group, average: bool) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    all_reduce(flat, group)  # SUM, then divide: gloo has no AVG
    if average:
        flat /= group_size(group)
    offset = 0
    for g in bucket:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_scatter_over_dp(flat: torch.Tensor, dp_group) -> torch.Tensor:
    """DP rank r's slice ``[r * S, (r + 1) * S)`` of ``flat`` averaged over ``dp_group``, where
    ``S = flat.numel() / DP`` (``flat``: 1-D, a multiple of DP long). ``flat`` itself alone."""
    if group_or_none(dp_group) is None:
        return flat
    out = flat.new_empty(flat.numel() // group_size(dp_group))
    reduce_scatter_into(out, flat, dp_group)  # SUM, then divide: gloo has no AVG
    out /= group_size(dp_group)
    return out


def all_gather_over_dp(local: torch.Tensor, dp_group) -> torch.Tensor:
    """Every DP rank's ``local`` (1-D, the same length everywhere) end to end in rank order: the
    inverse of ``reduce_scatter_over_dp``'s split. ``local`` itself alone."""
    if group_or_none(dp_group) is None:
        return local
    out = local.new_empty(group_size(dp_group) * local.numel())
    all_gather_into(out, local, dp_group)
    return out


def grad_norm(params: list[torch.Tensor], grads: list[torch.Tensor], *, device, tp_group,
              dp_group=None) -> float:
    """The global L2 norm of ``grads``, where ``grads[k]`` belongs to ``params[k]`` (whole or a
    part of it): TP shards summed over ``tp_group``, replicas counted once. ``dp_group``: sum over
    it too, for ZeRO-1 where each DP rank holds different slices; leave it None when the gradients
    are already the same on every DP rank. ``device``: where the sum lives (the collectives'
    device, also when this rank holds no gradient). nan and inf pass through."""
    sharded = [g for p, g in zip(params, grads) if is_tp_sharded(p)]
    replicated = [g for p, g in zip(params, grads) if not is_tp_sharded(p)]

    def sum_sq(gs):
        if not gs:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack(torch._foreach_norm(gs)).double().square().sum()

    # Replicas count on TP rank 0 only; the other ranks multiply theirs by 0 rather than drop
    # them, so an inf/nan in a replica on any rank still makes the norm non-finite everywhere.
    total = sum_sq(sharded) + sum_sq(replicated) * (1.0 if group_rank(tp_group) == 0 else 0.0)
    for group in (dp_group, tp_group):
        all_reduce(total, group)
    return math.sqrt(total.item())
