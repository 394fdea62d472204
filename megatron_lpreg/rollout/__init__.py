"""Rollout engines: ``HFEngine`` (transformers, CPU) behind the ``RolloutEngine`` protocol."""

from megatron_lpreg.rollout.engine import Completion, RolloutEngine, SamplingParams
from megatron_lpreg.rollout.hf_engine import EngineStateError, HFEngine

__all__ = ["Completion", "EngineStateError", "HFEngine", "RolloutEngine", "SamplingParams"]
