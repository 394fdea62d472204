"""The two Megatron passes of a GRPO step over this rank's sequences.

``recompute_logprobs``: one no-grad pass giving, per response token, the old log-prob (pi_old is
the policy that generated the rollout, recomputed by the trainer), the Lp-Reg proxy log-prob, its
kept mass and the entropy: all from one ``vocab_parallel_token_stats`` call per micro-batch, so the
proxy costs one extra partition sum and all-reduce, not a second pass. With a reference model
(``loss.ref_kl_coef > 0``) one more forward per micro-batch gives the reference log-probs.

``train``: the mini-batch updates. Micro-batches are formed by a token budget; each micro-batch
loss is weighted so the accumulated gradient is that of the whole mini-batch's loss (verl's
dynamic-batch weighting), and the optimiser averages it over data-parallel ranks. Exact for
``seq_mean_token_mean`` (weight: the micro-batch's surviving sequences over the mini-batch's, all
DP ranks) and ``global_token_mean``; ``token_mean`` weighs a micro-batch's token mean by its rows. On-policy
(``on_policy_scores``: one mini-batch, one epoch, nothing that must see the whole batch's
log-probs before the first update) ``train`` takes the old log-probs, proxy and entropies from its
own forward, detached, and the separate pass is not run: the weights have not moved yet, so they
are the numbers that pass would give (TRL and verl do the same).

Only the positions that predict a response token go through the LM head and the vocabulary-wide
statistics (the decoder still sees every token). Results stay on the device: scores are flat [R]
tensors in the batch's response order, metrics 0-d tensors summed into a MetricSums that the step
reduces once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lpreg import faults
from megatron_lpreg.grpo.mismatch import tis_weights
from megatron_lpreg.loss import (
    LpRegConfig, lp_reg_policy_loss_tensors, selection_thresholds, vocab_parallel_forward_kl_to_proxy,
    vocab_parallel_reverse_kl_to_proxy, vocab_parallel_token_stats,
)
from megatron_lpreg.model.build import model_logits
from megatron_lpreg.parallel import all_reduce, group_or_none
from megatron_lpreg.policy.batching import MicroBatch, RolloutBatch, microbatch, token_budget_microbatches
from megatron_lpreg.policy.metric_sums import MetricSums
from megatron_lpreg.policy.packing import pack_rows, thd_params, token_budget_packs
from megatron_lpreg.policy.throughput import Stopwatch


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
    thd: bool = False  # packed rows through megatron's THD path (Transformer Engine), not a block mask
    ref_model: object = None  # frozen initial policy, built only for loss.ref_kl_coef > 0
    # The min-p proxy even when Lp-Reg is off: which sampled tokens lie in its support is what the
    # sampled-token metrics report for every method (logging.sampled_token_metrics).
    min_p_support: bool = False

    def wants_proxy(self, loss_cfg: LpRegConfig) -> bool:
        return loss_cfg.enabled or self.min_p_support


@dataclass
class Scores:
    """Flat [R] per response token, the batch's order (RolloutBatch's layout), float32 (float64 for a
    float64 model)."""

    old_logprobs: torch.Tensor
    entropy: torch.Tensor
    proxy_logprobs: torch.Tensor  # -inf everywhere when Lp-Reg is off (the loss never reads it)
    kept_mass: torch.Tensor | None = None  # Lp-Reg: M = pi_old(K) of the min-p proxy
    ref_logprobs: torch.Tensor | None = None

    @classmethod
    def empty(cls, tokens: int, pc: "PolicyContext", loss_cfg: LpRegConfig, reference: bool = False) -> "Scores":
        # float32 at least (bf16 statistics are computed in float32), float64 for a float64 model.
        dtype = torch.promote_types(torch.float32, next(pc.model.parameters()).dtype)
        zeros = lambda: torch.zeros(tokens, dtype=dtype, device=pc.device)  # noqa: E731
        wanted = pc.wants_proxy(loss_cfg)
        proxy = zeros() if wanted else torch.full((tokens,), float("-inf"), dtype=dtype, device=pc.device)
        return cls(zeros(), zeros(), proxy, zeros() if wanted else None, zeros() if reference else None)

    def write(self, mb: MicroBatch, stats) -> None:
        """A micro-batch's per-response-token stats (compact [R_mb]) into their flat places."""
        mb.scatter(self.old_logprobs, stats.logprobs.detach())
        mb.scatter(self.entropy, stats.entropy.detach())
        if self.kept_mass is not None:
            mb.scatter(self.proxy_logprobs, stats.proxy_logprobs)
            mb.scatter(self.kept_mass, stats.kept_mass)


