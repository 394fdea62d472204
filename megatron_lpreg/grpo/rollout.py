"""Generate and grade on one rank per tensor-parallel group, then share the result in the group.

The rollout engine and the reward pool live on TP rank 0 of each data-parallel replica (a
transformers engine on CPU holds the full model once, not once per TP rank); the other TP ranks
only need the token ids, rewards and engine log-probs to run their shard of the training passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.distributed as dist

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

    @property
    def response_lens(self) -> list[int]:
        return [len(c.token_ids) for c in self.completions]


def generate_and_grade(engine, pool, tokenizer, prompt_ids: list[list[int]], ground_truths: list[str],
                       sampling: SamplingParams) -> GradedRollout:
    """Run on the engine's rank: sample, decode (special tokens dropped) and grade."""
    start = time.perf_counter()
    groups = engine.generate(prompt_ids, sampling)
    completions = [c for group in groups for c in group]
    generated = time.perf_counter()
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    truths = [t for t in ground_truths for _ in range(sampling.n)]
    graded = pool.grade_batch_detailed(texts, truths)
    return GradedRollout(prompt_ids, completions, graded.rewards, graded.statuses, sampling.n,
                         generate_s=generated - start, reward_s=time.perf_counter() - generated)


def share_in_group(value, group, src_group_rank: int = 0):
    """Broadcast a picklable ``value`` from the group's ``src_group_rank`` to its other ranks."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src_group_rank), group=group)
    return box[0]
