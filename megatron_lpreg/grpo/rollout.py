"""Generate and grade, then share the result in the tensor-parallel group.

Where every TP rank of a replica has an engine over the same weights (the transformers engine on
CPU with the shared-memory refit: one copy of the model mapped by the whole group), each rank
generates and grades its own slice of the replica's prompts and the slices are gathered
(``merge_rollouts``). Otherwise the engine and the reward pool live on TP rank 0 and the result is
broadcast. Either way every TP rank ends with the same rollout: the token ids, rewards and engine
log-probs its shard of the training passes needs. The engine's log-probs travel as one tensor per
completion (``Completion``), never as Python lists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_lpreg.policy.batching import RolloutBatch
from megatron_lpreg.rollout.engine import Completion, SamplingParams


@dataclass
class GradedRollout:
    """``n`` completions per prompt, flattened prompt-major, with their rewards."""

    prompt_ids: list[list[int]]  # per prompt
    completions: list[Completion]  # per sequence (len(prompt_ids) * n)
    rewards: list[float]
    statuses: list[str]
    n: int
    generate_s: float = 0.0
    reward_s: float = 0.0
    metrics: dict = field(default_factory=dict)  # how it was collected (dynamic sampling's rounds)
    records: list = field(default_factory=list)  # per prompt: its PromptRecord (ground truth, source)
    texts: list[str] = field(default_factory=list)  # per sequence: the decoded response that was graded

    @property
    def response_lens(self) -> list[int]:
        return [len(c.token_ids) for c in self.completions]


def generate_and_grade(engine, pool, tokenizer, prompt_ids: list[list[int]], records: list,
                       sampling: SamplingParams, grade: bool = True) -> GradedRollout | None:
    """Run on the engine's rank: sample, decode (special tokens dropped) and grade against each
    prompt's ``PromptRecord`` (its ground truth; a custom reward also gets its source and extras).
    ``grade=False``: only join the engine's generate call (a vLLM shard whose leader grades): None."""
    start = time.perf_counter()
    groups = engine.generate(prompt_ids, sampling)
    if not grade:
        return None
    completions = [c for group in groups for c in group]
    generated = time.perf_counter()
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    per_seq = [r for r in records for _ in range(sampling.n)]
    graded = pool.grade_batch_detailed(texts, [r.ground_truth for r in per_seq], [r.data_source for r in per_seq],
                                       [r.extra_info for r in per_seq])
    return GradedRollout(prompt_ids, completions, graded.rewards, graded.statuses, sampling.n,
                         generate_s=generated - start, reward_s=time.perf_counter() - generated,
                         records=list(records), texts=texts)


def merge_rollouts(parts: list[GradedRollout]) -> GradedRollout:
    """The slices of one replica's prompts, generated side by side, as one rollout in slice order."""
    if len(parts) == 1:
        return parts[0]
    def joined(name: str) -> list:
        return [x for part in parts for x in getattr(part, name)]

    return GradedRollout(
        joined("prompt_ids"), joined("completions"), joined("rewards"), joined("statuses"), parts[0].n,
        generate_s=max(part.generate_s for part in parts), reward_s=max(part.reward_s for part in parts),
        records=joined("records"), texts=joined("texts"))


def prompt_slice(count: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``count`` prompts (the first ranks take one more)."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def to_batch(graded: GradedRollout, advantages: torch.Tensor, trainable, device) -> RolloutBatch:
    """The graded rollout as the trainer's flat device batch (one host-to-device copy per field)."""
    n = graded.n
    sequences = [graded.prompt_ids[i // n] + c.token_ids for i, c in enumerate(graded.completions)]
    return RolloutBatch.from_sequences(
        sequences, [len(graded.prompt_ids[i // n]) for i in range(len(sequences))], advantages, device=device,
        engine_logprobs=[c.logprobs for c in graded.completions], trainable=trainable)
