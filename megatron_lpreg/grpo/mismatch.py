"""Rollout/training mismatch: the engine's log-probs against the trainer's recomputed old log-probs.

The rollout engine (vLLM, transformers) samples with its own kernels and weights copy; the trainer
recomputes ``l_old`` with Megatron. In exact arithmetic they agree; in practice they differ by
precision, kernels, or a broken refit. Per response token t: ``d_t = l_old_t - l_engine_t``.

Metrics (all over valid response tokens; "sequence mean" = mean over that sequence's tokens):

* ``mismatch/logprob_abs_diff`` = token mean of ``|d_t|`` (0 = identical).
* ``mismatch/token_mult_prob_error`` = token mean of ``exp(|d_t|)``, NeMo-RL's definition
  (``masked_mean(exp(|generation_logprobs - prev_logprobs|))``): 1.0 = identical, 1.01 ~ a 1 %
  probability error per token.
* ``mismatch/seq_max_abs_diff`` = max over sequences of the sequence mean of ``|d_t|`` (the worst
  sequence; MAX over data-parallel ranks).

Corrections (``mismatch`` config section, both off by default):

* truncated importance sampling (TIS): the policy-gradient term of token t is multiplied by
  ``w_t = min(exp(d_t), C)``, detached, correcting for sampling from the engine's distribution rather
  than pi_old (the Lp-Reg term D_t is not weighted);
* sequence masking: a sequence whose mean ``|d_t|`` exceeds a threshold gets loss mask 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["mismatch_metrics", "sequence_abs_diffs", "tis_weights", "trainable_sequences"]


def _check(engine: Sequence[torch.Tensor], train: Sequence[torch.Tensor]) -> None:
    if len(engine) != len(train):
        raise ValueError(f"engine log-probs for {len(engine)} sequences, trainer log-probs for {len(train)}")
    for i, (e, t) in enumerate(zip(engine, train)):
        if e.shape != t.shape:
            raise ValueError(f"sequence {i}: engine log-probs {tuple(e.shape)} vs trainer {tuple(t.shape)}")


def sequence_abs_diffs(engine: Sequence[torch.Tensor], train: Sequence[torch.Tensor]) -> list[float]:
    """Per sequence, the mean ``|l_old - l_engine|`` over its response tokens (0 for an empty one)."""
    _check(engine, train)
    return [float((t.double() - e.double()).abs().mean()) if t.numel() else 0.0 for e, t in zip(engine, train)]


def mismatch_metrics(engine: Sequence[torch.Tensor], train: Sequence[torch.Tensor]) -> tuple[dict[str, float], int]:
    """(the three metrics over these sequences, their token count: the weight of the two means).

    ``engine``/``train``: per sequence, 1-D log-probs of its response tokens. No tokens -> ({}, 0).
    """
    _check(engine, train)
    tokens = sum(int(t.numel()) for t in train)
    if not tokens:
        return {}, 0
    diff = torch.cat([(t.double() - e.double()).abs() for e, t in zip(engine, train)])
    seq = [d for d, t in zip(sequence_abs_diffs(engine, train), train) if t.numel()]
    return {
        "mismatch/logprob_abs_diff": float(diff.mean()),
        "mismatch/token_mult_prob_error": float(diff.exp().mean()),
        "mismatch/seq_max_abs_diff": max(seq),
    }, tokens


def trainable_sequences(engine: Sequence[torch.Tensor], train: Sequence[torch.Tensor],
                        max_abs_diff: float) -> torch.Tensor:
    """[N] bool: sequences whose mean ``|l_old - l_engine|`` is at most ``max_abs_diff``."""
    return torch.tensor([d <= max_abs_diff for d in sequence_abs_diffs(engine, train)], dtype=torch.bool)


@torch.no_grad()
def tis_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance weights ``min(exp(l_old - l_engine), cap)`` [B, S] (1 off the mask) and
    their metrics over the mask: mean weight and the share of tokens whose ratio exceeded ``cap``."""
    mask = mask.bool()
    ratio = torch.exp(torch.where(mask, old_logprobs - engine_logprobs, torch.zeros_like(old_logprobs)))
    weights = ratio.clamp(max=cap)
    n = int(mask.sum())
    metrics = {}
    if n:
        metrics = {"mismatch/tis_weight_mean": float(weights[mask].double().mean()),
                   "mismatch/tis_capped": float((ratio[mask] > cap).double().mean())}
    return weights, metrics
