"""Weight transfer into the rollout engine: the one entry point the trainer, evaluate and
verify-refit call. Strategies behind it, one chosen per run:

* shared memory (``shared_refit``): the hf engine on CPU, one copy of the weights per TP group;
* shard-to-shard (``engine_shards.ShardRefit``): the vllm engine (a shard on every rank) at engine
  TP == trainer TP: each rank writes its own Megatron shards into its own engine shard;
* gathered (``stream`` + ``EngineShard.write_hf``): the vllm engine at a smaller engine TP: full HF
  tensors gathered in the TP group, one bucket at a time, every rank writing its engine rank's part;
* stream (``stream``): the hf engine on TP rank 0 otherwise: full HF tensors to that rank only.
"""

from __future__ import annotations

import torch

from megatron_lpreg import faults
from megatron_lpreg.parallel import group_size
from megatron_lpreg.rollout.build import rollout_engine_kind
from megatron_lpreg.weights.stream import RefitStats, stream_hf_weights


def shares_engine_memory(cfg, device: torch.device) -> bool:
    """Whether the TP group may map one copy of the engine's weights (the transformers engine on
    CPU): then the refit writes through shared memory, and every TP rank can run an engine on it."""
    return cfg.rollout.refit_shared_memory and device.type == "cpu" and rollout_engine_kind(cfg.rollout.engine) == "hf"


class EngineRefit:
    """How the trainer's weights reach its rollout engine, one choice per run (the module
    docstring); ``path`` names it: "shared-memory", "shard-to-shard", "gathered" or "stream".
    Constructing it and calling it are collective over the TP group."""

    def __init__(self, cfg, engine, tp_group, device: torch.device):
        self.engine = engine  # hf: on the TP group's rank 0, on every rank where they share memory; vllm: every rank
        self.tp_group = tp_group  # None at TP=1
        self.bucket_bytes = cfg.rollout.refit_bucket_mb << 20
        self.shared = self.shards = None
        if rollout_engine_kind(cfg.rollout.engine) == "vllm":
            if engine is None:
                raise RuntimeError("the vllm engine runs SPMD: construct VLLMEngine on every rank (the refit "
                                   "writes each rank's engine shard)")
            if engine.tp_size == group_size(tp_group):
                from megatron_lpreg.weights.engine_shards import ShardRefit

                self.shards = ShardRefit(engine.shard, tp_group)
                self.path = "shard-to-shard"
            else:
                self.path = "gathered"
            return
        self.path = "stream"
        if shares_engine_memory(cfg, device):
            from megatron_lpreg.weights.shared_refit import SharedWeights

            # None on every rank (the stream) where one rank cannot map the engine's memory.
            self.shared = SharedWeights.attach(engine.model if engine is not None else None, group=tp_group,
                                               dst_rank=0)
            if self.shared is not None:
                self.path = "shared-memory"

    @property
    def sleep_level(self) -> int:
        """How deeply the engine may sleep between rollouts: level 2 drops its weights, which every
        refit rewrites anyway; the shared-memory refit writes through the engine's live weights,
        which must stay (level 1)."""
        return 1 if self.shared is not None else 2

    def __call__(self, model, spec, te: bool = False):
        """One refit; returns its RefitStats."""
        stats = RefitStats()
        if self.shared is not None:
            faults.point("refit")
            self.shared.refit(model, spec, te=te, engine_model=self.engine.model if self.engine else None,
                              stats=stats)
            if self.engine is not None:
                self.engine.mark_loaded()
            return stats
        if self.path in ("shard-to-shard", "gathered"):
            self.engine.prepare_refit()
            if self.shards is not None:
                self.shards(model, spec, te=te, stats=stats)
            else:
                for bucket in stream_hf_weights(model, spec, tp_group=self.tp_group, te=te,
                                                bucket_bytes=self.bucket_bytes, dst_tp_rank=None, stats=stats):
                    faults.point("refit")
                    self.engine.update_weights(bucket)
                stats.largest_extra_bytes = 2 * stats.largest_bucket_bytes  # gathered shards + merged tensors
            self.engine.refit_done()
            return stats
        for bucket in stream_hf_weights(model, spec, tp_group=self.tp_group, te=te, bucket_bytes=self.bucket_bytes,
                                        dst_tp_rank=0, stats=stats):
            faults.point("refit")
            if self.engine is not None:
                self.engine.update_weights(bucket)
        return stats
