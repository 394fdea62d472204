"""The GRPO loop with Lp-Reg, NeMo-Aligner style: one readable step, top to bottom.

    prompts -> rollout (engine rank of each DP replica) -> rewards -> group advantages
            -> old + proxy log-probs (one no-grad Megatron pass)
            -> mini-batch updates with the vocab-parallel Lp-Reg loss (TP x DP)
            -> refit the new weights into the rollout engine
    every N steps: validation (avg@k per data_source), checkpoint; every step: metrics

Everything that a step changes (weights, optimiser, data position, best score) is saved together in
one atomic checkpoint, and sampling seeds are a function of (seed, step, DP rank), so a resumed run
continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from megatron_lpreg import checkpointing as ckpt
from megatron_lpreg import faults
from megatron_lpreg.config import Config, ConfigError, check_inputs, config_to_dict, save_config
from megatron_lpreg.data import DataFields, PromptSampler, encode_prompts, load_prompt_dataset
from megatron_lpreg.grpo.advantages import group_advantages, group_stats
from megatron_lpreg.grpo.batching import RolloutBatch
from megatron_lpreg.grpo.dynamic_sampling import sample_groups
from megatron_lpreg.grpo.metrics import MetricSums
from megatron_lpreg.grpo.mismatch import mismatch_metrics, trainable_sequences
from megatron_lpreg.grpo.optimizer import PolicyOptimizer
from megatron_lpreg.grpo.policy import PolicyContext, score_rollouts, train_on_rollouts
from megatron_lpreg.grpo.reward_shaping import overlong_penalty, shape_rewards, truncated_mask
from megatron_lpreg.grpo.rollout import generate_and_grade, share_in_group
from megatron_lpreg.grpo.skips import SkipCounter, TrainingDiverged, weights_finite
from megatron_lpreg.grpo.state import (
    complete_checkpoints, load_training_checkpoint, prune_checkpoints, save_training_checkpoint, step_dir,
)
from megatron_lpreg.grpo.validation import validate
from megatron_lpreg.memory import MB, PhasePeaks, parameter_bytes
from megatron_lpreg.parallel import init_distributed
from megatron_lpreg.rollout.build import EngineRefit, build_rollout_engine, rollout_engine_kind  # noqa: F401
from megatron_lpreg.rollout.engine import SamplingParams, stop_token_ids

logger = logging.getLogger(__name__)


def _group(group, size: int):
    return group if size > 1 else None


def sampling_seed(seed: int, step: int, dp_rank: int, round_: int = 0) -> int:
    """Seed of one replica's rollout; ``round_`` counts dynamic sampling's extra rounds in a step."""
    return (seed * 1_000_003 + step * 7919 + dp_rank + round_ * 15_485_863) % (2**31 - 1)


class GRPOTrainer:
    def __init__(self, cfg: Config):
        from transformers import AutoTokenizer

        from megatron_lpreg.model import parse_hf_config
        from megatron_lpreg.model.build import build_gpt_model, transformer_engine_available
        from megatron_lpreg.rewards import FunctionReward, RewardPool
        from megatron_lpreg.weights import load_hf_weights

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        check_inputs(cfg)
        hf_dir = self.hf_dir = Path(cfg.model.path)
        g = cfg.grpo
        self.ctx = ctx = init_distributed(cfg.parallel.tp, cfg.parallel.backend, cfg.parallel.timeout_s, seed=g.seed)
        for name, value in (("grpo.prompts_per_step", g.prompts_per_step), ("grpo.mini_batch_prompts", g.mini_batch_prompts)):
            if value % ctx.dp_size:
                raise ConfigError(f"{name}={value} is not divisible by the data-parallel size {ctx.dp_size}")
        if cfg.rollout.n < 2:
            raise ConfigError(f"rollout.n={cfg.rollout.n}: group advantages need at least 2 responses per prompt")
        self.engine_rank = ctx.tp_rank == 0
        self.tp_group = _group(ctx.tp_group, ctx.tp_size)
        self.dp_group = _group(ctx.dp_group, ctx.dp_size)

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
        self.stop_ids = stop_token_ids(self.tokenizer, hf_dir)
        self.spec = parse_hf_config(hf_dir)
        dtype = getattr(torch, cfg.model.dtype)
        self.te = transformer_engine_available() if cfg.model.use_te is None else cfg.model.use_te
        if g.pack_sequences and self.te:  # TE's attention applies its own causal mask, not ours
            raise ConfigError("grpo.pack_sequences needs the local layer spec: set model.use_te=false")
        def initial_policy(recompute: str):
            model = build_gpt_model(self.spec, dtype, self.te, recompute=recompute)
            if cfg.model.load:
                ckpt.load_model(model, cfg.model.load)
            else:
                load_hf_weights(model, self.spec, hf_dir, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, te=self.te)
            return model

        self.model = initial_policy(cfg.model.recompute)
        # The KL term's reference: the initial policy, rebuilt from the same source on resume (a
        # checkpoint holds only the trained policy). It is frozen by being outside the optimiser and
        # run only under no_grad; requires_grad stays on because Megatron's linear layers take another
        # code path for frozen weights, whose logits differ in the last bits from the policy's.
        self.ref_model = initial_policy("none").eval() if cfg.loss.ref_kl_coef > 0 else None
        o = cfg.optim
        self.optimizer = PolicyOptimizer(
            self.model, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
            dp_group=self.dp_group, tp_group=self.tp_group,
            shard_over_dp=o.distributed_optimizer and ctx.dp_size > 1)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0] \
            if self.stop_ids else 0
        self.policy = PolicyContext(
            model=self.model, vocab_size=self.spec.vocab_size, pad_id=pad_id, device=ctx.device,
            tp_group=self.tp_group, dp_group=self.dp_group, dp_size=ctx.dp_size,
            micro_batch_tokens=g.micro_batch_tokens, pad_to_multiple=g.pad_to_multiple, pack_sequences=g.pack_sequences,
            ref_model=self.ref_model)

        d = cfg.data
        fields = DataFields(d.prompt_key, d.data_source_key, d.ground_truth_key)
        self.train_data = load_prompt_dataset(d.train_files, fields, d.on_error, max_samples=d.max_samples)
        self.val_data = load_prompt_dataset(cfg.validation.files, fields, d.on_error,
                                            max_samples=cfg.validation.max_samples) \
            if cfg.validation.files else None
        self.sampler = PromptSampler(len(self.train_data), g.prompts_per_step, g.seed, shuffle=d.shuffle)

        self.engine = self.pool = None
        if self.engine_rank:
            self.engine = build_rollout_engine(cfg, hf_dir, self.spec.max_position_embeddings, pad_id, g.seed)
            r = cfg.reward
            self.pool = FunctionReward(r.function) if r.function else \
                RewardPool(r.num_workers, timeout_s=r.timeout_s, memory_mb=r.memory_mb)

        self.refitter = EngineRefit(cfg, self.engine, ctx.tp_group, ctx.device)
        self.step = 0
        self.best: dict | None = None
        self.memory = PhasePeaks(ctx.device)
        self.skips = SkipCounter(g.max_consecutive_skips)
        self.resumed_from = self._resume()
        self.last_refit_s = self.refit()
        self.metrics_logger = self._make_logger()

    # ---------------------------------------------------------------------------- setup helpers
    def _resume(self) -> Path | None:
        choice = self.cfg.checkpoint.resume
        if choice == "never":
            return None
        if choice == "auto":
            found = complete_checkpoints(self.run_dir)
            if not found:
                return None
            path = found[-1][1]
        else:
            path = Path(choice)
            if not ckpt.is_complete(path):
                raise ckpt.CheckpointError(f"checkpoint.resume: {path} is not a complete checkpoint")
        state = load_training_checkpoint(path, model=self.model, optimizer=self.optimizer)
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.best = state.get("best")
        self.skips.in_a_row = int(state.get("consecutive_skips", 0))
        if self.ctx.rank == 0:
            logger.info("resumed from %s at step %d", path, self.step)
        return path

    def _make_logger(self):
        from megatron_lpreg.logging import MetricsLogger

        c, lg = self.cfg, self.cfg.logging
        if self.ctx.rank == 0:
            save_config(c, self.run_dir / "config.yaml")
        return MetricsLogger(
            self.run_dir, config=config_to_dict(c), enabled=self.ctx.rank == 0, total_steps=c.grpo.steps,
            wandb_project=lg.wandb_project, wandb_mode=lg.wandb_mode, wandb_name=lg.wandb_name,
            wandb_entity=lg.wandb_entity, console=lg.console, start_step=self.step)

    # ---------------------------------------------------------------------------- one step
    def refit(self) -> float:
        """Stream the Megatron weights into the rollout engine (collective over the TP group)."""
        start = time.perf_counter()
        self.refit_stats = self.refitter(self.model, self.spec, te=self.te)
        return time.perf_counter() - start

    def _local_prompts(self, indices: list[int]):
        per = len(indices) // self.ctx.dp_size
        return [self.train_data[i] for i in indices[self.ctx.dp_rank * per:(self.ctx.dp_rank + 1) * per]]

    def _rollout(self, records, step: int, round_: int = 0):
        """Prompts -> graded completions on the engine rank, shared with the TP group."""
        c = self.cfg
        result = None
        if self.engine_rank:
            prompt_ids, truncated = encode_prompts(records, self.tokenizer, c.data.template, c.data.max_prompt_len)
            r = c.rollout
            sampling = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                      max_tokens=r.max_tokens, stop_token_ids=self.stop_ids,
                                      seed=sampling_seed(c.grpo.seed, step, self.ctx.dp_rank, round_))
            graded = generate_and_grade(self.engine, self.pool, self.tokenizer, prompt_ids,
                                        [rec.ground_truth for rec in records], sampling)
            result = (graded, truncated)
        return share_in_group(result, self.tp_group)

    def _rollout_batch(self, graded) -> RolloutBatch:
        n = graded.n
        input_ids, prompt_lens = [], []
        for i, comp in enumerate(graded.completions):
            prompt = graded.prompt_ids[i // n]
            input_ids.append(torch.tensor(prompt + comp.token_ids, dtype=torch.long))
            prompt_lens.append(len(prompt))
        rewards = torch.tensor(graded.rewards, dtype=torch.float32)
        adv = group_advantages(rewards, n, eps=self.cfg.grpo.adv_eps, normalize_std=self.cfg.grpo.normalize_adv_std)
        engine_logprobs = [torch.tensor(comp.logprobs, dtype=torch.float32) for comp in graded.completions]
        trainable = truncated_mask(graded) if self.cfg.reward.mask_truncated else None
        return RolloutBatch(input_ids, prompt_lens, graded.response_lens, adv, rewards=rewards, trainable=trainable,
                            engine_logprobs=engine_logprobs)

    def _draw(self, step: int, round_: int = 0):
        """The sampler's next prompts, rolled out and graded (rewards shaped): (graded, truncated prompts)."""
        records = self._local_prompts(next(self.sampler))
        graded, truncated = self._rollout(records, step, round_)
        r = self.cfg.reward
        if r.overlong_buffer:
            shape_rewards(graded, max_tokens=self.cfg.rollout.max_tokens, buffer=r.overlong_buffer,
                          factor=r.overlong_penalty)
        return graded, truncated

    def collect(self, step: int):
        """Rollout and rewards for ``step``: (graded rollout, training batch, truncated prompts)."""
        g = self.cfg.grpo
        if not g.dynamic_sampling:
            graded, truncated = self._draw(step)
            return graded, self._rollout_batch(graded), truncated
        graded, truncated_share, metrics = sample_groups(
            lambda round_: self._draw(step, round_), target=g.prompts_per_step,
            granule=self.ctx.dp_size * (g.prompts_per_step // g.mini_batch_prompts),
            max_rounds=g.max_sampling_rounds, dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size,
            dp_group=self.dp_group)
        graded.metrics = metrics
        return graded, self._rollout_batch(graded), truncated_share * len(graded.prompt_ids)

    def learn(self, batch: RolloutBatch, loss_cfg=None) -> tuple[dict, MetricSums, list, dict[str, float]]:
        """Old/proxy log-probs, then the policy updates: (scores, loss metrics, optimiser results, times)."""
        c = self.cfg
        loss_cfg = loss_cfg or c.loss
        faults.point("logprob")
        t = time.perf_counter()
        with self.memory.phase("logprob"):
            scores = score_rollouts(self.policy, batch, loss_cfg)
        batch.old_logprobs, batch.proxy_logprobs = scores["old_logprobs"], scores["proxy_logprobs"]
        batch.ref_logprobs = scores.get("ref_logprobs")
        times = {"time/logprob": time.perf_counter() - t}
        masked = None
        if c.mismatch.mask_seq_abs_diff is not None:
            keep = trainable_sequences(batch.engine_logprobs, batch.old_logprobs, c.mismatch.mask_seq_abs_diff)
            masked = float((~keep).sum())
            batch.trainable = keep if batch.trainable is None else batch.trainable & keep
        t = time.perf_counter()
        g = c.grpo
        with self.memory.phase("train"):
            loss_sums, results = train_on_rollouts(
                self.policy, batch, loss_cfg, self.optimizer,
                num_minibatches=g.prompts_per_step // g.mini_batch_prompts, epochs=g.epochs,
                tis_cap=c.mismatch.tis_cap)
        if masked is not None:
            loss_sums.add({"mismatch/masked_seqs": masked / max(len(batch), 1)}, weight=len(batch))
        times["time/train"] = time.perf_counter() - t
        return scores, loss_sums, results, times

    def train_step(self) -> dict[str, float]:
        step = self.step + 1
        t0 = time.perf_counter()
        faults.point("rollout", step)
        with self.memory.phase("rollout"):
            graded, batch, truncated = self.collect(step)
        scores, loss_sums, results, times = self.learn(batch)
        self.skips.add(results)
        with self.memory.phase("refit"):
            refit_s = self.refit()
        times.update({"time/rollout": graded.generate_s, "time/reward": graded.reward_s, "time/refit": refit_s})

        sums = self._rollout_metrics(graded, batch, scores, truncated)
        sums.merge(loss_sums)
        metrics = sums.reduce(self.dp_group)
        metrics.update({
            "optim/grad_norm": results[-1].grad_norm,
            "optim/lr": results[-1].lr,
            "optim/skipped_steps": float(sum(not r.stepped for r in results)),
            "optim/steps": float(len(results)),
        })
        metrics.update(graded.metrics)  # already global (dynamic sampling counts over all replicas)
        metrics.update(times)
        metrics["refit/mb"] = self.refit_stats.bytes / MB
        # Peaks are the max over all ranks; every TP rank holds equal shards, so one rank's size is all's.
        metrics.update(self.memory.metrics(), **{"memory/model_mb": parameter_bytes(self.model) / MB})
        metrics["time/step"] = time.perf_counter() - t0
        self.step = step
        return metrics

    def _rollout_metrics(self, graded, batch, scores, truncated) -> MetricSums:
        sums = MetricSums()
        stats = group_stats(torch.tensor(graded.rewards), graded.n)
        groups = stats["num_groups"]
        sums.add({"reward/mean": stats["reward_mean"]}, weight=len(graded.rewards))
        sums.add({"reward/all_correct_groups": stats["frac_all_correct"],
                  "reward/all_wrong_groups": stats["frac_all_wrong"]}, weight=groups)
        sums.add({"data/prompt_truncated": truncated / max(groups, 1)}, weight=groups)
        shaping = self.cfg.reward
        for comp, reward, status in zip(graded.completions, graded.rewards, graded.statuses):
            if shaping.overlong_buffer:
                penalty = overlong_penalty(len(comp.token_ids), self.cfg.rollout.max_tokens,
                                           shaping.overlong_buffer, shaping.overlong_penalty)
                sums.add({"reward/overlong_penalty": penalty, "reward/overlong_penalized": float(penalty < 0)})
            if shaping.mask_truncated:
                sums.add({"response/loss_masked": float(comp.finish_reason == "length")})
            sums.add({
                "response/length_mean": len(comp.token_ids),
                "response/length_max": len(comp.token_ids),
                "response/truncated": float(comp.finish_reason == "length"),
                "reward/graded_ok": float(status == "ok"),
                "reward/timeouts": float(status == "timeout"),
            })
        tokens = sum(int(v.numel()) for v in scores["entropy"])
        if tokens:
            sums.add({"entropy/mean": sum(float(v.sum()) for v in scores["entropy"]) / tokens}, weight=tokens)
            if scores["kept_mass"][0] is not None:  # Lp-Reg: M of the proxy under pi_old
                sums.add({"lpreg/kept_mass_mean": sum(float(v.sum()) for v in scores["kept_mass"]) / tokens},
                         weight=tokens)
        # The engine's own log-probs against the trainer's recomputation: the rollout/train gap.
        mismatch, tokens = mismatch_metrics(batch.engine_logprobs, scores["old_logprobs"])
        sums.add(mismatch, weight=tokens)
        return sums

    # ---------------------------------------------------------------------------- validation, checkpoints
    def validate(self) -> dict[str, float]:
        c = self.cfg
        if self.val_data is None:
            return {}
        faults.point("validation")
        start = time.perf_counter()
        prompt_ids = None
        if self.engine_rank:
            prompt_ids, _ = encode_prompts(list(self.val_data), self.tokenizer, c.data.template, c.data.max_prompt_len)
        out = validate(
            self.engine, self.pool, self.tokenizer, self.val_data, prompt_ids, c.validation,
            max_tokens=c.validation.max_tokens or c.rollout.max_tokens, stop_ids=self.stop_ids,
            seed=sampling_seed(c.grpo.seed + 1, self.step, 0), dp_rank=self.ctx.dp_rank,
            dp_size=self.ctx.dp_size, dp_group=self.dp_group, on_engine_rank=self.engine_rank)
        if "val/mean" in out and (self.best is None or out["val/mean"] > self.best["val/mean"]):
            self.best = {"val/mean": out["val/mean"], "step": self.step}
        if self.best is not None:
            out["val/best"] = self.best["val/mean"]
            out["val/best_step"] = float(self.best["step"])
        out["time/validation"] = time.perf_counter() - start
        return out

    def save(self) -> Path:
        path = step_dir(self.run_dir, self.step)
        metadata = ckpt.model_metadata(
            self.spec, source=self.hf_dir, dtype=getattr(torch, self.cfg.model.dtype), tp_size=self.ctx.tp_size,
            padded_vocab_size=int(self.model.embedding.word_embeddings.weight.shape[0]) * self.ctx.tp_size)
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "best": self.best,
                 "world_size": self.ctx.world_size, "tp_size": self.ctx.tp_size,
                 "consecutive_skips": self.skips.in_a_row}
        save_training_checkpoint(path, model=self.model, optimizer=self.optimizer, metadata=metadata,
                                 trainer_state=state, hf_source=self.hf_dir)
        prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    # ---------------------------------------------------------------------------- the loop
    def fit(self, max_steps: int | None = None) -> dict[str, float]:
        """Train to ``grpo.steps`` (or ``max_steps`` more steps); returns the last step's metrics."""
        c = self.cfg
        end = c.grpo.steps if max_steps is None else min(c.grpo.steps, self.step + max_steps)
        last: dict[str, float] = {}
        saved_at = self.step if self.resumed_from else None
        if self.resumed_from is None and c.validation.at_start and self.val_data is not None and self.step == 0:
            self.metrics_logger.log(0, self.validate())
        while self.step < end:
            last = self.train_step()
            if self.val_data is not None and c.validation.every and self.step % c.validation.every == 0:
                last.update(self.validate())
            self.metrics_logger.log(self.step, last)
            if self.skips.exceeded:
                self._stop_diverged(saved_at)
            if c.checkpoint.every and self.step % c.checkpoint.every == 0:
                self.save()
                saved_at = self.step
        if c.checkpoint.save_at_end and saved_at != self.step and self.step == c.grpo.steps:
            self.save()
        if self.best is not None:
            self.metrics_logger.log_summary({"val/best": self.best["val/mean"], "val/best_step": self.best["step"]})
        return last

    def _stop_diverged(self, saved_at: int | None) -> None:
        """Keep the last good weights and stop. Skipped steps never touch the weights or the
        optimiser, so the current state is the last good one: saved (with the data position past
        the bad batches) unless it is somehow not finite, then the previous checkpoint is it."""
        where = f"{self.skips.in_a_row} optimiser steps in a row had a non-finite gradient norm " \
                f"(grpo.max_consecutive_skips={self.cfg.grpo.max_consecutive_skips}), the last at step {self.step}"
        if weights_finite(self.model):
            kept = self.save() if saved_at != self.step else step_dir(self.run_dir, self.step)
        else:
            found = complete_checkpoints(self.run_dir)
            kept = found[-1][1] if found else None
        raise TrainingDiverged(f"{where}; stopped: last good weights in {kept or 'no checkpoint'}")

    def close(self) -> None:
        if getattr(self.engine, "close", None) is not None:  # vLLM's engine processes
            self.engine.close()
            self.engine = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if getattr(self, "metrics_logger", None) is not None:
            self.metrics_logger.close()

    def __enter__(self) -> "GRPOTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

