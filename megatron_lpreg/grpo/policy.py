"""The two Megatron passes of a GRPO step over this rank's sequences.

``score_rollouts``: one no-grad pass giving, per response token, the old log-prob (pi_old is the
policy that generated the rollout, recomputed by the trainer), the Lp-Reg proxy log-prob and the
entropy: all from one ``vocab_parallel_token_stats`` call per micro-batch, so the proxy costs one
extra partition sum and all-reduce, not a second pass. With ``loss.ref_kl_coef > 0`` the frozen
reference model adds one forward per micro-batch for the reference log-probs.

``train_on_rollouts``: the mini-batch updates. Micro-batches are formed by a token budget; each
micro-batch loss is weighted so the accumulated gradient is that of the whole mini-batch's loss
(verl's dynamic-batch weighting), and the optimiser averages it over data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lpreg import faults
from megatron_lpreg.grpo.batching import RolloutBatch, collate, token_budget_microbatches
from megatron_lpreg.grpo.metrics import MetricSums
from megatron_lpreg.grpo.packing import pack_rows, token_budget_packs
from megatron_lpreg.grpo.mismatch import tis_weights
from megatron_lpreg.loss import (
    LpRegConfig, lp_reg_policy_loss, selection_thresholds, vocab_parallel_forward_kl_to_proxy,
    vocab_parallel_reverse_kl_to_proxy, vocab_parallel_token_stats,
)
from megatron_lpreg.model.build import model_logits


@dataclass
class PolicyContext:
    """What the passes need to know about the model and its place in the world."""

    model: object
    vocab_size: int
    pad_id: int
    device: torch.device
    tp_group: object  # None at TP=1
    dp_group: object  # None at DP=1
    dp_size: int
    micro_batch_tokens: int
    pad_to_multiple: int = 1
    pack_sequences: bool = False  # several sequences per row, block-diagonal attention (grpo.packing)
    ref_model: object = None  # frozen initial policy, built only for loss.ref_kl_coef > 0


def _microbatches(pc: PolicyContext, batch: RolloutBatch, indices: list[int]):
    """(batch indices, collated data) per micro-batch; with packing, data["packed"] holds the rows
    the model runs on, the loss still sees ``collate``'s [B, S] layout."""
    lengths = [batch.lengths[i] for i in indices]
    if pc.pack_sequences:
        groups = token_budget_packs(lengths, pc.micro_batch_tokens, pad_to_multiple=pc.pad_to_multiple)
    else:
        groups = [[mb] for mb in token_budget_microbatches(lengths, pc.micro_batch_tokens,
                                                          pad_to_multiple=pc.pad_to_multiple)]
    for group in groups:
        packs = [[indices[j] for j in row] for row in group]
        rows = [i for pack in packs for i in pack]
        data = collate(batch, rows, pc.pad_id, pc.pad_to_multiple)
        if pc.pack_sequences:
            data["packed"] = pack_rows(data, packs, rows, pc.pad_id, pc.pad_to_multiple)
        yield rows, {k: v.to(pc.device) if hasattr(v, "to") else v for k, v in data.items()}


def _forward(pc: PolicyContext, data: dict, model=None):
    """(vocab-sharded logits, their targets, the PackedRows or None) of ``model`` (default: the
    policy): packed rows when packing."""
    model = pc.model if model is None else model
    packed = data.get("packed")
    if packed is None:
        return model_logits(model, data["tokens"]), data["targets"], None
    return model_logits(model, packed.tokens, packed.attention_mask), packed.targets, packed


def _unpack(packed, values):
    """Per-token values of the model's rows -> ``collate``'s [B, S] layout."""
    return values if packed is None or values is None else packed.unpack(values)


def _response_values(values: torch.Tensor, data: dict) -> list[torch.Tensor]:
    """Per-row response-token values [R_i] out of a [B, S] tensor laid out as ``collate`` does."""
    out = []
    for row, (p, r) in enumerate(zip(data["prompt_lens"].tolist(), data["response_lens"].tolist())):
        out.append(values[row, p - 1:p - 1 + r].detach().float().cpu())
    return out


@torch.no_grad()
def score_rollouts(pc: PolicyContext, batch: RolloutBatch, loss_cfg: LpRegConfig) -> dict[str, list]:
    """Old log-probs, proxy log-probs and kept masses M (Lp-Reg only), entropies and, with a reference
    model, the reference log-probs of every response token."""
    pc.model.eval()
    n = len(batch)
    out = {"old_logprobs": [None] * n, "proxy_logprobs": [None] * n, "entropy": [None] * n, "kept_mass": [None] * n}
    if pc.ref_model is not None:
        out["ref_logprobs"] = [None] * n
    for rows, data in _microbatches(pc, batch, list(range(n))):
        logits, targets, packed = _forward(pc, data)
        stats = vocab_parallel_token_stats(
            logits, targets, group=pc.tp_group, vocab_size=pc.vocab_size, entropy=True,
            proxy=loss_cfg.enabled, kappa=loss_cfg.kappa, threshold=loss_cfg.threshold, inplace=True,
        )
        del logits
        fields = {"old_logprobs": stats.logprobs, "entropy": stats.entropy}
        if loss_cfg.enabled:
            fields["proxy_logprobs"] = stats.proxy_logprobs
            fields["kept_mass"] = stats.kept_mass
        if pc.ref_model is not None:
            ref_logits, _, _ = _forward(pc, data, pc.ref_model)
            fields["ref_logprobs"] = vocab_parallel_token_stats(
                ref_logits, targets, group=pc.tp_group, vocab_size=pc.vocab_size, entropy=False,
                proxy=False, inplace=True).logprobs
            del ref_logits
        for name, values in fields.items():
            for i, v in zip(rows, _response_values(_unpack(packed, values), data)):
                out[name][i] = v
    if not loss_cfg.enabled:  # plain GRPO: the loss never reads it; keep the batch shape uniform
        out["proxy_logprobs"] = [torch.full_like(v, float("-inf")) for v in out["old_logprobs"]]
    return out


