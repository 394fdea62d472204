"""Validation: avg@k accuracy per ``data_source``, as the paper reports it.

Sources listed in ``validation.samples`` (AIME, AIME25, AMC by default) are sampled k times at
``sampled_temperature`` and scored avg@k; every other source is decoded greedily once. Prompts are
split over the world's rollout engines (``rollout/layout.py``).
"""

from __future__ import annotations

import collections

from megatron_lpreg.policy.metric_sums import MetricSums
from megatron_lpreg.grpo.rollout import generate_and_grade
from megatron_lpreg.rollout.engine import SamplingParams


def source_sampling(source: str, vcfg, max_tokens: int, stop_ids: tuple[int, ...], seed: int) -> SamplingParams:
    k = vcfg.samples.get(source)
    if k:
        return SamplingParams(n=k, temperature=vcfg.sampled_temperature, max_tokens=max_tokens,
                              stop_token_ids=stop_ids, seed=seed)
    return SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, stop_token_ids=stop_ids, seed=seed)


def validate(engine, pool, tokenizer, records, prompt_ids, vcfg, *, max_tokens: int, stop_ids, seed: int,
             slot: int, slots: int, group, has_engine: bool, leader: bool = True,
             responses: list | None = None) -> dict[str, float]:
    """Metrics ``val/<source>/avg@k``, ``val/<source>/response_len`` and ``val/mean`` (the mean over
    sources). Collective over ``group``: engine ``slot`` of ``slots`` takes every slots-th prompt;
    ranks with an engine generate, the leaders' results count (``rollout/layout.py``).
    ``responses``: a list that receives this rank's graded rollouts (one ``GradedRollout`` per
    source), for sample files."""
    sums = MetricSums()
    if has_engine:
        by_source: dict[str, list[int]] = collections.defaultdict(list)
        for i in range(slot, len(records), slots):
            by_source[records[i].data_source].append(i)
        for source, idx in sorted(by_source.items()):
            sampling = source_sampling(source, vcfg, max_tokens, stop_ids, seed + slot)
            graded = generate_and_grade(engine, pool, tokenizer, [prompt_ids[i] for i in idx],
                                        [records[i] for i in idx], sampling, grade=leader)
            if graded is None:
                continue
            if responses is not None:
                responses.append(graded)
            name = f"val/{source}/avg@{sampling.n}"
            for reward, length in zip(graded.rewards, graded.response_lens):
                sums.add({name: reward, f"val/{source}/response_len": length})
    out = sums.reduce(group)
    scores = [v for k, v in out.items() if "/avg@" in k]
    if scores:
        out["val/mean"] = sum(scores) / len(scores)
    return out