def on_policy_scores(loss_cfg: LpRegConfig, *, num_minibatches: int, epochs: int, ref_model, mask_seq_abs_diff) -> bool:
    """Whether ``train``'s own forward can give the old log-probs (no separate pass needed)."""
    batch_scope = loss_cfg.enabled and loss_cfg.percentile_scope != "microbatch"
    return (num_minibatches == 1 and epochs == 1 and not batch_scope and ref_model is None
            and mask_seq_abs_diff is None)


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
            mb.packed = pack_rows(mb, packs, pc.pad_id, pc.pad_to_multiple, thd=pc.thd)
        yield mb


def _response_logits(pc: PolicyContext, mb: MicroBatch, model=None) -> torch.Tensor:
    """Vocab-sharded logits [R_mb, V_local] of ``model`` (default: the policy) at the positions that
    predict the micro-batch's response tokens, in the batch's response order."""
    model = pc.model if model is None else model
    if mb.packed is None:
        return model_logits(model, mb.tokens, positions=mb.response_index)
    positions = mb.packed.index.reshape(-1)[mb.response_index]
    if pc.thd:  # TE ignores our mask: the rows end to end, segments by cu_seqlens
        return model_logits(model, mb.packed.tokens.reshape(1, -1), positions=positions,
                            packed_seq_params=thd_params(mb.packed))
    return model_logits(model, mb.packed.tokens, mb.packed.attention_mask, positions=positions)


@torch.no_grad()
def recompute_logprobs(pc: PolicyContext, batch: RolloutBatch, loss_cfg: LpRegConfig) -> Scores:
    """Old log-probs, entropies and, for Lp-Reg, the proxy log-probs and kept masses of every
    response token; with a reference model, its log-probs too."""
    pc.model.eval()
    scores = Scores.empty(batch.response_tokens, pc, loss_cfg, reference=pc.ref_model is not None)
    for mb in microbatches(pc, batch, list(range(len(batch)))):
        targets = mb.response_targets()
        stats = vocab_parallel_token_stats(
            _response_logits(pc, mb), targets, group=pc.tp_group, vocab_size=pc.vocab_size, entropy=True,
            proxy=pc.wants_proxy(loss_cfg), kappa=loss_cfg.kappa, threshold=loss_cfg.threshold, inplace=True)
        scores.write(mb, stats)
        if pc.ref_model is not None:
            ref = vocab_parallel_token_stats(
                _response_logits(pc, mb, pc.ref_model), targets, group=pc.tp_group, vocab_size=pc.vocab_size,
                entropy=False, proxy=False, inplace=True)
            mb.scatter(scores.ref_logprobs, ref.logprobs)
    return scores


def _exact_kl(pc: PolicyContext, logits: torch.Tensor, mb: MicroBatch, loss_cfg: LpRegConfig):
    """exact_kl callable for kl=forward/reverse: computes only the selected rows. The proxy comes
    from the current logits, detached: pi_old itself on the first (on-policy) mini-batch."""
    fn = vocab_parallel_forward_kl_to_proxy if loss_cfg.kl == "forward" else vocab_parallel_reverse_kl_to_proxy
    compact = mb.compact_index()

    def values(selected: torch.Tensor) -> torch.Tensor:
        rows = logits[compact[selected]]
        return fn(rows, rows.detach(), loss_cfg.kappa, loss_cfg.threshold, group=pc.tp_group,
                  vocab_size=pc.vocab_size)

    return values


def _dp_total(count: torch.Tensor, dp_group) -> int:
    """A mini-batch count summed over data-parallel ranks, at least 1 (one host sync)."""
    count = all_reduce(count.reshape(1), dp_group)
    return max(int(count.item()), 1)


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


@dataclass
class TrainResult:
    metrics: MetricSums
    steps: list  # one optimiser StepResult per mini-batch and epoch
    seconds: dict[str, float]  # time/train/forward, /backward, /optimizer
    scores: Scores | None = None  # from the training forward, when asked to (on-policy)


