"""Refit in place into a vLLM engine shard: tensors written straight into vLLM's parameters.

Every trainer rank hosts its shard of an SPMD vLLM engine (``rollout/vllm_engine.py``), whose
parameters are plain tensors on every platform (``rollout/vllm_platform.py``). Two ways in:

* ``write_megatron`` (engine TP == trainer TP): this rank's Megatron shard goes into this rank's
  engine shard. Both split the same dimension in the same blocks, so most parameters are one
  ``copy_``; the differences are local and handled here:

  - QKV: Megatron's ``linear_qkv`` rows are interleaved per query group ([q_g; k_g; v_g] for its
    local groups g), vLLM's ``qkv_proj`` rows are [q_local; k_local; v_local]: a reorder by views
    (``copy_qkv_split``), no temporary.
  - gate/up: Megatron's local ``linear_fc1`` is [gate_r; up_r], as vLLM's ``gate_up_proj``: a copy.
    o_proj / down_proj: the same column block on both sides: a copy.
  - Vocabulary: Megatron pads the rows to a multiple of 128 x TP and gives rank r a block of
    ``padded / TP`` rows; vLLM pads to 64 and splits its own way (``shard_indices`` of its
    VocabParallelEmbedding / ParallelLMHead). Where the real-row ranges of the ranks differ, rows
    travel point to point within the TP group straight into the destination rows
    (``vocab_moves``); vLLM's padding rows are zeroed. No buffer unless the dtypes differ (then at
    most one shard).

  No gather and no full tensor: peak extra memory 0 (same dtype).
* ``write_hf`` (the gathered path, engine TP a proper divisor of trainer TP, and the engine's
  ``update_weights``): a full HF tensor, of which the engine rank's part is written. The caller
  holds one bucket of full tensors (``weights/stream.py``).

Names: vLLM's parameter names are the HF names with q/k/v fused into ``qkv_proj`` and gate/up into
``gate_up_proj`` (``engine_name``): derived from the weight table's HF names, here only. A tied
model has no ``lm_head``: vLLM's LM head shares the embedding's parameter.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from megatron_lpreg import faults
from megatron_lpreg.model.hf_config import ModelSpec
from megatron_lpreg.parallel import all_gather_object, exchange, group_rank, group_size
from megatron_lpreg.weights.table import Param, find_param, is_weight, model_params, param_for_hf
from megatron_lpreg.weights.tp_rules import Split

# HF projection -> (vLLM's fused projection, the HF tensor's place among its parts)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def engine_name(hf_name: str) -> tuple[str, int]:
    """vLLM's parameter holding HF tensor ``hf_name``, and the tensor's part in it (0 unless fused)."""
    *head, module, leaf = hf_name.split(".")
    if module in _FUSED:
        fused, part = _FUSED[module]
        return ".".join([*head, fused, leaf]), part
    return hf_name, 0


def copy_qkv_split(dest: torch.Tensor, shard: torch.Tensor, num_groups: int, q_rows: int, kv_rows: int) -> None:
    """Megatron's local linear_qkv rows -> vLLM's local qkv_proj rows, in place.

    ``shard``: [num_groups * (q_rows + 2 * kv_rows), ...] interleaved per query group
    ([q_g; k_g; v_g], ``q_rows`` = query heads per group x head_dim, ``kv_rows`` = head_dim);
    ``dest``: the same rows as [q (num_groups * q_rows); k; v]. Weights and (1-D) biases.
    """
    rest = tuple(shard.shape[1:])
    src = shard.view((num_groups, q_rows + 2 * kv_rows) + rest)
    q, k, v = src.split([q_rows, kv_rows, kv_rows], dim=1)
    dq, dk, dv = dest.split([num_groups * q_rows, num_groups * kv_rows, num_groups * kv_rows], dim=0)
    dq.view((num_groups, q_rows) + rest).copy_(q)
    dk.view((num_groups, kv_rows) + rest).copy_(k)
    dv.view((num_groups, kv_rows) + rest).copy_(v)


def vocab_moves(src_rows: Sequence[range], dst_rows: Sequence[range]) -> list[tuple[int, int, range]]:
    """Which real vocabulary rows go from which source rank to which destination rank.

    ``src_rows[s]``: the global rows rank s holds (Megatron; real rows only), ``dst_rows[d]``: the
    global rows rank d must hold (vLLM). Returns (s, d, rows) for every non-empty overlap."""
    moves = []
    for s, src in enumerate(src_rows):
        for d, dst in enumerate(dst_rows):
            rows = range(max(src.start, dst.start), min(src.stop, dst.stop))
            if len(rows):
                moves.append((s, d, rows))
    return moves


def megatron_vocab_rows(local_rows: int, vocab_size: int, tp_size: int) -> list[range]:
    """The real rows of each Megatron rank's vocabulary shard of ``local_rows`` (padded) rows."""
    return [range(min(r * local_rows, vocab_size), min((r + 1) * local_rows, vocab_size)) for r in range(tp_size)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class EngineShard:
    """One engine rank's parameters (vLLM names, plain tensors) and how tensors are written there.

    ``model``: the in-process vLLM model of this rank; ``rank``/``size``: its engine TP rank and
    size. ``vocab_rows``: global real rows this rank's vocabulary parameters hold, by vLLM name."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, rank: int, size: int):
        self.spec, self.rank, self.size = spec, rank, size
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.vocab_rows: dict[str, range] = {}
        for p in model_params(spec):
            if p.split is Split.VOCAB:
                name = engine_name(p.hf[0])[0]
                idx = model.get_submodule(name.rsplit(".", 1)[0]).shard_indices
                self.vocab_rows[name] = range(idx.org_vocab_start_index, idx.org_vocab_end_index)

    def target(self, param: Param) -> torch.Tensor:
        return self.params[engine_name(param.hf[0])[0]]

    @torch.no_grad()
    def write_hf(self, hf_name: str, full: torch.Tensor) -> int:
        """This engine rank's part of the full HF tensor ``hf_name``; returns the bytes written
        (0 for a tensor the model does not use, e.g. a tied model's lm_head)."""
        param = param_for_hf(self.spec, hf_name)
        if param is None:
            return 0
        name, part = engine_name(hf_name)
        dest = self.params[name]
        split = param.split
        if split is Split.REPLICATED:
            out, src = dest, full
        elif split is Split.ROW:
            out, src = dest, full.chunk(self.size, dim=1)[self.rank]
        elif split is Split.VOCAB:
            rows = self.vocab_rows[name]
            dest[len(rows):].zero_()
            out, src = dest[:len(rows)], full[rows.start:rows.stop]
        else:  # QKV, GATE_UP: each HF tensor's rows split evenly (whole heads), at its offset
            local = [shape[0] // self.size for shape in param.hf_shapes]
            offset = sum(local[:part])
            out, src = dest[offset:offset + local[part]], full.chunk(self.size, dim=0)[self.rank]
        if tuple(out.shape) != tuple(src.shape):
            raise ValueError(f"vLLM {name}: engine rank {self.rank}/{self.size} holds {tuple(out.shape)} of "
                             f"{hf_name}, the part to write is {tuple(src.shape)}")
        out.copy_(src)
        return _nbytes(out)


class ShardRefit:
    """Engine TP == trainer TP: every rank writes its own Megatron shards into its own engine shard.

    Constructing it is collective over the TP group (the ranks tell each other which vocabulary
    rows their engine shards hold)."""

    def __init__(self, shard: EngineShard, tp_group):
        self.shard, self.tp_group = shard, tp_group
        if shard.size != group_size(tp_group) or shard.rank != group_rank(tp_group):
            raise ValueError(f"engine rank {shard.rank}/{shard.size} is not TP rank "
                             f"{group_rank(tp_group)}/{group_size(tp_group)}: use the gathered refit")
        mine = {name: (rows.start, rows.stop) for name, rows in shard.vocab_rows.items()}
        every = all_gather_object(mine, tp_group)
        self.engine_vocab_rows = {name: [range(*r[name]) for r in every] for name in mine}

    @torch.no_grad()
    def __call__(self, model, spec: ModelSpec, te: bool = False, stats=None) -> None:
        """Write every parameter of ``model`` (this rank's Megatron shard); adds to ``stats``
        (a RefitStats): bytes written by this rank, the largest extra buffer."""
        start = time.perf_counter()
        for name, p in model.named_parameters():
            if not is_weight(name):
                continue
            param = find_param(spec, name, te)
            faults.point("refit")
            written, extra = self._write(param, p.detach())
            if stats is not None:
                stats.bytes += written
                stats.tensors += 1
                stats.largest_extra_bytes = max(stats.largest_extra_bytes, extra)
        if stats is not None:
            stats.buckets += 1
            stats.seconds += time.perf_counter() - start

    def _write(self, param: Param, shard: torch.Tensor) -> tuple[int, int]:
        """(bytes written, extra bytes held) for one Megatron parameter."""
        spec, dest = self.shard.spec, self.shard.target(param)
        if param.split is Split.VOCAB:
            return self._write_vocab(param, shard, dest)
        if tuple(dest.shape) != tuple(shard.shape):
            raise ValueError(f"Megatron {param.megatron} shard {tuple(shard.shape)} does not match vLLM's "
                             f"{engine_name(param.hf[0])[0]} {tuple(dest.shape)}")
        if param.split is Split.QKV:
            groups = spec.num_kv_heads // self.shard.size
            copy_qkv_split(dest, shard, groups, spec.num_attention_heads // spec.num_kv_heads * spec.head_dim,
                           spec.head_dim)
        else:  # replicated, row (same column block), gate/up ([gate_r; up_r] on both sides)
            dest.copy_(shard)
        return _nbytes(dest), 0

    def _write_vocab(self, param: Param, shard: torch.Tensor, dest: torch.Tensor) -> tuple[int, int]:
        name = engine_name(param.hf[0])[0]
        rank, size = self.shard.rank, self.shard.size
        src_rows = megatron_vocab_rows(shard.shape[0], self.shard.spec.vocab_size, size)
        dst_rows = self.engine_vocab_rows[name]
        mine = dst_rows[rank]
        sends, receives, extra = [], [], 0
        for s, d, rows in vocab_moves(src_rows, dst_rows):
            src = shard[rows.start - s * shard.shape[0]:rows.stop - s * shard.shape[0]]
            out = dest[rows.start - dst_rows[d].start:rows.stop - dst_rows[d].start]
            if s == rank and d == rank:
                out.copy_(src)
            elif s == rank:
                sends.append((src, d))
            elif d == rank:
                receives.append((out, s))
        staged = []
        if receives and dest.dtype != shard.dtype:  # receive in the sender's dtype, then cast
            staged = [(out, torch.empty(out.shape, dtype=shard.dtype, device=out.device)) for out, _ in receives]
            extra = sum(_nbytes(b) for _, b in staged)
            receives = [(b, s) for (_, b), (_, s) in zip(staged, receives)]
        if sends or receives:
            exchange(sends, receives, self.tp_group)
        for out, buffer in staged:
            out.copy_(buffer)
        dest[len(mine):].zero_()  # vLLM's padding rows
        return _nbytes(dest[:len(mine)]), extra
