"""A step's rollouts on the device as flat tensors, and the micro-batches the passes read from them.

Layout. The N sequences of this rank lie end to end in one flat ``tokens`` tensor; every per-token
quantity of the response (old, proxy, reference and engine log-probs, entropies) lies end to end in
a flat [R] tensor, sequence i's R_i values at ``response_starts[i]``. They are made once per step on
the device and never copied back to the host; a micro-batch gathers the rows it needs into a padded
[B, S] view and scatters the pass's results straight back into the flat tensors.

Alignment (causal LM). Sequence ``prompt + response`` of length ``L = P + R``: the logits at
position t predict token t + 1, so ``targets[b, t] = tokens[b, t + 1]`` (pad at the end) and response
token j (``tokens[P + j]``) is predicted at position ``P - 1 + j``. Every per-token input sits at the
position of the logits that predict its token. Prompt ``[5, 6, 7]``, response ``[8, 9]``::

    position   0  1  2  3  4
    tokens     5  6  7  8  9
    targets    6  7  8  9  pad
    loss_mask  0  0  1  1  0
    old_lp     0  0  l0 l1 0
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["MicroBatch", "RolloutBatch", "microbatch", "padded_length", "token_budget_microbatches"]

logger = logging.getLogger(__name__)

PER_TOKEN_FIELDS = ("old_logprobs", "proxy_logprobs", "ref_logprobs", "engine_logprobs")


def _starts(lengths: Sequence[int]) -> list[int]:
    out, at = [], 0
    for n in lengths:
        out.append(at)
        at += n
    return out


def _flat(values, device) -> torch.Tensor:
    parts = [torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in values]
    return (torch.cat(parts) if parts else torch.zeros(0)).to(device)


@dataclass
class RolloutBatch:
    """This rank's N sequences and what the loss needs of them (see the module docstring).

    tokens: [sum(P_i + R_i)] long, the sequences end to end (on the training device).
    prompt_lens, response_lens: N ints each (host: the micro-batch plan is made from them), P_i >= 1.
    advantages: [N] float32 per sequence. trainable: [N] bool or None; a False sequence keeps its
        place (its group's advantages are computed) but none of its tokens enter the loss.
    old_logprobs / proxy_logprobs / ref_logprobs / engine_logprobs: [sum(R_i)] flat, or None.
    """

    tokens: torch.Tensor
    prompt_lens: list[int]
    response_lens: list[int]
    advantages: torch.Tensor
    trainable: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    proxy_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None
    lengths: list[int] = field(init=False)  # prompt + response, per sequence
    seq_starts: list[int] = field(init=False)
    response_starts: list[int] = field(init=False)

    def __post_init__(self):
        n = len(self.prompt_lens)
        if len(self.response_lens) != n:
            raise ValueError(f"prompt_lens ({n}) and response_lens ({len(self.response_lens)}) differ in length")
        for i, (p, r) in enumerate(zip(self.prompt_lens, self.response_lens)):
            if p < 1 or r < 0:
                raise ValueError(f"sequence {i}: need prompt_len >= 1 and response_len >= 0, got {p}, {r}")
        self.lengths = [p + r for p, r in zip(self.prompt_lens, self.response_lens)]
        total = sum(self.lengths)
        if self.tokens.dim() != 1 or self.tokens.numel() != total:
            raise ValueError(f"tokens must be 1-D with sum(prompt_lens + response_lens) = {total} entries, "
                             f"got shape {tuple(self.tokens.shape)}")
        if tuple(self.advantages.shape) != (n,):
            raise ValueError(f"advantages must have shape [{n}], got {tuple(self.advantages.shape)}")
        if self.trainable is not None and tuple(self.trainable.shape) != (n,):
            raise ValueError(f"trainable must have shape [{n}], got {tuple(self.trainable.shape)}")
        self.seq_starts = _starts(self.lengths)
        self.response_starts = _starts(self.response_lens)
        for name in PER_TOKEN_FIELDS:
            self._check_field(name, getattr(self, name))

    def _check_field(self, name: str, values) -> None:
        if values is not None and (values.dim() != 1 or values.numel() != self.response_tokens):
            raise ValueError(f"{name} must be 1-D with one value per response token ({self.response_tokens}), "
                             f"got shape {tuple(values.shape)}")

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], advantages,
                       device=None, trainable=None, **per_token) -> "RolloutBatch":
        """From N token lists (prompt + response); ``per_token`` fields as N per-sequence value lists."""
        prompt_lens = [int(p) for p in prompt_lens]
        flat = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)
        fields = {name: None if values is None else _flat(values, device) for name, values in per_token.items()}
        return cls(flat, prompt_lens, [len(s) - p for s, p in zip(sequences, prompt_lens)],
                   torch.as_tensor(advantages, dtype=torch.float32).to(device),
                   trainable=None if trainable is None else torch.as_tensor(trainable, dtype=torch.bool).to(device),
                   **fields)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def response_tokens(self) -> int:
        return sum(self.response_lens)

    def set(self, **per_token: torch.Tensor | None) -> None:
        """Attach flat per-token fields (e.g. the recomputed log-probs)."""
        for name, values in per_token.items():
            if name not in PER_TOKEN_FIELDS:
                raise KeyError(f"{name} is not a per-token field of RolloutBatch")
            self._check_field(name, values)
            setattr(self, name, values)

    def responses(self, values: torch.Tensor, rows: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per-sequence views of a flat [R] tensor (``rows``: which sequences; default all)."""
        rows = range(len(self)) if rows is None else rows
        return [values[self.response_starts[i]:self.response_starts[i] + self.response_lens[i]] for i in rows]

    def trained_mask(self) -> torch.Tensor:
        """[R] bool over the flat response tokens: True where the token enters the loss."""
        lens = torch.tensor(self.response_lens, device=self.advantages.device)
        keep = torch.ones(len(self), dtype=torch.bool, device=lens.device) if self.trainable is None else self.trainable
        return torch.repeat_interleave(keep, lens, output_size=self.response_tokens)

    def sequence_ids(self) -> torch.Tensor:
        """[R] long: the sequence each flat response token belongs to."""
        lens = torch.tensor(self.response_lens, device=self.advantages.device)
        return torch.repeat_interleave(torch.arange(len(self), device=lens.device), lens,
                                       output_size=self.response_tokens)

    def loss_tokens(self, rows: Sequence[int]) -> torch.Tensor:
        """0-d: response tokens of ``rows`` that enter the loss (a device count, no host sync)."""
        lens = torch.tensor([self.response_lens[i] for i in rows], dtype=torch.float64, device=self.advantages.device)
        if self.trainable is None:
            return lens.sum()
        return (lens * self.trainable[list(rows)]).sum()

    def loss_sequences(self, rows: Sequence[int]) -> torch.Tensor:
        """0-d: sequences of ``rows`` with a response token in the loss (``seq_mean_token_mean``'s count)."""
        keep = torch.tensor([self.response_lens[i] > 0 for i in rows], device=self.advantages.device)
        if self.trainable is not None:
            keep = keep & self.trainable[list(rows)]
        return keep.sum().to(torch.float64)


@dataclass
class MicroBatch:
    """Rows ``rows`` of a RolloutBatch, right-padded to [B, S] on the device.

    tokens, targets [B, S] long; loss_mask [B, S] bool; advantages [B];
    response_index [R_mb] long: flat positions in [B * S] of the logits that predict the rows'
    response tokens, in the batch's flat response order; response_slots [R_mb] long: where those
    tokens sit in the batch's flat per-token tensors.
    packed: the rows packed several to a row (``policy.packing``), or None.
    """

    rows: list[int]
    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    response_index: torch.Tensor
    response_slots: torch.Tensor
    batch: RolloutBatch
    seq_lens: list[int]
    packed: object = None

    def field(self, name: str) -> torch.Tensor | None:
        """The batch's flat per-token field ``name`` laid out [B, S] (0 off the responses)."""
        values = getattr(self.batch, name)
        if values is None:
            return None
        out = torch.zeros(self.tokens.shape, dtype=values.dtype, device=values.device)
        out.view(-1)[self.response_index] = values[self.response_slots]
        return out

    def response_targets(self) -> torch.Tensor:
        """[R_mb] long: the response tokens, in the order of ``response_index``."""
        return self.targets.reshape(-1)[self.response_index]

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """Compact per-response-token ``values`` [R_mb] -> [B, S] (0 elsewhere), differentiable."""
        flat = torch.zeros(self.tokens.numel(), dtype=values.dtype, device=values.device)
        return flat.index_copy(0, self.response_index, values).view(self.tokens.shape)

    def compact_index(self) -> torch.Tensor:
        """[B, S] long: each response position's row in the compact [R_mb] layout (-1 elsewhere)."""
        out = torch.full((self.tokens.numel(),), -1, dtype=torch.long, device=self.tokens.device)
        out[self.response_index] = torch.arange(self.response_index.numel(), device=out.device)
        return out.view(self.tokens.shape)

    def scatter(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """Write compact per-response-token ``values`` [R_mb] into the batch-wide flat [R] ``out``."""
        out[self.response_slots] = values.to(out.dtype)


def microbatch(batch: RolloutBatch, rows: Sequence[int], pad_id: int, pad_to_multiple: int = 1) -> MicroBatch:
    """Right-padded [B, S] tensors of sequences ``rows`` (S = longest, rounded up to the multiple).

    The index plan is built on the host from the lengths; the gathers run on the batch's device.
    """
    rows = [int(i) for i in rows]
    if not rows:
        raise ValueError("a micro-batch needs at least one sequence")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    for i in rows:
        if not 0 <= i < len(batch):
            raise IndexError(f"index {i} out of range for a batch of {len(batch)} sequences")
    lens = [batch.lengths[i] for i in rows]
    seq = padded_length(max(lens), pad_to_multiple)
    src, dst, tgt_src, tgt_dst, resp_idx, resp_slot = [], [], [], [], [], []
    for b, (i, n) in enumerate(zip(rows, lens)):
        start, p, r = batch.seq_starts[i], batch.prompt_lens[i], batch.response_lens[i]
        src.append(torch.arange(start, start + n))
        dst.append(torch.arange(b * seq, b * seq + n))
        tgt_src.append(torch.arange(start + 1, start + n))
        tgt_dst.append(torch.arange(b * seq, b * seq + n - 1))
        resp_idx.append(torch.arange(b * seq + p - 1, b * seq + p - 1 + r))
        resp_slot.append(torch.arange(batch.response_starts[i], batch.response_starts[i] + r))
    dev = batch.tokens.device
    src, dst, tgt_src, tgt_dst, resp_idx, resp_slot = (torch.cat(x).to(dev) for x in
                                                       (src, dst, tgt_src, tgt_dst, resp_idx, resp_slot))
    tokens = torch.full((len(rows), seq), pad_id, dtype=torch.long, device=dev)
    targets = torch.full_like(tokens, pad_id)
    tokens.view(-1)[dst] = batch.tokens[src]
    targets.view(-1)[tgt_dst] = batch.tokens[tgt_src]
    loss_mask = torch.zeros(tokens.shape, dtype=torch.bool, device=dev)
    if batch.trainable is None:
        loss_mask.view(-1)[resp_idx] = True
    else:
        response_lens = torch.tensor([batch.response_lens[i] for i in rows], device=dev)
        loss_mask.view(-1)[resp_idx] = torch.repeat_interleave(batch.trainable[rows], response_lens,
                                                               output_size=len(resp_idx))
    return MicroBatch(rows, tokens, targets, loss_mask, batch.advantages[rows], resp_idx, resp_slot, batch, lens)


def padded_length(length: int, pad_to_multiple: int = 1) -> int:
    """``length`` rounded up to a multiple of ``pad_to_multiple``."""
    return -(-length // pad_to_multiple) * pad_to_multiple


def token_budget_microbatches(lengths: Sequence[int], max_tokens: int, *, pad_to_multiple: int = 1) -> list:
    """Partition sequence indices into micro-batches of padded size ``<= max_tokens``.

    The padded size of a micro-batch is ``len(mb) * padded_length(max(lengths in mb), pad_to_multiple)``
    (what :func:`microbatch` allocates). Deterministic first-fit-decreasing: indices by length
    descending (ties by index) into bins, each bin's indices sorted, bins ordered by their smallest
    index. A sequence whose padded length alone exceeds ``max_tokens`` gets a micro-batch of its own
    and a warning (never dropped). Every index appears exactly once; empty input gives ``[]``.
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
        for b in open_bins:
            # b[0] >= plen (descending order), so adding i keeps the bin's max and costs b[0] tokens.
            if (len(b[1]) + 1) * b[0] <= max_tokens:
                b[1].append(i)
                break
        else:
            b = [plen, [i]]
            bins.append(b)
            open_bins.append(b)
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
