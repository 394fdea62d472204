"""DAPO dynamic sampling: train only on prompt groups whose rewards differ (off by default).

A group whose responses all earn the same reward (all right, all wrong) has zero advantage and
gives no policy gradient; with dynamic sampling it is dropped and further rounds of
``grpo.prompts_per_step`` prompts (the sampler's next batches, so the data position saved in a
checkpoint accounts for them) are generated until ``prompts_per_step`` groups are kept, at most
``grpo.max_sampling_rounds`` rounds. Kept groups beyond the target are discarded, as verl does.

Data parallelism: each DP replica generates its share of every round, so kept groups end up
unevenly spread. Every rank learns the per-round kept counts of all replicas (one small all-gather
per round), orders the kept groups globally by (round, replica, position), takes the first ones,
and the chosen groups are exchanged once so that every replica trains on an equal, contiguous
slice. TP ranks of a replica hold identical rollouts (``parallel.broadcast_object``) and gather over their own
DP group, so they reach identical batches without talking to each other.

At the cap verl stops the run with an error; here the step trains on the groups it has, trimmed
to a multiple of ``granule`` (DP size x mini-batches, so every rank and mini-batch gets an equal
share) and logged; if not even ``granule`` groups were kept, it trains on the first round as drawn
(all zero-advantage groups, as without dynamic sampling).
"""

from __future__ import annotations

import logging
from typing import Callable


from megatron_lpreg.grpo.rollout import GradedRollout
from megatron_lpreg.parallel import all_gather_object, group_or_none

logger = logging.getLogger(__name__)


def varied_groups(rewards: list[float], n: int) -> list[bool]:
    """Per group of ``n`` consecutive rewards: True if they are not all equal (non-zero advantage)."""
    if len(rewards) % n:
        raise ValueError(f"{len(rewards)} rewards do not form groups of {n}")
    return [max(rewards[i:i + n]) != min(rewards[i:i + n]) for i in range(0, len(rewards), n)]


def take_groups(graded: GradedRollout, groups: list[int]) -> GradedRollout:
    """The rollout restricted to the prompt groups ``groups`` (in that order)."""
    n = graded.n
    rows = [g * n + j for g in groups for j in range(n)]
    return GradedRollout([graded.prompt_ids[g] for g in groups], [graded.completions[i] for i in rows],
                         [graded.rewards[i] for i in rows], [graded.statuses[i] for i in rows], n,
                         records=[graded.records[g] for g in groups] if graded.records else [],
                         texts=[graded.texts[i] for i in rows] if graded.texts else [])


def concat(parts: list[GradedRollout], n: int) -> GradedRollout:
    out = GradedRollout([], [], [], [], n)
    for p in parts:
        out.prompt_ids += p.prompt_ids
        out.completions += p.completions
        out.rewards += p.rewards
        out.statuses += p.statuses
        out.records += p.records
        out.texts += p.texts
    return out




def sample_groups(draw: Callable[[int], tuple[GradedRollout, int]], *, target: int, granule: int,
                  max_rounds: int, dp_rank: int, dp_size: int, dp_group=None) -> tuple[GradedRollout, float, dict]:
    """Draw rounds until ``target`` groups with differing rewards are kept (over all DP replicas).

    ``draw(round)`` generates and grades this replica's share of one round of prompts and returns
    (graded rollout, prompts truncated). Returns this rank's training rollout (``target / dp_size``
    groups, fewer at the cap), the share of generated prompts that were truncated, and the metrics
    ``sampling/rounds``, ``sampling/kept_groups``, ``sampling/dropped_groups`` (all rounds, all
    replicas) and ``sampling/trained_groups``.
    """
    kept: list[GradedRollout] = []  # this replica's kept groups of each round
    counts: list[list[int]] = []  # counts[round][replica]: kept groups
    first = None
    generated = dropped = truncated = 0
    generate_s = reward_s = 0.0
    while len(counts) < max_rounds and sum(map(sum, counts)) < target:
        graded, cut = draw(len(counts))
        first = first or graded
        generate_s += graded.generate_s
        reward_s += graded.reward_s
        keep = varied_groups(graded.rewards, graded.n)
        kept.append(take_groups(graded, [g for g, k in enumerate(keep) if k]))
        stats = all_gather_object((len(kept[-1].prompt_ids), len(keep), cut), dp_group)
        counts.append([s[0] for s in stats])
        generated += sum(s[1] for s in stats)
        dropped += sum(s[1] - s[0] for s in stats)
        truncated += sum(s[2] for s in stats)
    total = sum(map(sum, counts))
    chosen = min(total, target)
    if chosen < target:
        chosen -= chosen % granule
        logger.warning("dynamic sampling: %d of %d groups kept after %d rounds (grpo.max_sampling_rounds); "
                       "training on %s", total, target, len(counts),
                       f"{chosen} groups" if chosen else "the first round as drawn")
    if chosen == 0:
        result = first
    else:
        # Global order: round, then replica, then position; this replica offers the chosen ones it holds.
        offer, start = {}, 0
        for rnd, per_replica in enumerate(counts):
            start += sum(per_replica[:dp_rank])
            mine = list(range(per_replica[dp_rank]))
            picked = [g for g in mine if start + g < chosen]
            offer.update({start + g: take_groups(kept[rnd], [g]) for g in picked})
            start += sum(per_replica[dp_rank:])
        pool = {k: v for part in all_gather_object(offer, dp_group) for k, v in part.items()}
        share = chosen // dp_size
        result = concat([pool[k] for k in range(dp_rank * share, (dp_rank + 1) * share)], first.n)
    result.generate_s, result.reward_s = generate_s, reward_s
    metrics = {"sampling/rounds": float(len(counts)), "sampling/kept_groups": float(total),
               "sampling/dropped_groups": float(dropped), "sampling/trained_groups": float(chosen or target)}
    return result, truncated / max(generated, 1), metrics
