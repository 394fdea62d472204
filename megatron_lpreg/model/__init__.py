"""Megatron-core GPTModel built from a HF config (Qwen2/Qwen2.5, Qwen3, Llama).

``build`` (which imports megatron-core) is imported lazily so that parsing a config stays cheap.
"""

from megatron_lpreg.model.hf_config import (
    ModelConfigError,
    ModelSpec,
    check_tp,
    padded_vocab_size,
    parse_hf_config,
)

__all__ = [
    "ModelConfigError", "ModelSpec", "build_gpt_model", "check_tp", "model_logits",
    "padded_vocab_size", "parse_hf_config",
]


def __getattr__(name):
    if name in ("build_gpt_model", "model_logits"):
        from megatron_lpreg.model import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
