"""The GRPO loop with Lp-Reg, NeMo-Aligner style. ``GRPOTrainer.train_step`` is the algorithm:

    generate (sampling, rewards, overlong shaping, dynamic sampling) -> group advantages -> batch
    -> recompute log-probs (old, Lp-Reg proxy, reference) -> mismatch mask -> train -> refit -> metrics

and ``fit`` the loop around it: validation every N steps, checkpoints, metrics to console/JSONL/wandb.

Everything a step changes (weights, optimiser, ``TrainerState``) is saved together in one atomic
checkpoint, and sampling seeds are a function of (seed, step, DP rank), so a resumed run continues
exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from megatron_lpreg import checkpointing as ckpt
from megatron_lpreg import faults
from megatron_lpreg.config import Config, ConfigError, config_to_dict, save_config
from megatron_lpreg.data import DataFields, PromptSampler, encode_prompts, load_prompt_dataset
from megatron_lpreg.grpo.advantages import group_advantages
from megatron_lpreg.grpo.dynamic_sampling import sample_groups
from megatron_lpreg.grpo.lpreg_activity import LpRegActivity
from megatron_lpreg.grpo.mismatch import trainable_sequences
from megatron_lpreg.grpo.reward_shaping import shape_rewards, truncated_mask
from megatron_lpreg.grpo.rollout import generate_and_grade, merge_rollouts, prompt_slice, to_batch
from megatron_lpreg.grpo.skips import SkipCounter, TrainingDiverged, weights_finite
from megatron_lpreg.grpo.step_metrics import optimizer_metrics, rollout_metrics
from megatron_lpreg.grpo.trainer_state import TrainerState
from megatron_lpreg.grpo.validation import validate
from megatron_lpreg.inputs import check_inputs
from megatron_lpreg.memory import MB, PhasePeaks, freeze_setup_objects, parameter_bytes, unfreeze_setup_objects
from megatron_lpreg.parallel import all_gather_object, broadcast_object, init_distributed, world_group
from megatron_lpreg.policy.lr_schedule import LRSchedule
from megatron_lpreg.policy.optimizer import PolicyOptimizer
from megatron_lpreg.policy.metric_sums import MetricSums
from megatron_lpreg.policy.passes import PolicyContext, on_policy_scores, recompute_logprobs, train
from megatron_lpreg.policy.setup import load_policy, uses_te
from megatron_lpreg.policy.throughput import forward_flops, measure_peak_flops
from megatron_lpreg.megatron_layout import megatron_args
from megatron_lpreg.policy.training_checkpoint import (
    complete_checkpoints, load_training_checkpoint, prune_checkpoints, record_best, save_training_checkpoint,
    step_dir,
)
from megatron_lpreg.rollout.build import build_rollout_engine, rollout_engine_kind
from megatron_lpreg.rollout.layout import rollout_layout
from megatron_lpreg.rollout.engine import SamplingParams, stop_token_ids
from megatron_lpreg.samples import SampleFile, sample_rows
from megatron_lpreg.weights.refit import EngineRefit, shares_engine_memory

logger = logging.getLogger(__name__)


def sampling_seed(seed: int, step: int, dp_rank: int, round_: int = 0) -> int:
    """Seed of one replica's rollout; ``round_`` counts dynamic sampling's extra rounds in a step."""
    return (seed * 1_000_003 + step * 7919 + dp_rank + round_ * 15_485_863) % (2**31 - 1)


class GRPOTrainer:
    def __init__(self, cfg: Config):
        from transformers import AutoTokenizer

        from megatron_lpreg.model import parse_hf_config
        from megatron_lpreg.rewards import RewardPool

        self.cfg, g, m = cfg, cfg.grpo, cfg.model
        self.run_dir = Path(cfg.run_dir)
        check_inputs(cfg)
        self.hf_dir = Path(m.path)
        self.ctx = ctx = init_distributed(cfg.parallel.tp, cfg.parallel.backend, cfg.parallel.timeout_s, seed=g.seed)
        for name, value in (("grpo.prompts_per_step", g.prompts_per_step), ("grpo.mini_batch_prompts", g.mini_batch_prompts)):
            if value % ctx.dp_size:
                raise ConfigError(f"{name}={value} is not divisible by the data-parallel size {ctx.dp_size}")
        self.tokenizer = AutoTokenizer.from_pretrained(m.tokenizer or m.path)
        self.stop_ids = stop_token_ids(self.tokenizer, self.hf_dir)
        self.spec = parse_hf_config(self.hf_dir)
        self.te = uses_te(m)
        self.model = load_policy(m, self.spec, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, te=self.te)
        # The KL term's reference: the initial policy, rebuilt from the same source on resume (a
        # checkpoint holds only the trained policy). It is frozen by being outside the optimiser and
        # run only under no_grad; requires_grad stays on because Megatron's linear layers take another
        # code path for frozen weights, whose logits differ in the last bits from the policy's.
        self.ref_model = load_policy(m, self.spec, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, recompute="none",
                                     te=self.te).eval() if cfg.loss.ref_kl_coef > 0 else None
        o = cfg.optim
        self.optimizer = PolicyOptimizer(
            self.model, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
            dp_group=ctx.dp, tp_group=ctx.tp, shard_over_dp=o.distributed_optimizer and ctx.dp_size > 1,
            lr_schedule=LRSchedule.from_config(o, g.steps))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            (self.stop_ids[0] if self.stop_ids else 0)
        self.policy = PolicyContext(
            model=self.model, vocab_size=self.spec.vocab_size, pad_id=pad_id, device=ctx.device,
            tp_group=ctx.tp, dp_group=ctx.dp, dp_size=ctx.dp_size, micro_batch_tokens=g.micro_batch_tokens,
            pad_to_multiple=g.pad_to_multiple, pack_sequences=g.pack_sequences,
            thd=g.pack_sequences and self.te, ref_model=self.ref_model,
            min_p_support=cfg.logging.sampled_token_metrics)

        d = cfg.data
        fields = DataFields(d.prompt_key, d.data_source_key, d.ground_truth_key)
        self.train_data = load_prompt_dataset(d.train_files, fields, d.on_error, max_samples=d.max_samples)
        self.val_data = load_prompt_dataset(cfg.validation.files, fields, d.on_error,
                                            max_samples=cfg.validation.max_samples) if cfg.validation.files else None
        self.state = TrainerState(PromptSampler(len(self.train_data), g.prompts_per_step, g.seed, shuffle=d.shuffle),
                                  SkipCounter(g.max_consecutive_skips), world_size=ctx.world_size, tp_size=ctx.tp_size)

        # Every rank that may host (a shard of) an engine builds it: vLLM's ranks build theirs
        # together; the transformers engine runs on TP rank 0, or on every TP rank where the group
        # maps one copy of its weights (then each samples a slice of the prompts).
        kind = rollout_engine_kind(cfg.rollout.engine)
        self.engine = self.pool = None
        if kind == "vllm" or ctx.tp_rank == 0 or shares_engine_memory(cfg, ctx.device):
            self.engine = build_rollout_engine(cfg, self.hf_dir, self.spec.max_position_embeddings, pad_id, g.seed)
        self.refitter = EngineRefit(cfg, self.engine, ctx.tp, ctx.device)
        self.layout = rollout_layout(kind, tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, dp_rank=ctx.dp_rank,
                                     dp_size=ctx.dp_size, engine_tp=cfg.rollout.tp,
                                     shared_weights=self.refitter.shared is not None)
        if self.engine is not None and not self.layout.has_engine:
            self.engine.close()  # no shared memory after all: TP rank 0 generates alone
            self.engine = None
        if self.layout.leader:
            r = cfg.reward
            self.pool = RewardPool(r.num_workers, timeout_s=r.timeout_s, memory_mb=r.memory_mb,
                                   function=r.function or None)
        self.memory = PhasePeaks(ctx.device)
        self.lpreg_activity = LpRegActivity(cfg.loss)
        self.minibatches = g.prompts_per_step // g.mini_batch_prompts
        peak = cfg.logging.peak_tflops
        self.peak_flops = peak * 1e12 if peak else measure_peak_flops(ctx.device, getattr(torch, m.dtype))
        self.resumed_from = self._resume()
        self.refit()
        self.metrics_logger = self._make_logger()
        lg = cfg.logging
        self.samples = SampleFile(self.run_dir, max_bytes=int(lg.samples_max_mb * 2**20), start_step=self.step,
                                  enabled=ctx.rank == 0 and lg.samples_per_step > 0)
        freeze_setup_objects()

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def on_policy(self) -> bool:
        """Whether the training forward gives the old log-probs (``policy.passes.on_policy_scores``)."""
        return on_policy_scores(self.cfg.loss, num_minibatches=self.minibatches, epochs=self.cfg.grpo.epochs,
                                ref_model=self.ref_model, mask_seq_abs_diff=self.cfg.mismatch.mask_seq_abs_diff)

    # ---------------------------------------------------------------------------- one step
    def train_step(self) -> dict[str, float]:
        """One GRPO step, phase by phase in the order of the algorithm."""
        c, g, step = self.cfg, self.cfg.grpo, self.state.step + 1
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        with self._phase("rollout", times, step):
            rollout, truncated = self.generate(step)
            if self.engine is not None:  # its memory goes to scoring and training; the refit wakes it
                self.engine.sleep(self.refitter.sleep_level)
        if self.samples.enabled:
            self.samples.write(sample_rows(rollout, self.tokenizer, step=step, kind="train",
                                           limit=c.logging.samples_per_step))
        advantages = group_advantages(torch.tensor(rollout.rewards, dtype=torch.float32), rollout.n,
                                      eps=g.adv_eps, normalize_std=g.normalize_adv_std)
        trainable = truncated_mask(rollout) if c.reward.mask_truncated else None
        batch = to_batch(rollout, advantages, trainable, self.ctx.device)
        scores, times["time/logprob"] = None, 0.0  # on-policy the training forward gives them
        if not self.on_policy:
            with self._phase("logprob", times):
                scores = recompute_logprobs(self.policy, batch, c.loss)
            batch.set(old_logprobs=scores.old_logprobs, proxy_logprobs=scores.proxy_logprobs,
                      ref_logprobs=scores.ref_logprobs)
        masked = self.mask_mismatched(batch)
        self.optimizer.set_schedule_step(step - 1)
        with self._phase("train", times, fault_point=False):  # its fault points are in the passes
            trained = train(self.policy, batch, c.loss, self.optimizer, num_minibatches=self.minibatches,
                            epochs=g.epochs, tis_cap=c.mismatch.tis_cap, scores_from_forward=scores is None)
        scores = scores or trained.scores
        self.state.skips.add(trained.steps)
        with self._phase("refit", times, fault_point=False):  # and the refit's in the refit
            refit = self.refit()

        sums = rollout_metrics(rollout, batch, scores, truncated, c.reward, c.rollout.max_tokens,
                               sampled_tokens=c.logging.sampled_token_metrics)
        sums.merge(trained.metrics)
        sums.merge(self.throughput(batch, times, scores is trained.scores))
        if masked is not None:
            sums.add({"mismatch/masked_seqs": masked / max(len(batch), 1)}, weight=len(batch))
        metrics = {**sums.reduce(self.ctx.dp), **optimizer_metrics(trained.steps), **rollout.metrics, **times,
                   **trained.seconds, **self.memory.metrics(world_group()), "time/rollout": rollout.generate_s,
                   "time/reward": rollout.reward_s, "refit/mb": refit.bytes / MB,
                   "memory/model_mb": parameter_bytes(self.model) / MB}
        metrics["time/step"] = time.perf_counter() - t0
        metrics["perf/tokens_per_s"] = metrics.pop("perf/tokens") / metrics["time/step"]
        self.state.step = step
        return metrics

    @contextmanager
    def _phase(self, name: str, times: dict, step: int | None = None, fault_point: bool = True):
        """Fault point, peak memory and wall time of one phase (``time/<name>``)."""
        if fault_point:
            faults.point(name, step)
        start = time.perf_counter()
        with self.memory.phase(name):
            yield
        times[f"time/{name}"] = time.perf_counter() - start

    # ---------------------------------------------------------------------------- the phases
    def generate(self, step: int):
        """This replica's graded rollout of the step and the prompts truncated. Rewards are shaped
        in each round, before dynamic sampling judges whether a group's rewards differ."""
        g = self.cfg.grpo
        if not g.dynamic_sampling:
            return self._draw(step)
        graded, truncated_share, metrics = sample_groups(
            lambda round_: self._draw(step, round_), target=g.prompts_per_step,
            granule=self.ctx.dp_size * (g.prompts_per_step // g.mini_batch_prompts),
            max_rounds=g.max_sampling_rounds, dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size,
            dp_group=self.ctx.dp)
        graded.metrics = metrics
        return graded, truncated_share * len(graded.prompt_ids)

    def _draw(self, step: int, round_: int = 0):
        """The sampler's next prompts (this replica's share), generated and graded on the engine
        rank (or each TP rank a slice, gathered), shared with the TP group, rewards shaped:
        (graded, prompts truncated)."""
        c, ctx = self.cfg, self.ctx
        indices = next(self.state.sampler)
        per = len(indices) // ctx.dp_size
        records = [self.train_data[i] for i in indices[ctx.dp_rank * per:(ctx.dp_rank + 1) * per]]
        lay = self.layout
        records = records[prompt_slice(len(records), lay.slice_index, lay.slices)]
        result = None
        if lay.has_engine:
            prompt_ids, truncated = encode_prompts(records, self.tokenizer, c.data.template, c.data.max_prompt_len)
            r = c.rollout
            sampling = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                      max_tokens=r.max_tokens, stop_token_ids=self.stop_ids,
                                      seed=sampling_seed(c.grpo.seed, step, lay.slot, round_))
            graded = generate_and_grade(self.engine, self.pool, self.tokenizer, prompt_ids, records, sampling,
                                        grade=lay.leader)
            result = (graded, truncated) if lay.leader else None
        # The leaders' slices, in slice order (TP rank order), on every rank of the replica.
        parts = [part for part in all_gather_object(result, ctx.tp) if part is not None]
        graded, truncated = merge_rollouts([g for g, _ in parts]), sum(t for _, t in parts)
        if c.reward.overlong_buffer:
            shape_rewards(graded, max_tokens=c.rollout.max_tokens, buffer=c.reward.overlong_buffer,
                          factor=c.reward.overlong_penalty)
        return graded, truncated

    def throughput(self, batch, times: dict, logprob_skipped: bool) -> MetricSums:
        """Tokens through the model, and the model FLOP/s and MFU of this rank's passes against the
        peak measured at start (``policy.throughput``)."""
        lengths, heads = batch.lengths, batch.response_tokens
        passes = 3 * self.cfg.grpo.epochs + (0 if logprob_skipped else 1 + (self.ref_model is not None))
        flops = passes * forward_flops(self.spec, lengths, head_positions=heads) / self.ctx.tp_size
        rate = flops / max(times["time/train"] + times["time/logprob"], 1e-9)
        sums = MetricSums()
        sums.add({"perf/tokens": float(sum(lengths))})
        sums.add({"perf/flops_per_s": rate, "perf/mfu": rate / self.peak_flops})
        return sums

    def mask_mismatched(self, batch) -> float | None:
        """``mismatch.mask_seq_abs_diff``: sequences whose engine log-probs stray too far from the
        trainer's leave the loss. Returns how many were masked (None when off)."""
        limit = self.cfg.mismatch.mask_seq_abs_diff
        if limit is None:
            return None
        keep = trainable_sequences(batch.responses(batch.engine_logprobs), batch.responses(batch.old_logprobs),
                                   limit).to(batch.advantages.device)
        batch.trainable = keep if batch.trainable is None else batch.trainable & keep
        return float((~keep).sum())

    def refit(self):
        """The Megatron weights into the rollout engine (collective over the TP group): RefitStats."""
        return self.refitter(self.model, self.spec, te=self.te)

    # ---------------------------------------------------------------------------- validation, checkpoints
    def validate(self) -> dict[str, float]:
        c = self.cfg
        if self.val_data is None:
            return {}
        faults.point("validation")
        start = time.perf_counter()
        prompt_ids, lay = None, self.layout
        if lay.has_engine:
            prompt_ids, _ = encode_prompts(list(self.val_data), self.tokenizer, c.data.template, c.data.max_prompt_len)
        # Every engine of the world takes its share of the prompts; the whole world reduces.
        responses = [] if self.samples.enabled else None
        out = validate(
            self.engine, self.pool, self.tokenizer, self.val_data, prompt_ids, c.validation,
            max_tokens=c.validation.max_tokens or c.rollout.max_tokens, stop_ids=self.stop_ids,
            seed=sampling_seed(c.grpo.seed + 1, self.step, 0), slot=lay.slot, slots=lay.engines,
            group=world_group(), has_engine=lay.has_engine, leader=lay.leader, responses=responses)
        for graded in responses or []:
            self.samples.write(sample_rows(graded, self.tokenizer, step=self.step, kind="val",
                                           limit=c.logging.samples_per_step))
        if "val/mean" in out:
            self.state.record_validation(out["val/mean"])
        if self.state.best is not None:
            out["val/best"] = self.state.best["val/mean"]
            out["val/best_step"] = float(self.state.best["step"])
        out["time/validation"] = time.perf_counter() - start
        return out

    def save(self) -> Path:
        path = step_dir(self.run_dir, self.step)
        metadata = ckpt.model_metadata(
            self.spec, source=self.hf_dir, dtype=getattr(torch, self.cfg.model.dtype), tp_size=self.ctx.tp_size,
            padded_vocab_size=int(self.model.embedding.word_embeddings.weight.shape[0]) * self.ctx.tp_size)
        args = megatron_args(self.spec, tp_size=self.ctx.tp_size, dtype=getattr(torch, self.cfg.model.dtype),
                             padded_vocab_size=metadata["padded_vocab_size"], iteration=self.step)
        save_training_checkpoint(path, model=self.model, optimizer=self.optimizer, metadata=metadata,
                                 trainer_state=self.state.state_dict(), hf_source=self.hf_dir, megatron_args=args)
        best = self.state.best
        if best is not None and best["step"] == self.step:
            record_best(self.run_dir, self.step, best["val/mean"])
        prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    def export_hf(self) -> Path:
        """The current weights as a plain HF directory, ``run_dir/hf/step_N`` (collective)."""
        from megatron_lpreg.weights.hf_export import export_hf

        faults.point("hf_export", self.step)
        return export_hf(self.model, self.spec, self.hf_dir, self.run_dir / "hf" / f"step_{self.step:06d}",
                         tp_group=self.ctx.tp, dp_group=self.ctx.dp, te=self.te)

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
        self.state.load_state_dict(load_training_checkpoint(path, model=self.model, optimizer=self.optimizer))
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
            wandb_entity=lg.wandb_entity, console=lg.console, start_step=self.step, backends=lg.backends)

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
            inactive = self.lpreg_activity.update(last)
            if inactive and self.ctx.rank == 0:
                logger.warning(inactive)
            improved = False
            if self.val_data is not None and c.validation.every and self.step % c.validation.every == 0:
                last.update(self.validate())
                improved = self.state.best is not None and self.state.best["step"] == self.step
            self.metrics_logger.log(self.step, last)
            if self.state.skips.exceeded:
                self._stop_diverged(saved_at)
            if (c.checkpoint.every and self.step % c.checkpoint.every == 0) or (c.checkpoint.save_best and improved):
                self.save()
                saved_at = self.step
            if c.checkpoint.hf_every and (self.step % c.checkpoint.hf_every == 0 or self.step == c.grpo.steps):
                self.export_hf()
        if c.checkpoint.save_at_end and saved_at != self.step and self.step == c.grpo.steps:
            self.save()
        if self.state.best is not None:
            self.metrics_logger.log_summary({"val/best": self.state.best["val/mean"],
                                             "val/best_step": self.state.best["step"]})
        return last

    def _stop_diverged(self, saved_at: int | None) -> None:
        """Keep the last good weights and stop. Skipped steps never touch the weights or the
        optimiser, so the current state is the last good one: saved (with the data position past
        the bad batches) unless it is somehow not finite, then the previous checkpoint is it."""
        skips = self.state.skips
        where = f"{skips.in_a_row} optimiser steps in a row had a non-finite gradient norm " \
                f"(grpo.max_consecutive_skips={self.cfg.grpo.max_consecutive_skips}), the last at step {self.step}"
        if weights_finite(self.model, world_group()):  # every rank keeps the same checkpoint
            kept = self.save() if saved_at != self.step else step_dir(self.run_dir, self.step)
        else:
            found = complete_checkpoints(self.run_dir)
            kept = found[-1][1] if found else None
        raise TrainingDiverged(f"{where}; stopped: last good weights in {kept or 'no checkpoint'}")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if getattr(self, "metrics_logger", None) is not None:
            self.metrics_logger.close()
        unfreeze_setup_objects()

    def __enter__(self) -> "GRPOTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
