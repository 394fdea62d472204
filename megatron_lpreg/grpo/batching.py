"""Rollout storage, token-budget micro-batching and collation for GRPO training.

Alignment convention (causal LM, used by :func:`collate`)
---------------------------------------------------------
A sequence is ``tokens = prompt + response`` of length ``L = P + R``.  The model's logits at position
``t`` predict token ``t + 1``, so :func:`collate` returns ``targets[b, t] = tokens[b, t + 1]`` (``pad_id``
at the last real position and beyond).  Everything *per target token* lives at the position of the
logits that predict it:

* ``loss_mask[b, t]`` is True iff ``targets[b, t]`` is a response token, i.e. ``P - 1 <= t <= L - 2``
  (exactly ``R`` positions);
* response token ``j`` (0-based, ``tokens[P + j]``) is predicted at position ``t = P - 1 + j``, and the
  per-token inputs (``old_logprobs[j]``, ``proxy_logprobs[j]``) are scattered there.

Example: prompt ``[5, 6, 7]``, response ``[8, 9]``::

    position   0  1  2  3  4
    tokens     5  6  7  8  9
    targets    6  7  8  9  pad
    loss_mask  0  0  1  1  0
    old_lp     0  0  l0 l1 0

so ``logprobs = log_softmax(logits).gather(-1, targets[..., None])`` lines up with ``old_logprobs`` and
``loss_mask`` without any further shifting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = [
    "RolloutBatch", "collate", "padded_length", "split_for_data_parallel", "token_budget_microbatches",
]

logger = logging.getLogger(__name__)

PER_TOKEN_FIELDS = ("old_logprobs", "proxy_logprobs", "ref_logprobs", "engine_logprobs")


@dataclass
class RolloutBatch:
    """N generated sequences plus what the policy loss needs for them.

    Attributes:
        input_ids: N 1-D LongTensors, each ``prompt + response`` (no padding).
        prompt_lens: N prompt lengths ``P_i`` (>= 1, so the first response token has a predicting position).
        response_lens: N response lengths ``R_i`` (>= 0); ``len(input_ids[i]) == P_i + R_i``.
        advantages: [N] per-sequence advantages (broadcast over the sequence's response tokens).
        old_logprobs: optional N 1-D tensors of length ``R_i``: log-prob of each response token under
            the behaviour policy, in response order (index j <-> token ``input_ids[i][P_i + j]``).
        proxy_logprobs: optional, same layout as ``old_logprobs`` (Lp-Reg proxy policy).
        ref_logprobs: optional, same layout (the frozen reference policy of ``loss.ref_kl_coef``).
        engine_logprobs: optional, same layout: the rollout engine's own log-probs of the sampled
            tokens (rollout/training mismatch, truncated importance sampling).
        rewards: optional [N] rewards (bookkeeping only).
        trainable: optional [N] bool; a False sequence keeps its place in the batch (its group's
            advantages are already computed) but none of its tokens enter the loss
            (``reward.mask_truncated``, DAPO's overlong filtering; ``mismatch.mask_seq_abs_diff``).
    """

    input_ids: list
    prompt_lens: list
    response_lens: list
    advantages: torch.Tensor
    old_logprobs: Optional[list] = None
    proxy_logprobs: Optional[list] = None
    engine_logprobs: Optional[list] = None
    rewards: Optional[torch.Tensor] = None
    ref_logprobs: Optional[list] = None
    trainable: Optional[torch.Tensor] = None

    def __post_init__(self):
        n = len(self.input_ids)
        if len(self.prompt_lens) != n or len(self.response_lens) != n:
            raise ValueError(
                f"prompt_lens ({len(self.prompt_lens)}) and response_lens ({len(self.response_lens)}) "
                f"must have one entry per sequence ({n})"
            )
        self.advantages = torch.as_tensor(self.advantages)
        if tuple(self.advantages.shape) != (n,):
            raise ValueError(f"advantages must have shape [{n}], got {tuple(self.advantages.shape)}")
        if self.rewards is not None:
            self.rewards = torch.as_tensor(self.rewards)
            if tuple(self.rewards.shape) != (n,):
                raise ValueError(f"rewards must have shape [{n}], got {tuple(self.rewards.shape)}")
        if self.trainable is not None:
            self.trainable = torch.as_tensor(self.trainable, dtype=torch.bool)
            if tuple(self.trainable.shape) != (n,):
                raise ValueError(f"trainable must have shape [{n}], got {tuple(self.trainable.shape)}")
        for i, (ids, p, r) in enumerate(zip(self.input_ids, self.prompt_lens, self.response_lens)):
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
                raise ValueError(f"input_ids[{i}] must be a 1-D tensor")
            if p < 1 or r < 0:
                raise ValueError(f"sequence {i}: need prompt_len >= 1 and response_len >= 0, got {p}, {r}")
            if ids.numel() != p + r:
                raise ValueError(f"sequence {i}: len(input_ids)={ids.numel()} != prompt_len + response_len = {p + r}")
        for name in PER_TOKEN_FIELDS:
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != n:
                raise ValueError(f"{name} must have one tensor per sequence ({n}), got {len(values)}")
            for i, (v, r) in enumerate(zip(values, self.response_lens)):
                if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.numel() != r:
                    raise ValueError(f"{name}[{i}] must be a 1-D tensor of response length {r}")

    def __len__(self) -> int:
        return len(self.input_ids)

    def loss_tokens(self, i: int) -> int:
        """Response tokens of sequence ``i`` that enter the loss."""
        return int(self.response_lens[i]) if self.trained(i) else 0

    def trained(self, i: int) -> bool:
        """Whether sequence ``i`` takes part in the loss (``trainable``)."""
        return self.trainable is None or bool(self.trainable[i])

    @property
    def lengths(self) -> list:
        """Total (prompt + response) length of each sequence."""
        return [int(x.numel()) for x in self.input_ids]


def padded_length(length: int, pad_to_multiple: int = 1) -> int:
    """``length`` rounded up to a multiple of ``pad_to_multiple``."""
    return -(-length // pad_to_multiple) * pad_to_multiple


def token_budget_microbatches(lengths: Sequence[int], max_tokens: int, *, pad_to_multiple: int = 1) -> list:
    """Partition sequence indices into micro-batches of padded size ``<= max_tokens``.

    The padded size of a micro-batch is ``len(mb) * padded_length(max(lengths in mb), pad_to_multiple)``
    (what :func:`collate` allocates).  Heuristic (deterministic): sort indices by length descending
    (ties by index), first-fit-decreasing into bins, then sort each bin's indices ascending and order
    the bins by their smallest index.  A sequence whose padded length alone exceeds ``max_tokens`` is
    placed in a micro-batch by itself and logged as a warning (never dropped).  Every index appears
    exactly once; empty input gives ``[]``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    lengths = [int(x) for x in lengths]
    if any(x < 0 for x in lengths):
        raise ValueError("lengths must be non-negative")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    # Each bin: [padded max length (its first item, since items arrive in descending order), indices].
    bins: list = []
    open_bins: list = []  # bins that may still accept items, in creation order
    oversized = []
    for i in order:
        plen = padded_length(lengths[i], pad_to_multiple)
        if plen > max_tokens:
            oversized.append(i)
            bins.append([plen, [i]])
            continue
        placed = False
        for b in open_bins:
            # b[0] >= plen (descending order), so adding i keeps the bin's max and costs b[0] tokens.
            if (len(b[1]) + 1) * b[0] <= max_tokens:
                b[1].append(i)
                placed = True
                break
        if not placed:
            b = [plen, [i]]
            bins.append(b)
            open_bins.append(b)
        # Drop bins that cannot take even a zero-length item any more.
        open_bins = [b for b in open_bins if (len(b[1]) + 1) * b[0] <= max_tokens]
    if oversized:
        logger.warning(
            "token_budget_microbatches: %d sequence(s) exceed max_tokens=%d on their own and get a "
            "micro-batch each: indices %s (padded lengths %s)",
            len(oversized), max_tokens, sorted(oversized),
            [padded_length(lengths[i], pad_to_multiple) for i in sorted(oversized)],
        )
    mbs = [sorted(b[1]) for b in bins]
    mbs.sort(key=lambda mb: mb[0])
    return mbs


def collate(batch: RolloutBatch, indices: Sequence[int], pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Right-padded tensors for the micro-batch ``indices`` of ``batch`` (see module docstring).

    Returns a dict with (B = len(indices), S = padded_length(max length, pad_to_multiple)):
        tokens [B, S] long, padded with ``pad_id``;
        targets [B, S] long, ``targets[:, t] = tokens[:, t + 1]`` for real positions, ``pad_id`` elsewhere;
        loss_mask [B, S] bool, True where ``targets`` is a response token of a trainable sequence;
        position_ids [B, S] long, ``0..S-1`` (right padding + causal attention needs no attention mask);
        advantages [B] float32;
        old_logprobs / proxy_logprobs / ref_logprobs [B, S] float32 (only if present in ``batch``), response token
            ``j`` at position ``prompt_len - 1 + j``, 0.0 elsewhere;
        seq_lens, prompt_lens, response_lens [B] long; indices [B] long (rows of ``batch``).
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("collate needs at least one index")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    n = len(batch)
    for i in indices:
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a batch of {n} sequences")
    bsz = len(indices)
    lens = [int(batch.input_ids[i].numel()) for i in indices]
    seq = padded_length(max(lens), pad_to_multiple)
    tokens = torch.full((bsz, seq), pad_id, dtype=torch.long)
    targets = torch.full((bsz, seq), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((bsz, seq), dtype=torch.bool)
    per_token = {
        name: torch.zeros((bsz, seq), dtype=torch.float32)
        for name in PER_TOKEN_FIELDS if getattr(batch, name) is not None
    }
    for row, (i, length) in enumerate(zip(indices, lens)):
        p, r = int(batch.prompt_lens[i]), int(batch.response_lens[i])
        ids = batch.input_ids[i].to(torch.long)
        tokens[row, :length] = ids
        targets[row, : length - 1] = ids[1:]
        # Positions p-1 .. p+r-2 predict the response tokens p .. p+r-1.
        loss_mask[row, p - 1 : p - 1 + r] = batch.trained(i)
        for name, out in per_token.items():
            out[row, p - 1 : p - 1 + r] = getattr(batch, name)[i].to(torch.float32)
    result = {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(bsz, seq).contiguous(),
        "advantages": batch.advantages[indices].to(torch.float32),
        "seq_lens": torch.tensor(lens, dtype=torch.long),
        "prompt_lens": torch.tensor([int(batch.prompt_lens[i]) for i in indices], dtype=torch.long),
        "response_lens": torch.tensor([int(batch.response_lens[i]) for i in indices], dtype=torch.long),
        "indices": torch.tensor(indices, dtype=torch.long),
    }
    result.update(per_token)
    return result


def split_for_data_parallel(n: int, dp_size: int, dp_rank: int) -> list:
    """Indices ``[dp_rank * n / dp_size, (dp_rank + 1) * n / dp_size)`` of a batch of ``n`` sequences.

    Advantages are computed over whole groups *before* splitting, so the split need not keep groups
    together; any equal split is fine.  Equal shares keep every rank doing the same number of
    optimizer-step contributions, so ``n`` must be divisible by ``dp_size`` (ValueError otherwise).
    """
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n % dp_size != 0:
        raise ValueError(f"batch of {n} sequences cannot be split equally across {dp_size} data-parallel ranks")
    share = n // dp_size
    return list(range(dp_rank * share, (dp_rank + 1) * share))
