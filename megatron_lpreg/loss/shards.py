"""Helpers shared by the vocab-parallel statistics: shard geometry, chunking, reductions, checks.

Sharding convention (megatron-core's): logits are [T, V_local] with TP rank r holding the contiguous
global ids [r * V_local, (r + 1) * V_local). Megatron pads the vocabulary up to a multiple of its
divisor times TP; ids >= ``vocab_size`` are padding. Padding always sits at the end of the global
vocabulary, so on every rank the real columns are a prefix of the shard and padding can be dropped
by slicing (a view, no copy) instead of masking.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lpreg.parallel import all_reduce

# Per-chunk working set. Small enough to stay in cache and below glibc's largest mmap threshold
# (32 MiB): larger temporaries are fresh mmaps that page-fault on every chunk (measured ~3x slower).
DEFAULT_CHUNK_BYTES = 4 << 20

_DEBUG = os.environ.get("MEGATRON_LPREG_DEBUG", "") not in ("", "0")


def set_debug(enabled: bool) -> None:
    """Debug mode checks every logits chunk for NaN/Inf and raises instead of propagating."""
    global _DEBUG
    _DEBUG = bool(enabled)


def debug_enabled() -> bool:
    return _DEBUG


@dataclass(frozen=True)
class VocabShard:
    start: int  # global id of local column 0
    local_size: int  # V_local, padding included
    valid: int  # leading local columns that are real vocabulary
    global_size: int  # real vocabulary size (padding excluded)
    group: object
    world: int
    rank: int


def vocab_shard(logits: torch.Tensor, group, vocab_size: int | None) -> VocabShard:
    """Geometry of this rank's shard of the last dimension of ``logits``."""
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    local = logits.shape[-1]
    padded = local * world
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size={vocab_size} must be in (0, {padded}] (V_local={local} x TP={world})"
        )
    start = rank * local
    valid = min(max(vocab_size - start, 0), local)
    return VocabShard(start, local, valid, vocab_size, group, world, rank)


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (reference tests); everything else is reduced in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def chunk_rows(n_cols: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is None:
        return max(1, DEFAULT_CHUNK_BYTES // (4 * max(n_cols, 1)))
    return chunk_tokens


def chunk_slices(n_rows: int, n_cols: int, chunk_tokens: int | None):
    step = chunk_rows(n_cols, chunk_tokens)
    for begin in range(0, n_rows, step):
        yield slice(begin, min(begin + step, n_rows))


def all_reduce_max(t: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    return all_reduce(t, shard.group, "max") if shard.world > 1 else t


def all_reduce_sum(t: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    return all_reduce(t, shard.group, "sum") if shard.world > 1 else t


def local_columns(logits_rows: torch.Tensor, shard: VocabShard, dtype: torch.dtype) -> torch.Tensor:
    """The real (unpadded) columns of a row chunk, in the compute dtype."""
    z = logits_rows[:, : shard.valid]
    return z.to(dtype) if z.dtype != dtype else z


def row_max(z: torch.Tensor) -> torch.Tensor:
    """Row max of a chunk; -inf for a rank whose shard is all padding."""
    if z.shape[1] == 0:
        return torch.full((z.shape[0],), -math.inf, dtype=z.dtype, device=z.device)
    return z.amax(dim=1)


def target_index(target: torch.Tensor, shard: VocabShard):
    """(owned, local_idx): whether this rank holds each target id, and its clamped local column."""
    local = target - shard.start
    owned = (local >= 0) & (local < shard.valid)
    return owned, torch.where(owned, local, torch.zeros_like(local))


def check_targets(target: torch.Tensor, shard: VocabShard, fn: str) -> None:
    """Out-of-range ids would silently read as nobody's token: refuse them.

    On the CPU reading the range back costs nothing, so it is checked here with a clear error. On an
    accelerator that read would stall the host once per micro-batch; there the check is a
    device-side assert (the run stops at the next sync with the message), or the host check in
    debug mode.
    """
    if target.numel() == 0:
        return
    if target.device.type != "cpu" and not _DEBUG:
        torch._assert_async(((target >= 0) & (target < shard.global_size)).all(),
                            f"{fn}: target ids must be in [0, {shard.global_size})")
        return
    lo, hi = torch.aminmax(target)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= shard.global_size:
        raise ValueError(
            f"{fn}: target ids must be in [0, {shard.global_size}), got min {lo}, max {hi}"
        )


def check_finite(z: torch.Tensor, rows: slice, shard: VocabShard, fn: str, what: str = "logits") -> None:
    """Debug-mode guard: name the first bad row instead of letting NaN reach the loss."""
    if not _DEBUG:
        return
    bad = ~torch.isfinite(z).all(dim=1)
    if bool(bad.any()):
        first = rows.start + int(bad.nonzero()[0, 0])
        raise FloatingPointError(
            f"{fn}: non-finite {what} at token row {first} "
            f"({int(bad.sum())} bad rows in rows {rows.start}..{rows.stop - 1}) on TP rank {shard.rank}"
        )


def check_kappa(kappa: float) -> float:
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0, 1], got {kappa}")
    return kappa


@functools.lru_cache(maxsize=64)
def just_below(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` below ``value``: ``x > just_below(k)`` is ``x >= k`` exactly.

    Cached: it is a host computation on a constant, asked for per chunk and per call.
    """
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.zeros_like(v)))


def kept_mask(e: torch.Tensor, sumexp: torch.Tensor | None, kappa: float, threshold: str):
    """Proxy kept set K of one chunk, ties kept (the reference code uses >=).

    e = exp(z - max_v z) with the global max, so e_v = p_v / max p. minp: p_v >= kappa max p is
    e_v >= kappa and needs no partition sum; fixed: p_v >= kappa is e_v >= kappa * sum(e). Every
    kept-set decision (proxy log-prob, kept mass, both KLs) goes through these comparisons on the
    same e values, so they agree to the last bit.
    """
    if threshold == "minp":
        return e > just_below(kappa, e.dtype)
    if threshold == "fixed":
        return e >= (kappa * sumexp).unsqueeze(1)
    raise ValueError(f"threshold must be 'minp' or 'fixed', got {threshold!r}")


def dot_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise sum of a * b (vecdot: ~4x faster than bmm here and no [rows, V] temporary)."""
    return torch.linalg.vecdot(a, b, dim=1)


def flatten_rows(logits: torch.Tensor, *others: torch.Tensor | None):
    """[..., V] -> [T, V] (and [...] -> [T] for the others), plus the leading shape to restore."""
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    rest = tuple(None if o is None else o.reshape(-1) for o in others)
    return lead, flat, rest
