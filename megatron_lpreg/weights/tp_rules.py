"""How one Megatron parameter is cut into tensor-parallel shards, and glued back.

Pure tensor arithmetic, no names and no collectives: ``table.py`` says which rule applies to which
parameter. Every ``shard`` takes the full HF tensor(s) and returns TP rank ``rank``'s shard; every
``merge`` takes the shards of all ranks (ordered by TP rank) and returns the full HF tensor(s).
Megatron's ColumnParallelLinear/VocabParallelEmbedding give rank r the r-th contiguous block of
dim 0; RowParallelLinear the r-th contiguous block of dim 1.
"""

from __future__ import annotations

import enum

import torch


class Split(enum.Enum):
    REPLICATED = "replicated"  # every rank holds the full tensor (norm weights)
    ROW = "row"  # dim 1 split: RowParallelLinear (o_proj, down_proj)
    VOCAB = "vocab"  # dim 0 split after zero-padding rows to the padded vocabulary
    QKV = "qkv"  # q, k, v fused and interleaved per query group, then dim 0 split by groups
    GATE_UP = "gate_up"  # gate and up each dim 0 split; rank r holds [gate_r; up_r]


def shard_replicated(full: torch.Tensor) -> torch.Tensor:
    return full


def merge_replicated(shards: list[torch.Tensor]) -> torch.Tensor:
    # Ranks hold identical copies (the optimizer all-reduces their gradients); take rank 0's.
    return shards[0]


def shard_row(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """[out, in] -> [out, in / tp]: rank's block of input columns."""
    # contiguous() copies when tp > 1, so the shard does not pin (or serialise) the full tensor.
    return full.chunk(tp, dim=1)[rank].contiguous()


def merge_row(shards: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(shards, dim=1)


def shard_vocab(full: torch.Tensor, rank: int, tp: int, padded_vocab: int) -> torch.Tensor:
    """[vocab, hidden] -> [padded_vocab / tp, hidden]; padding rows (ids >= vocab) are zero.

    Zero padding rows give padding logits of exactly 0 for the output layer; the loss code never
    lets them count (it slices them off), so their value only has to be finite.
    """
    local = padded_vocab // tp
    start = rank * local
    real = full[start:start + local]  # shorter than ``local`` (maybe empty) on the last ranks
    if real.shape[0] == local:
        return real if tp == 1 else real.clone()  # own memory, as in shard_row
    pad = real.new_zeros((local - real.shape[0],) + tuple(full.shape[1:]))
    return torch.cat([real, pad], dim=0)


def shard_vocab_into(out: torch.Tensor, full: torch.Tensor, rank: int) -> torch.Tensor:
    """shard_vocab written straight into ``out`` [padded_vocab / tp, hidden] (no padded copy:
    for a 150k vocabulary that copy is the converters' largest allocation)."""
    local = out.shape[0]
    real = full[rank * local:(rank + 1) * local]
    out[:real.shape[0]].copy_(real)
    out[real.shape[0]:].zero_()
    return out


def merge_vocab(shards: list[torch.Tensor], vocab: int) -> torch.Tensor:
    """Inverse of shard_vocab: concatenate and drop the padding rows (a view at tp=1)."""
    if len(shards) == 1:
        return shards[0][:vocab]
    return torch.cat(shards, dim=0)[:vocab]


def shard_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, tp: int, num_groups: int
) -> torch.Tensor:
    """HF q [heads*d, ...], k/v [groups*d, ...] -> rank's fused linear_qkv rows.

    Megatron lays linear_qkv out per query group g: the group's heads/groups query heads, then its
    key head, then its value head (d rows each). HF's GQA gives query head h the KV head
    h // (heads/groups), so query heads of group g are the consecutive block g*(heads/groups)...
    Rank r holds groups [r*groups/tp, (r+1)*groups/tp). Works for weights and (1-D) biases.
    """
    per_rank = num_groups // tp
    groups = slice(rank * per_rank, (rank + 1) * per_rank)
    rest = tuple(q.shape[1:])
    parts = [t.reshape((num_groups, -1) + rest)[groups] for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape((-1,) + rest)


def merge_qkv(
    shards: list[torch.Tensor], num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of shard_qkv: the ranks' fused rows -> full HF q, k, v."""
    full = torch.cat(shards, dim=0)
    rest = tuple(full.shape[1:])
    q_rows = num_heads // num_groups * head_dim
    grouped = full.reshape((num_groups, q_rows + 2 * head_dim) + rest)
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape((-1,) + rest) for t in (q, k, v))


def shard_gate_up(gate: torch.Tensor, up: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """HF gate/up [ffn, hidden] -> [2*ffn/tp, hidden] = [gate_r; up_r].

    Megatron's gated MLP chunks each rank's fc1 output in two and applies the activation to the
    first half, so the gate half must come first on every rank (not globally).
    """
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)


def merge_gate_up(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([g for g, _ in halves], dim=0), torch.cat([u for _, u in halves], dim=0)


# -- place: one rank's shard written straight into the full HF tensor(s), in place ---------------
# The shared-memory refit (weights/shared_refit.py) has every rank write its own shard into the
# engine's weights, so nothing is gathered or merged. Each ``place_*`` is the inverse of its
# ``shard_*`` for one rank; placing every rank's shard reproduces ``merge_*``.


def place_replicated(shard: torch.Tensor, full: torch.Tensor) -> None:
    full.copy_(shard)


def place_row(shard: torch.Tensor, full: torch.Tensor, rank: int, tp: int) -> None:
    full.chunk(tp, dim=1)[rank].copy_(shard)


def place_vocab(shard: torch.Tensor, full: torch.Tensor, rank: int) -> None:
    """Padding rows (ids >= vocab) of the shard have no place in the HF tensor."""
    local = shard.shape[0]
    real = full[rank * local:(rank + 1) * local]
    real.copy_(shard[:real.shape[0]])


def place_qkv(shard: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, tp: int,
              num_groups: int) -> None:
    per_rank = num_groups // tp
    groups = slice(rank * per_rank, (rank + 1) * per_rank)
    rest = tuple(q.shape[1:])
    sizes = [t.shape[0] // num_groups for t in (q, k, v)]
    parts = shard.view((per_rank, sum(sizes)) + rest).split(sizes, dim=1)
    for full, part in zip((q, k, v), parts):
        full.view((num_groups, -1) + rest)[groups].copy_(part)


def place_gate_up(shard: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, rank: int, tp: int) -> None:
    g, u = shard.chunk(2, dim=0)
    gate.chunk(tp, dim=0)[rank].copy_(g)
    up.chunk(tp, dim=0)[rank].copy_(u)
