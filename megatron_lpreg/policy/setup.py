"""The Megatron policy of a run, built once for train, evaluate and verify-refit alike."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_lpreg import checkpointing as ckpt
from megatron_lpreg.model import ModelSpec
from megatron_lpreg.model.build import build_gpt_model, transformer_engine_available
from megatron_lpreg.weights import load_hf_weights


def uses_te(model_cfg) -> bool:
    """``model.use_te`` resolved: None means Transformer Engine wherever it imports."""
    return transformer_engine_available() if model_cfg.use_te is None else bool(model_cfg.use_te)


def load_policy(model_cfg, spec: ModelSpec, *, tp_rank: int, tp_size: int, recompute: str | None = None,
                te: bool | None = None):
    """This TP rank's GPTModel shard with the run's initial weights: ``model.load`` (a megatron
    checkpoint) if given, else the HF weights of ``model.path``. ``recompute`` defaults to
    ``model.recompute``."""
    te = uses_te(model_cfg) if te is None else te
    model = build_gpt_model(spec, getattr(torch, model_cfg.dtype), te,
                            recompute=model_cfg.recompute if recompute is None else recompute)
    if model_cfg.load:
        ckpt.load_model(model, model_cfg.load, vocab_size=spec.vocab_size)
    else:
        load_hf_weights(model, spec, Path(model_cfg.path), tp_rank=tp_rank, tp_size=tp_size, te=te)
    return model
