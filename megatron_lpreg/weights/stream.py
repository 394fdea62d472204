"""Refit: stream a Megatron model's TP shards as full HF-named tensors, in size-bounded buckets.

The rollout engines take HF names and full tensors (vLLM shards them itself for its own TP). Each
bucket is one exchange over the TP group: the ranks pack their shards of the bucket's parameters
into one flat buffer, which is gathered (to one rank, or to all), then split and merged by the weight
table. To one rank the shards travel point to point straight into one receive buffer reused for
every bucket (a ``dist.gather`` into a list stages each bucket in a flat buffer of its own and
copies it out: measured 5x slower than the transfer on gloo). The yielded list is emptied when the
next bucket is asked for, so only one bucket's merged tensors are alive at a time (if the consumer
keeps no references). Peak extra memory: the receive buffer plus the merged tensors of one bucket,
whatever the model size; non-receiving ranks only hold their packed shards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_lpreg.model.hf_config import ModelSpec
from megatron_lpreg.parallel import all_gather, exchange, group_or_none, group_rank, group_size
from megatron_lpreg.weights.table import find_param, is_weight, to_hf

DEFAULT_BUCKET_BYTES = 512 * 1024**2


@dataclass
class RefitStats:
    """What one refit moved; the trainer logs it (``timing/refit``, ``refit/bytes``)."""

    bytes: int = 0  # full HF bytes delivered (per receiving rank); shared-memory and shard-to-shard: written by this rank
    buckets: int = 0
    tensors: int = 0
    seconds: float = 0.0
    largest_bucket_bytes: int = 0
    largest_extra_bytes: int = 0  # shard-to-shard: the largest buffer beyond the two models' own weights


def _buckets(params: list[tuple[str, torch.Tensor]], tp_size: int, bucket_bytes: int):
    """Consecutive parameters whose full size (shard bytes x TP) fits ``bucket_bytes``; a larger
    parameter is a bucket of its own."""
    bucket, size = [], 0
    for name, p in params:
        full = p.numel() * p.element_size() * tp_size
        if bucket and size + full > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, p))
        size += full
    if bucket:
        yield bucket


@torch.no_grad()
def stream_hf_weights(
    model,
    spec: ModelSpec,
    *,
    tp_group=None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dst_tp_rank: int | None = 0,
    te: bool = False,
    stats: RefitStats | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of (HF name, full tensor) built from ``model``'s TP shards (collective).

    ``model``: this rank's megatron GPTModel shard (its TP size is the group's size).
    ``dst_tp_rank``: the TP rank that receives full tensors (a CPU engine runs on one rank per TP
    group); None = every rank receives (an engine with its own TP over the same ranks). Ranks that
    do not receive still iterate (the generator drives the collectives) but get empty buckets.
    The yielded tensors are fresh or views of this rank's own shards, never of the reused receive
    buffer; the list is emptied when the next bucket is requested: consume it before then.
    """
    tp_group = group_or_none(tp_group)
    rank, tp_size = group_rank(tp_group), group_size(tp_group)
    receives = dst_tp_rank is None or rank == dst_tp_rank
    params = [(n, p) for n, p in model.named_parameters() if is_weight(n)]
    start = time.perf_counter()
    workspace: torch.Tensor | None = None  # the receiving rank's buffer for the other ranks' shards
    for bucket in _buckets(params, tp_size, bucket_bytes):
        dtype = bucket[0][1].dtype
        if any(p.dtype != dtype for _, p in bucket):
            raise TypeError(f"refit needs one dtype per bucket; got {sorted({str(p.dtype) for _, p in bucket})}")
        local = torch.cat([p.detach().reshape(-1) for _, p in bucket]) if len(bucket) > 1 else \
            bucket[0][1].detach().reshape(-1)
        if tp_size == 1:
            gathered = [local]
        elif dst_tp_rank is None:
            gathered = [torch.empty_like(local) for _ in range(tp_size)]
            all_gather(gathered, local, tp_group)
        else:
            gathered = None
            if receives:
                n = local.numel()
                need = n * (tp_size - 1)
                if workspace is None or workspace.numel() < need or workspace.dtype != local.dtype:
                    workspace = torch.empty(need, dtype=local.dtype, device=local.device)
                receives, gathered = [], []
                for r in range(tp_size):
                    if r == rank:
                        gathered.append(local)
                        continue
                    slot = workspace[len(receives) * n:(len(receives) + 1) * n]
                    receives.append((slot, r))
                    gathered.append(slot)
                exchange([], receives, tp_group)
            else:
                exchange([(local, dst_tp_rank)], [], tp_group)
        del local
        out: list[tuple[str, torch.Tensor]] = []
        if receives:
            offset = 0
            for name, p in bucket:
                n = p.numel()
                shards = [g[offset:offset + n].view(p.shape) for g in gathered]
                out.extend(to_hf(spec, find_param(spec, name, te), shards))
                offset += n
            del shards  # views that would keep the received buffers alive
            if workspace is not None:  # an engine may keep a tensor past this bucket: never the reused buffer
                base = workspace.untyped_storage().data_ptr()
                out = [(k, t.clone() if t.untyped_storage().data_ptr() == base else t) for k, t in out]
        del gathered
        if stats is not None:
            stats.buckets += 1
            nbytes = sum(t.numel() * t.element_size() for _, t in out)
            stats.bytes += nbytes
            stats.tensors += len(out)
            stats.largest_bucket_bytes = max(stats.largest_bucket_bytes, nbytes)
        yield out
        # Drop this bucket before building the next: the consumer's loop variable still points at
        # the list, so emptying it frees the tensors.
        out.clear()
    if stats is not None:
        stats.seconds += time.perf_counter() - start
