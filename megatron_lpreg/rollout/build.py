"""The rollout engine a run configuration asks for, without weights (the first refit fills them)."""

from __future__ import annotations

from pathlib import Path

import torch


def rollout_engine_kind(choice: str) -> str:
    """``rollout.engine`` resolved: auto is vllm on CUDA when vLLM is installed, else hf."""
    if choice != "auto":
        return choice
    from megatron_lpreg.rollout.vllm_engine import vllm_available

    return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"


def build_rollout_engine(cfg, hf_dir: Path, max_position_embeddings: int, pad_id: int | None, seed: int):
    """The engine of ``cfg.rollout.engine`` for the model in ``hf_dir``, in ``cfg.model.dtype``
    (``pad_id`` None: the model config's pad or EOS id)."""
    if rollout_engine_kind(cfg.rollout.engine) == "vllm":
        from megatron_lpreg.rollout.vllm_engine import VLLMEngine

        # Without weights (load_format=dummy), like the HF engine: the refit fills them.
        # vLLM refuses a max_model_len beyond the model's context, which caps the responses.
        max_tokens = max(cfg.rollout.max_tokens, cfg.validation.max_tokens or 0)
        return VLLMEngine(
            hf_dir, dtype=cfg.model.dtype, seed=seed, load_format="dummy",
            max_model_len=min(cfg.data.max_prompt_len + max_tokens, max_position_embeddings),
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
    from transformers import AutoConfig

    from megatron_lpreg.rollout.hf_engine import HFEngine

    return HFEngine.from_config(AutoConfig.from_pretrained(hf_dir), dtype=getattr(torch, cfg.model.dtype),
                                pad_token_id=pad_id, max_batch_size=cfg.rollout.max_batch_size)


class EngineRefit:
    """How the trainer's weights reach its rollout engine, one choice per run: through shared
    memory (the hf engine on CPU, ``weights/shared_refit.py``) or as a bucketed stream
    (``weights/refit.py``). Constructing it and calling it are collective over the TP group."""

    def __init__(self, cfg, engine, tp_group, device: torch.device):
        self.engine = engine  # on the TP group's rank 0 only
        self.tp_group = tp_group  # None at TP=1
        self.bucket_bytes = cfg.rollout.refit_bucket_mb << 20
        self.shared = None
        if cfg.rollout.refit_shared_memory and device.type == "cpu" and rollout_engine_kind(cfg.rollout.engine) == "hf":
            from megatron_lpreg.weights.shared_refit import SharedWeights

            # None on every rank (the stream) where one rank cannot map the engine's memory.
            self.shared = SharedWeights.attach(engine.model if engine is not None else None, group=tp_group,
                                               dst_rank=0)

    def __call__(self, model, spec, te: bool = False):
        """One refit; returns its RefitStats."""
        from megatron_lpreg import faults
        from megatron_lpreg.weights.refit import RefitStats, stream_hf_weights

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
