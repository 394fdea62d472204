"""Where a GRPO step's time goes, and what Lp-Reg costs over plain GRPO, measured in one run.

    python benchmarks/step_bench.py --config examples/tiny_cpu/config.yaml [--steps 4] [key=value ...]

Each measured step runs as the trainer runs it (rollout, rewards, log-prob pass, updates, refit)
with the configured loss. Before its updates, the same rollout batch is also put through the
log-prob pass and the updates under the ``grpo`` preset (Lp-Reg off, same clip settings) and under
Lp-Reg, in alternating order, each from a snapshot of the weights and optimiser that is restored
afterwards. Comparing the two on identical data and weights, back to back, isolates what Lp-Reg
adds (the proxy in the log-prob pass; selection and the regulariser in the loss) from rollout noise.

Where every TP rank has an engine of its own (the transformers engine on CPU at TP > 1, or vLLM with
``rollout.tp=1`` under TP > 1: each rank generates a slice of the prompts), the step's prompts are
also generated twice more, in alternating order: by every rank, and by TP rank 0's engine alone (the
others waiting), to time what slicing gains.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("time/rollout", "time/reward", "time/logprob", "time/train", "time/train/forward", "time/train/backward",
          "time/train/optimizer", "time/refit", "time/step")


def _snapshot(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items() if v is not None},
            copy.deepcopy(trainer.optimizer.state_dict()))


def _restore(trainer, snap):
    trainer.model.load_state_dict(snap[0], strict=False)
    trainer.optimizer.load_state_dict(copy.deepcopy(snap[1]))


def _batch(trainer, step: int):
    """The step's rollout as the trainer batches it (advantages, overlong filtering)."""
    from megatron_lpreg.grpo.advantages import group_advantages
    from megatron_lpreg.grpo.reward_shaping import truncated_mask
    from megatron_lpreg.grpo.rollout import to_batch

    c = trainer.cfg
    rollout, _ = trainer.generate(step)
    advantages = group_advantages(torch.tensor(rollout.rewards), rollout.n, eps=c.grpo.adv_eps,
                                  normalize_std=c.grpo.normalize_adv_std)
    return to_batch(rollout, advantages, truncated_mask(rollout) if c.reward.mask_truncated else None,
                    trainer.ctx.device)


def _timed_rollouts(trainer, step: int) -> tuple[float, float]:
    """Seconds to generate and grade the step's prompts with every TP rank's engine (slices), then
    with TP rank 0's alone; the sampler is rewound so both draw the same prompts."""
    from megatron_lpreg.parallel import barrier, world_group
    from megatron_lpreg.rollout.layout import RolloutLayout

    ctx, every = trainer.ctx, trainer.layout
    first = ctx.tp_rank == 0
    rank0 = RolloutLayout("rank0", 1, first, first, 0, 1, ctx.dp_rank, ctx.dp_size)
    sampler_state = trainer.state.sampler.state_dict()
    seconds = {}
    order = (every, rank0) if step % 2 == 0 else (rank0, every)
    for layout in order:
        trainer.state.sampler.load_state_dict(sampler_state)
        trainer.layout = layout
        barrier(world_group())
        start = time.perf_counter()
        trainer.generate(step)
        seconds[layout.name] = time.perf_counter() - start
    trainer.layout = every
    trainer.state.sampler.load_state_dict(sampler_state)
    return seconds[every.name], seconds["rank0"]


def _timed_learn(trainer, batch, loss_cfg) -> float:
    """The log-prob pass (where the trainer runs one) and the updates under ``loss_cfg``, from a
    snapshot restored afterwards."""
    from megatron_lpreg.policy.passes import recompute_logprobs, train

    g = trainer.cfg.grpo
    snap = _snapshot(trainer)
    batch = copy.copy(batch)
    start = time.perf_counter()
    if not trainer.on_policy:
        scores = recompute_logprobs(trainer.policy, batch, loss_cfg)
        batch.set(old_logprobs=scores.old_logprobs, proxy_logprobs=scores.proxy_logprobs,
                  ref_logprobs=scores.ref_logprobs)
    train(trainer.policy, batch, loss_cfg, trainer.optimizer, num_minibatches=trainer.minibatches, epochs=g.epochs,
          tis_cap=trainer.cfg.mismatch.tis_cap, scores_from_forward=trainer.on_policy)
    elapsed = time.perf_counter() - start
    _restore(trainer, snap)
    return elapsed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=4, help="measured steps (after one warm-up step)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")

    from megatron_lpreg.config import load_config
    from megatron_lpreg.grpo.trainer import GRPOTrainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(args.config, [*args.overrides, f"run_dir={run_dir}", "checkpoint.resume=never",
                                        "logging.console=false"])
        losses = {"lp_reg": dataclasses.replace(cfg.loss, enabled=True),
                  "grpo": dataclasses.replace(cfg.loss, enabled=False)}
        steps, paired, rollouts = [], {"lp_reg": [], "grpo": []}, []
        with GRPOTrainer(cfg) as trainer:
            trainer.train_step()  # warm-up: first-call costs (allocator, lazy imports, reward workers)
            for i in range(args.steps):
                if trainer.layout.slices > 1:  # engines of one rank each: rank 0's alone is comparable
                    rollouts.append(_timed_rollouts(trainer, trainer.step + 1))
                # The paired measurement draws the next rollout itself, then rewinds the sampler so
                # the real step below trains on exactly that batch.
                sampler_state = trainer.state.sampler.state_dict()
                batch = _batch(trainer, trainer.step + 1)
                order = ("lp_reg", "grpo") if i % 2 == 0 else ("grpo", "lp_reg")
                for name in order:
                    paired[name].append(_timed_learn(trainer, batch, losses[name]))
                trainer.state.sampler.load_state_dict(sampler_state)
                steps.append(trainer.train_step())

    med = {k: statistics.median(m[k] for m in steps) for k in PHASES}
    step_s = med["time/step"]
    print(f"step-time breakdown ({cfg.loss.enabled and 'Lp-Reg' or 'GRPO'}, median of {args.steps} steps):")
    for k in PHASES:
        print(f"  {k:<22}{med[k]:>9.3f} s {med[k] / step_s:>7.1%}")
    lp, gr = statistics.median(paired["lp_reg"]), statistics.median(paired["grpo"])
    print(f"\nlog-prob pass + updates on identical batches: lp_reg {lp:.3f} s, grpo {gr:.3f} s, "
          f"ratio {lp / gr:.3f}")
    print(f"Lp-Reg overhead: {lp - gr:+.3f} s = {(lp - gr) / step_s:+.1%} of the step time")
    print(f"(|S'| median {statistics.median(m.get('lpreg/selected', 0.0) for m in steps):.0f} tokens/step)")
    if rollouts:
        every, rank0 = (statistics.median(r[i] for r in rollouts) for i in (0, 1))
        print(f"\nrollout of the same prompts: every TP rank generating {every:.3f} s, TP rank 0 alone "
              f"{rank0:.3f} s, speed-up {rank0 / every:.2f}x")


if __name__ == "__main__":
    main()