def _exact_kl(pc: PolicyContext, logits: torch.Tensor, loss_cfg: LpRegConfig, packed=None):
    """exact_kl callable for kl=forward/reverse: computes only the selected rows. The proxy comes
    from the current logits, detached: pi_old itself on the first (on-policy) mini-batch."""
    fn = vocab_parallel_forward_kl_to_proxy if loss_cfg.kl == "forward" else vocab_parallel_reverse_kl_to_proxy

    def values(selected: torch.Tensor) -> torch.Tensor:
        rows = logits[selected] if packed is None else packed.rows(logits, selected)
        return fn(rows, rows.detach(), loss_cfg.kappa, loss_cfg.threshold, group=pc.tp_group,
                  vocab_size=pc.vocab_size)

    return values


def _minibatches(n: int, num: int) -> list[list[int]]:
    size = n // num
    return [list(range(k * size, (k + 1) * size)) for k in range(num)]


def train_on_rollouts(pc: PolicyContext, batch: RolloutBatch, loss_cfg: LpRegConfig, optimizer, *,
                      num_minibatches: int, epochs: int, tis_cap: float | None = None) -> tuple[MetricSums, list]:
    """``epochs`` passes of ``num_minibatches`` optimiser steps over ``batch`` (this DP rank's
    share); returns the loss metrics and each optimiser step's result. ``tis_cap``: truncated
    importance sampling against the engine's log-probs (``batch.engine_logprobs``), None = off.
    Sequences ``batch.trainable`` drops count nowhere (tokens, percentiles)."""
    if tis_cap is not None and batch.engine_logprobs is None:
        raise ValueError("tis_cap needs the engine's log-probs (RolloutBatch.engine_logprobs)")
    pc.model.train()
    metrics = MetricSums()
    steps = []
    need_entropy = loss_cfg.entropy_coef > 0 or loss_cfg.high_entropy_fraction < 1.0
    current_proxy = loss_cfg.enabled and loss_cfg.proxy_source == "current"
    for _ in range(epochs):
        for mini in _minibatches(len(batch), num_minibatches):
            thresholds = None
            global_tokens = None
            if loss_cfg.percentile_scope != "microbatch" and loss_cfg.enabled:
                # The batch scopes rank log-probs over the whole mini-batch on all DP ranks; they are
                # taken before the update (pi_old), which is the current policy on-policy.
                masks = [torch.full((batch.response_lens[i],), batch.trained(i)) for i in mini]
                thresholds = selection_thresholds(
                    [batch.old_logprobs[i].unsqueeze(0) for i in mini],
                    [batch.advantages[i:i + 1] for i in mini],
                    [m.unsqueeze(0) for m in masks], loss_cfg, group=pc.dp_group)
            local_tokens = sum(batch.loss_tokens(i) for i in mini)
            if loss_cfg.loss_agg == "global_token_mean":
                t = torch.tensor([float(local_tokens)], dtype=torch.float64)
                if pc.dp_group is not None:
                    torch.distributed.all_reduce(t, group=pc.dp_group)
                global_tokens = max(int(t.item()), 1)
            for rows, data in _microbatches(pc, batch, mini):
                logits, targets, packed = _forward(pc, data)
                exact_kl = _exact_kl(pc, logits, loss_cfg, packed) if loss_cfg.enabled and loss_cfg.kl != "k3" \
                    else None
                stats = vocab_parallel_token_stats(
                    logits, targets, group=pc.tp_group, vocab_size=pc.vocab_size,
                    entropy=need_entropy, proxy=current_proxy, kappa=loss_cfg.kappa,
                    threshold=loss_cfg.threshold, inplace=exact_kl is None,
                )
                # proxy_source=current: pi_proxy from pi_theta's logits as they are now (no grad).
                proxy = _unpack(packed, stats.proxy_logprobs) if current_proxy else data["proxy_logprobs"]
                pg_weight = None
                if tis_cap is not None:
                    pg_weight, tis = tis_weights(data["old_logprobs"], data["engine_logprobs"],
                                                 data["loss_mask"], tis_cap)
                    metrics.add(tis, weight=float(data["loss_mask"].sum()))
                loss, m = lp_reg_policy_loss(
                    _unpack(packed, stats.logprobs), data["old_logprobs"], proxy, data["advantages"],
                    data["loss_mask"], loss_cfg, exact_kl, entropy=_unpack(packed, stats.entropy),
                    thresholds=thresholds, global_tokens=global_tokens, ref_logprobs=data.get("ref_logprobs"),
                    pg_weight=pg_weight,
                )
                if loss_cfg.loss_agg == "global_token_mean":
                    weight = float(pc.dp_size)  # the optimiser averages over DP; the sum is wanted
                else:
                    weight = len(rows) / len(mini)
                (loss * weight).backward()
                faults.point("train")
                metrics.add(m, weight=float(data["loss_mask"].sum()))
                metrics.add({"loss/policy": float(loss.detach())}, weight=len(rows))
            faults.point("optimizer", tensors=lambda: [p.grad for p in pc.model.parameters()])
            steps.append(optimizer.step())
    return metrics, steps

