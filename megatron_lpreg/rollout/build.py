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


def engine_tp(cfg) -> int:
    """The vllm engine's tensor-parallel size: ``rollout.tp``, by default the trainer's TP. In a
    world of one rank it is 1 whatever the setting (there is nothing to split over)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return 1 if world == 1 else (cfg.rollout.tp or cfg.parallel.tp)


def build_rollout_engine(cfg, hf_dir: Path, max_position_embeddings: int, pad_id: int | None, seed: int):
    """The engine of ``cfg.rollout.engine`` for the model in ``hf_dir``, in ``cfg.model.dtype``
    (``pad_id`` None: the model config's pad or EOS id). vllm: collective, on every rank of the
    world (each builds its shard of its engine, ``VLLMEngine``); hf: on the ranks that generate."""
    if rollout_engine_kind(cfg.rollout.engine) == "vllm":
        from megatron_lpreg.rollout.vllm_engine import VLLMEngine

        # Without weights (load_format=dummy), like the HF engine: the refit fills them.
        # vLLM refuses a max_model_len beyond the model's context, which caps the responses.
        max_tokens = max(cfg.rollout.max_tokens, cfg.validation.max_tokens or 0)
        return VLLMEngine(
            hf_dir, dtype=cfg.model.dtype, seed=seed, load_format="dummy",
            max_model_len=min(cfg.data.max_prompt_len + max_tokens, max_position_embeddings),
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, tensor_parallel_size=engine_tp(cfg))
    from transformers import AutoConfig

    from megatron_lpreg.rollout.hf_engine import HFEngine

    return HFEngine.from_config(AutoConfig.from_pretrained(hf_dir), dtype=getattr(torch, cfg.model.dtype),
                                pad_token_id=pad_id, max_batch_size=cfg.rollout.max_batch_size)
