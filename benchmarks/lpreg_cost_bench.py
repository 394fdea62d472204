"""What Lp-Reg adds to a GRPO step on a real model and a real rollout, paired on one batch.

    python benchmarks/lpreg_cost_bench.py [--config examples/explore_cpu/config.yaml] [--pairs 20]

Builds the trainer of ``--config`` on one process (TP=1, no validation, no logging), draws one
rollout, then on that identical batch alternates Lp-Reg (the config's loss) and plain GRPO
(``loss.preset=grpo``) through

  update   the on-policy training pass: forward, fused log-prob/entropy(/proxy) statistics, loss,
           backward and the optimiser step (``policy.passes.train`` with ``scores_from_forward``),
           what every step of the study runs;
  scoring  the separate scoring pass an off-policy step runs first (``recompute_logprobs``: old
           log-probs, and with Lp-Reg the min-p proxy log-probs).

The order within a pair alternates, and the reported ratio is the median of the per-pair ratios,
so a load change on a shared machine hits both sides of a pair. The step time used for "share of
the step" is the median of one full training step (rollout included) measured here too. The
weights move a little with each update (lr as configured); both losses see the same drift.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/explore_cpu/config.yaml")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5, help="full steps timed for the step-time denominator")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from megatron_lpreg.config import load_config
    from megatron_lpreg.grpo.advantages import group_advantages
    from megatron_lpreg.grpo.rollout import to_batch
    from megatron_lpreg.grpo.trainer import GRPOTrainer
    from megatron_lpreg.policy.passes import recompute_logprobs, train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        common = ["parallel.tp=1", "validation.files=[]", "logging.backends=[]", f"run_dir={tmp}/run",
                  "checkpoint.save_at_end=false", *args.overrides]
        cfg = load_config(args.config, common)
        grpo_loss = load_config(args.config, [*common, "loss.preset=grpo"]).loss
        losses = {"lpreg": cfg.loss, "grpo": grpo_loss}
        with GRPOTrainer(cfg) as trainer:
            step_s = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                trainer.train_step()
                step_s.append(time.perf_counter() - t0)
            rollout, _ = trainer.generate(trainer.step + 1)
            adv = group_advantages(torch.tensor(rollout.rewards, dtype=torch.float32), rollout.n,
                                   eps=cfg.grpo.adv_eps, normalize_std=cfg.grpo.normalize_adv_std)
            batch = to_batch(rollout, adv, None, trainer.ctx.device)
            tokens = sum(len(c.token_ids) for c in rollout.completions)

            def update(loss_cfg):
                t0 = time.perf_counter()
                train(trainer.policy, batch, loss_cfg, trainer.optimizer, num_minibatches=1, epochs=1,
                      scores_from_forward=True)
                return time.perf_counter() - t0

            def scoring(loss_cfg):
                t0 = time.perf_counter()
                recompute_logprobs(trainer.policy, batch, loss_cfg)
                return time.perf_counter() - t0

            times = {(k, m): [] for k in ("update", "scoring") for m in losses}
            for i in range(args.pairs + 1):
                order = list(losses) if i % 2 == 0 else list(losses)[::-1]
                for kind, fn in (("update", update), ("scoring", scoring)):
                    for m in order:
                        t = fn(losses[m])
                        if i:  # the first pair warms up
                            times[(kind, m)].append(t)
    step = statistics.median(step_s)
    res = {"step_s": step, "sequences": len(batch), "response_tokens": tokens}
    print(f"{args.config}: {len(batch)} sequences, one full step (rollout included) {step * 1e3:.0f} ms "
          f"(median of {args.steps}); {args.pairs} pairs on one batch:")
    for kind in ("update", "scoring"):
        lp, gr = times[(kind, "lpreg")], times[(kind, "grpo")]
        ratio = statistics.median(a / b for a, b in zip(lp, gr))
        extra = statistics.median(a - b for a, b in zip(lp, gr))
        res[kind] = dict(lpreg_ms=statistics.median(lp) * 1e3, grpo_ms=statistics.median(gr) * 1e3,
                         ratio=ratio, extra_ms=extra * 1e3, extra_share_of_step=extra / step)
        print(f"  {kind:<8s} lpreg {res[kind]['lpreg_ms']:8.2f} ms  grpo {res[kind]['grpo_ms']:8.2f} ms  "
              f"ratio {ratio:.3f}  extra {extra * 1e3:+.2f} ms = {100 * extra / step:+.2f}% of the step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
