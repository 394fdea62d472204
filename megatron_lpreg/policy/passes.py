"""The two Megatron passes of a GRPO step over this rank's sequences.

``recompute_logprobs``: one no-grad pass giving, per response token, the old log-prob (pi_old is
the policy that generated the rollout, recomputed by the trainer), the Lp-Reg proxy log-prob, its
kept mass and the entropy: all from one ``vocab_parallel_token_stats`` call per micro-batch, so the
proxy costs one extra partition sum and all-reduce, not a second pass. With a reference model
(``loss.ref_kl_coef > 0``) one more forward per micro-batch gives the reference log-probs.

``train``: the mini-batch updates. Micro-batches are formed by a token budget; each micro-batch
loss is weighted so the accumulated gradient is that of the whole mini-batch's loss (verl's
dynamic-batch weighting), and the optimiser averages it over data-parallel ranks.

Results stay on the device: scores are flat [R] tensors in the batch's response order, metrics
0-d tensors summed into a MetricSums that the step reduces once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lpreg import faults
from megatron_lpreg.grpo.mismatch import tis_weights
from megatron_lpreg.loss import (
    LpRegConfig, lp_reg_policy_loss, selection_thresholds, vocab_parallel_forward_kl_to_proxy,
    vocab_parallel_reverse_kl_to_proxy, vocab_parallel_token_stats,
)
from megatron_lpreg.model.build import model_logits
from megatron_lpreg.parallel import group_or_none
from megatron_lpreg.policy.batching import MicroBatch, RolloutBatch, microbatch, token_budget_microbatches
from megatron_lpreg.policy.metric_sums import MetricSums
from megatron_lpreg.policy.packing import pack_rows, token_budget_packs


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
    pack_sequences: bool = False  # several sequences per row, block-diagonal attention (policy.packing)
    ref_model: object = None  # frozen initial policy, built only for loss.ref_kl_coef > 0


@dataclass
class Scores:
    """Flat [R] per response token, the batch's order (RolloutBatch's layout)."""

    old_logprobs: torch.Tensor
    entropy: torch.Tensor
    proxy_logprobs: torch.Tensor  # -inf everywhere when Lp-Reg is off (the loss never reads it)
    kept_mass: torch.Tensor | None = None  # Lp-Reg: M = pi_old(K) of the min-p proxy
    ref_logprobs: torch.Tensor | None = None


def microbatches(pc: PolicyContext, batch: RolloutBatch, indices: list[int]):
    """The micro-batches of sequences ``indices`` by the token budget; packed rows when packing."""
    lengths = [batch.lengths[i] for i in indices]
    if pc.pack_sequences:
        groups = token_budget_packs(lengths, pc.micro_batch_tokens, pad_to_multiple=pc.pad_to_multiple)
    else:
        groups = [[mb] for mb in token_budget_microbatches(lengths, pc.micro_batch_tokens,
                                                          pad_to_multiple=pc.pad_to_multiple)]
    for group in groups:
        packs = [[indices[j] for j in row] for row in group]
        mb = microbatch(batch, [i for pack in packs for i in pack], pc.pad_id, pc.pad_to_multiple)
        if pc.pack_sequences:
            mb.packed = pack_rows(mb, packs, pc.pad_id, pc.pad_to_multiple)
        yield mb


def _forward(pc: PolicyContext, mb: MicroBatch, model=None):
    """(vocab-sharded logits, their targets) of ``model`` (default: the policy): the packed rows'
    when packing, whose per-token results ``_unpack`` maps back to the [B, S] layout."""
    model = pc.model if model is None else model
    if mb.packed is None:
        return model_logits(model, mb.tokens), mb.targets
    return model_logits(model, mb.packed.tokens, mb.packed.attention_mask), mb.packed.targets


def _unpack(mb: MicroBatch, values):
    return values if mb.packed is None or values is None else mb.packed.unpack(values)


@torch.no_grad()
def recompute_logprobs(pc: PolicyContext, batch: RolloutBatch, loss_cfg: LpRegConfig) -> Scores:
    """Old log-probs, entropies and, for Lp-Reg, the proxy log-probs and kept masses of every
    response token; with a reference model, its log-probs too."""
    pc.model.eval()
    empty = lambda: torch.zeros(batch.response_tokens, dtype=torch.float32, device=pc.device)  # noqa: E731
    out = {"old_logprobs": empty(), "entropy": empty()}
    if loss_cfg.enabled:
        out["proxy_logprobs"], out["kept_mass"] = empty(), empty()
    if pc.ref_model is not None:
        out["ref_logprobs"] = empty()
    for mb in microbatches(pc, batch, list(range(len(batch)))):
        logits, targets = _forward(pc, mb)
        stats = vocab_parallel_token_stats(
            logits, targets, group=pc.tp_group, vocab_size=pc.vocab_size, entropy=True,
            proxy=loss_cfg.enabled, kappa=loss_cfg.kappa, threshold=loss_cfg.threshold, inplace=True,
        )
        del logits
        fields = {"old_logprobs": stats.logprobs, "entropy": stats.entropy}
        if loss_cfg.enabled:
            fields["proxy_logprobs"], fields["kept_mass"] = stats.proxy_logprobs, stats.kept_mass
        if pc.ref_model is not None:
            ref_logits, _ = _forward(pc, mb, pc.ref_model)
            fields["ref_logprobs"] = vocab_parallel_token_stats(
                ref_logits, targets, group=pc.tp_group, vocab_size=pc.vocab_size, entropy=False,
                proxy=False, inplace=True).logprobs
            del ref_logits
        for name, values in fields.items():
            mb.scatter(out[name], _unpack(mb, values))
    if not loss_cfg.enabled:
        out["proxy_logprobs"] = torch.full_like(out["old_logprobs"], float("-inf"))
    return Scores(**out)


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


def _batch_thresholds(pc: PolicyContext, batch: RolloutBatch, rows: list[int], loss_cfg: LpRegConfig):
    """The batch scopes rank log-probs over the whole mini-batch on all DP ranks; they are taken
    before the update (pi_old), which is the current policy on-policy."""
    slots = torch.cat([torch.arange(batch.response_starts[i], batch.response_starts[i] + batch.response_lens[i])
                       for i in rows]).to(pc.device)
    old = batch.old_logprobs[slots]
    adv = batch.advantages[batch.sequence_ids()[slots]]
    mask = batch.trained_mask()[slots]
    return selection_thresholds(old[None], adv[None], mask[None], loss_cfg, group=pc.dp_group)


def train(pc: PolicyContext, batch: RolloutBatch, loss_cfg: LpRegConfig, optimizer, *, num_minibatches: int,
          epochs: int, tis_cap: float | None = None) -> tuple[MetricSums, list]:
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
    dp_group = group_or_none(pc.dp_group)
    for _ in range(epochs):
        for mini in _minibatches(len(batch), num_minibatches):
            thresholds = _batch_thresholds(pc, batch, mini, loss_cfg) \
                if loss_cfg.percentile_scope != "microbatch" and loss_cfg.enabled else None
            global_tokens = None
            if loss_cfg.loss_agg == "global_token_mean":
                t = batch.loss_tokens(mini).reshape(1)
                if dp_group is not None:
                    torch.distributed.all_reduce(t, group=dp_group)
                global_tokens = max(int(t.item()), 1)
            for mb in microbatches(pc, batch, mini):
                logits, targets = _forward(pc, mb)
                exact_kl = _exact_kl(pc, logits, loss_cfg, mb.packed) if loss_cfg.enabled and loss_cfg.kl != "k3" \
                    else None
                stats = vocab_parallel_token_stats(
                    logits, targets, group=pc.tp_group, vocab_size=pc.vocab_size,
                    entropy=need_entropy, proxy=current_proxy, kappa=loss_cfg.kappa,
                    threshold=loss_cfg.threshold, inplace=exact_kl is None,
                )
                old = mb.field("old_logprobs")
                # proxy_source=current: pi_proxy from pi_theta's logits as they are now (no grad).
                proxy = _unpack(mb, stats.proxy_logprobs) if current_proxy else mb.field("proxy_logprobs")
                tokens = mb.loss_mask.sum()
                pg_weight = None
                if tis_cap is not None:
                    pg_weight, tis = tis_weights(old, mb.field("engine_logprobs"), mb.loss_mask, tis_cap)
                    metrics.add(tis, weight=tokens)
                loss, m = lp_reg_policy_loss(
                    _unpack(mb, stats.logprobs), old, proxy, mb.advantages, mb.loss_mask, loss_cfg, exact_kl,
                    entropy=_unpack(mb, stats.entropy), thresholds=thresholds, global_tokens=global_tokens,
                    ref_logprobs=mb.field("ref_logprobs"), pg_weight=pg_weight,
                )
                if loss_cfg.loss_agg == "global_token_mean":
                    weight = float(pc.dp_size)  # the optimiser averages over DP; the sum is wanted
                else:
                    weight = len(mb.rows) / len(mini)
                (loss * weight).backward()
                faults.point("train")
                metrics.add(m, weight=tokens)
                metrics.add({"loss/policy": loss.detach()}, weight=len(mb.rows))
            faults.point("optimizer", tensors=lambda: [p.grad for p in pc.model.parameters()])
            steps.append(optimizer.step())
    return metrics, steps
