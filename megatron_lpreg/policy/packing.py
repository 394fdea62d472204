"""Sequence packing: several sequences share a row, kept apart by the attention.

Two ways to keep them apart, one per layer spec:
- local spec (CPU, and GPU without Transformer Engine): megatron-core's packed path (THD +
  ``PackedSeqParams``) needs TE or flash attention, but the local spec's attention takes an explicit
  mask, so a row holding several sequences is packed exactly with a block-diagonal causal mask: a
  token attends only to earlier tokens of its own sequence. Positions need no reset: RoPE scores
  depend only on the distance between query and key, which packing does not change (megatron's
  RoPE ignores ``position_ids``).
- Transformer Engine: TE's attention applies its own causal mask and ignores ours, so the rows go
  through megatron's THD path instead (``thd_params``): all rows end to end as one [1, R * L] batch,
  ``cu_seqlens`` marking where each sequence (and each row's trailing padding) starts; TE attends
  within those segments and megatron's RoPE restarts its positions at each one. Not run yet: TE
  builds only with CUDA, and no GPU has run this code (README, "On a GPU").

Rows are as long as the micro-batch's longest sequence (rounded up to ``pad_to_multiple``), and short
sequences fill them first-fit-decreasing. So the attention's cost (rows x L^2 for a dense mask) never
exceeds the padded layout's, while the linear layers and the vocab projection see far fewer pad
tokens. One long row holding the whole micro-batch would cost L_total^2 in attention instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_lpreg.policy.batching import MicroBatch, padded_length

logger = logging.getLogger(__name__)


def token_budget_packs(lengths: Sequence[int], max_tokens: int, *, pad_to_multiple: int = 1) -> list:
    """Micro-batches of packed rows: a list (micro-batches) of lists (rows) of sequence indices.

    Sequences in descending length (ties by index) go first-fit into rows; a micro-batch's rows are
    as long as its first (longest) sequence's padded length L, and it holds at most
    ``max(1, max_tokens // L)`` rows, so it costs ``rows * L <= max_tokens`` tokens (a sequence longer
    than the budget gets a micro-batch of its own, with a warning). Every index appears once.
    """
    if max_tokens < 1 or pad_to_multiple < 1:
        raise ValueError(f"max_tokens ({max_tokens}) and pad_to_multiple ({pad_to_multiple}) must be >= 1")
    lengths = [int(x) for x in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    mbs: list = []  # each: [row length, max rows, rows, free space per row]
    oversized = []
    for i in order:
        n = lengths[i]
        placed = False
        for mb in mbs:
            length, max_rows, rows, free = mb
            for r, space in enumerate(free):
                if n <= space:
                    rows[r].append(i)
                    free[r] -= n
                    placed = True
                    break
            if not placed and len(rows) < max_rows:
                rows.append([i])
                free.append(length - n)
                placed = True
            if placed:
                break
        if not placed:
            length = padded_length(max(n, 1), pad_to_multiple)
            if length > max_tokens:
                oversized.append(i)
            mbs.append([length, max(1, max_tokens // length), [[i]], [length - n]])
    if oversized:
        logger.warning("token_budget_packs: %d sequence(s) exceed max_tokens=%d on their own: indices %s",
                       len(oversized), max_tokens, sorted(oversized))
    return [mb[2] for mb in mbs]


@dataclass
class PackedRows:
    """A micro-batch's sequences packed into rows, and the map back to its padded [B, S] layout.

    tokens, targets: [R, L] long (targets are each sequence's own next tokens, pad at its end);
    attention_mask: [R, 1, L, L] bool, True where masked (another sequence, or a later position);
    None for THD (``pack_rows(thd=True)``), which keeps the segments apart by ``cu_seqlens``;
    index: [B, S] long, flat position in [R * L] of row b's token t; valid: [B, S] bool, t < len_b;
    cu_seqlens: [K + 1] int32, the start of each of the K segments of the flat [R * L] tokens (each
    sequence, then each row's trailing padding as a segment of its own) and R * L at the end;
    max_seqlen: the longest segment.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor | None
    index: torch.Tensor
    valid: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def thd_params(packed: PackedRows):
    """megatron-core's ``PackedSeqParams`` for ``packed`` as one [1, R * L] THD batch (TE only)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=packed.cu_seqlens, cu_seqlens_kv=packed.cu_seqlens,
                           max_seqlen_q=packed.max_seqlen, max_seqlen_kv=packed.max_seqlen)


def pack_rows(mb: MicroBatch, rows: Sequence[Sequence[int]], pad_id: int, pad_to_multiple: int = 1,
              thd: bool = False) -> PackedRows:
    """Pack the micro-batch ``mb`` into ``rows`` (lists of batch indices out of ``mb.rows``, as
    ``token_budget_packs`` gives them), on ``mb``'s device. ``thd``: for megatron's THD path (no
    [R, 1, L, L] mask, see ``thd_params``)."""
    seq_lens = mb.seq_lens
    where = {int(i): b for b, i in enumerate(mb.rows)}
    bsz, seq = mb.tokens.shape
    length = padded_length(max(sum(seq_lens[where[i]] for i in row) for row in rows), pad_to_multiple)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)  # trailing pads: a segment of their own
    index = torch.zeros(bsz, seq, dtype=torch.long)
    segment_lens = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            b = where[int(i)]
            n = seq_lens[b]
            segments[r, at:at + n] = b
            index[b, :n] = torch.arange(r * length + at, r * length + at + n)
            at += n
            segment_lens.append(n)
        if at < length:
            segment_lens.append(length - at)
    cu_seqlens = torch.tensor([0, *segment_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    valid = torch.arange(seq).unsqueeze(0) < torch.tensor(seq_lens).unsqueeze(1)
    dev = mb.tokens.device
    index, valid = index.to(dev), valid.to(dev)
    tokens = torch.full((len(rows) * length,), pad_id, dtype=torch.long, device=dev)
    targets = torch.full_like(tokens, pad_id)
    tokens[index[valid]] = mb.tokens[valid]
    targets[index[valid]] = mb.targets[valid]
    mask = None
    if not thd:
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)
        mask = ((segments.unsqueeze(2) != segments.unsqueeze(1)) | causal).unsqueeze(1).to(dev)
    return PackedRows(tokens.view(len(rows), length), targets.view(len(rows), length), mask, index, valid,
                      cu_seqlens.to(dev), max(segment_lens))
