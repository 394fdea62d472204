"""Weight transfer into the rollout engine: the one entry point the trainer, evaluate and
verify-refit call. Two strategies behind it, one chosen per run: shared memory (``shared_refit``)
and a bucketed stream of full HF tensors (``stream``)."""

from __future__ import annotations

import torch

from megatron_lpreg import faults
from megatron_lpreg.rollout.build import rollout_engine_kind
from megatron_lpreg.weights.stream import RefitStats, stream_hf_weights


def shares_engine_memory(cfg, device: torch.device) -> bool:
    """Whether the TP group may map one copy of the engine's weights (the transformers engine on
    CPU): then the refit writes through shared memory, and every TP rank can run an engine on it."""
    return cfg.rollout.refit_shared_memory and device.type == "cpu" and rollout_engine_kind(cfg.rollout.engine) == "hf"


class EngineRefit:
    """How the trainer's weights reach its rollout engine, one choice per run: through shared
    memory (the hf engine on CPU, ``weights/shared_refit.py``) or as a bucketed stream
    (``weights/stream.py``). Constructing it and calling it are collective over the TP group."""

    def __init__(self, cfg, engine, tp_group, device: torch.device):
        self.engine = engine  # on the TP group's rank 0; on every rank where they share memory
        self.tp_group = tp_group  # None at TP=1
        self.bucket_bytes = cfg.rollout.refit_bucket_mb << 20
        self.shared = None
        if shares_engine_memory(cfg, device):
            from megatron_lpreg.weights.shared_refit import SharedWeights

            # None on every rank (the stream) where one rank cannot map the engine's memory.
            self.shared = SharedWeights.attach(engine.model if engine is not None else None, group=tp_group,
                                               dst_rank=0)

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
        for bucket in stream_hf_weights(model, spec, tp_group=self.tp_group, te=te, bucket_bytes=self.bucket_bytes,
                                        dst_tp_rank=0, stats=stats):
            faults.point("refit")
            if self.engine is not None:
                self.engine.update_weights(bucket)
        return stats