def train(pc: PolicyContext, batch: RolloutBatch, loss_cfg: LpRegConfig, optimizer, *, num_minibatches: int,
          epochs: int, tis_cap: float | None = None, scores_from_forward: bool = False) -> TrainResult:
    """``epochs`` passes of ``num_minibatches`` optimiser steps over ``batch`` (this DP rank's
    share). ``tis_cap``: truncated importance sampling against the engine's log-probs
    (``batch.engine_logprobs``), None = off. Sequences ``batch.trainable`` drops count nowhere
    (tokens, percentiles). ``scores_from_forward`` (only where ``on_policy_scores`` allows it): the
    batch has no old log-probs yet; the training forward gives them, and ``TrainResult.scores``."""
    if tis_cap is not None and batch.engine_logprobs is None:
        raise ValueError("tis_cap needs the engine's log-probs (RolloutBatch.engine_logprobs)")
    if scores_from_forward and (num_minibatches != 1 or epochs != 1):
        raise ValueError("scores_from_forward needs one mini-batch and one epoch (on_policy_scores)")
    pc.model.train()
    metrics, steps, clock = MetricSums(), [], Stopwatch(pc.device)
    scores = Scores.empty(batch.response_tokens, pc, loss_cfg) if scores_from_forward else None
    need_entropy = loss_cfg.entropy_coef > 0 or loss_cfg.high_entropy_fraction < 1.0 or scores_from_forward
    want_proxy = (loss_cfg.enabled and loss_cfg.proxy_source == "current") or \
        (scores_from_forward and pc.wants_proxy(loss_cfg))
    dp_group = group_or_none(pc.dp_group)
    for _ in range(epochs):
        for mini in _minibatches(len(batch), num_minibatches):
            thresholds = _batch_thresholds(pc, batch, mini, loss_cfg) \
                if loss_cfg.percentile_scope != "microbatch" and loss_cfg.enabled else None
            global_tokens = global_seqs = None
            if loss_cfg.loss_agg == "global_token_mean":
                global_tokens = _dp_total(batch.loss_tokens(mini), dp_group)
            elif loss_cfg.loss_agg == "seq_mean_token_mean":
                global_seqs = _dp_total(batch.loss_sequences(mini), dp_group)
            for mb in microbatches(pc, batch, mini):
                clock.start()
                logits = _response_logits(pc, mb)
                exact_kl = _exact_kl(pc, logits, mb, loss_cfg) if loss_cfg.enabled and loss_cfg.kl != "k3" else None
                stats = vocab_parallel_token_stats(
                    logits, mb.response_targets(), group=pc.tp_group, vocab_size=pc.vocab_size,
                    entropy=need_entropy, proxy=want_proxy, kappa=loss_cfg.kappa,
                    threshold=loss_cfg.threshold, inplace=exact_kl is None)
                if scores is not None:
                    scores.write(mb, stats)
                    old = mb.expand(stats.logprobs.detach())
                else:
                    old = mb.field("old_logprobs")
                # proxy_source=current (and on-policy): pi_proxy from pi_theta's logits as they are now.
                proxy = mb.expand(stats.proxy_logprobs) if want_proxy else mb.field("proxy_logprobs")
                tokens = mb.loss_mask.sum()
                pg_weight = None
                if tis_cap is not None:
                    pg_weight, tis = tis_weights(old, mb.field("engine_logprobs"), mb.loss_mask, tis_cap)
                    metrics.add(tis, weight=tokens)
                loss, m = lp_reg_policy_loss_tensors(
                    mb.expand(stats.logprobs), old, proxy, mb.advantages, mb.loss_mask, loss_cfg, exact_kl,
                    entropy=mb.expand(stats.entropy) if stats.entropy is not None else None, thresholds=thresholds,
                    global_tokens=global_tokens, ref_logprobs=mb.field("ref_logprobs"), pg_weight=pg_weight)
                if loss_cfg.loss_agg == "global_token_mean":
                    weight = float(pc.dp_size)  # the optimiser averages over DP; the sum is wanted
                elif loss_cfg.loss_agg == "seq_mean_token_mean":
                    # The micro-batch's mean is over its surviving sequences, so it weighs by them
                    # (not by its rows: dropped sequences would lend their weight to the survivors).
                    weight = mb.loss_mask.any(dim=-1).sum().to(loss.dtype) * (pc.dp_size / global_seqs)
                else:
                    weight = len(mb.rows) / len(mini)
                clock.lap("time/train/forward")
                (loss * weight).backward()
                clock.lap("time/train/backward")
                faults.point("train")
                metrics.add(m, weight=tokens)
                # Weighted as the gradient is: under seq_mean_token_mean the mini-batch's exact loss.
                metrics.add({"loss/policy": loss.detach()},
                            weight=weight if loss_cfg.loss_agg == "seq_mean_token_mean" else len(mb.rows))
            faults.point("optimizer", tensors=lambda: optimizer.grads())
            clock.start()
            steps.append(optimizer.step())
            clock.lap("time/train/optimizer")
    return TrainResult(metrics, steps, clock.seconds, scores)
