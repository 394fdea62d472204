"""A HF ``config.json`` (Qwen2/Qwen2.5, Qwen3, Llama) parsed into the facts the trainer needs.

Everything here is checked once, at parse time, so that an unsupported or inconsistent checkpoint
fails with the file and the field named instead of as a shape error deep inside megatron-core.
Defaults for absent optional fields mirror what transformers' config class would use, so the
parsed model is the model transformers would build from the same file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# Megatron's ``make_vocab_size_divisible_by`` default: the padded vocabulary is a multiple of
# this times TP, so that every TP rank's vocab shard is a multiple of 128 rows.
VOCAB_DIVISOR = 128


class ModelConfigError(ValueError):
    """The HF config describes a model this trainer cannot build exactly."""


@dataclass(frozen=True)
class Family:
    """What distinguishes one supported architecture from the others."""

    name: str
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2 hard-codes it)
    qk_norm: bool  # per-head RMSNorm on queries and keys before RoPE (Qwen3)
    default_head_dim: int | None  # head_dim when the config omits it; None = hidden / heads
    default_max_positions: int


FAMILIES = {
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True, qk_norm=False, default_head_dim=None,
                               default_max_positions=32768),
    # transformers' Qwen3Config defaults head_dim to 128 rather than hidden / heads.
    "Qwen3ForCausalLM": Family("qwen3", qkv_bias=False, qk_norm=True, default_head_dim=128,
                               default_max_positions=32768),
    "LlamaForCausalLM": Family("llama", qkv_bias=False, qk_norm=False, default_head_dim=None,
                               default_max_positions=2048),
}
_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# megatron-core's Llama-3 RoPE scaling hard-codes these; other values would silently differ.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only SwiGLU/RMSNorm/RoPE transformer, in the terms megatron-core builds it."""

    architecture: str  # HF ``architectures[0]``, e.g. "Qwen2ForCausalLM"
    family: str  # "qwen2" | "qwen3" | "llama"
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int  # = megatron's num_query_groups
    head_dim: int  # = megatron's kv_channels
    vocab_size: int  # real (unpadded) vocabulary
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    torch_dtype: torch.dtype  # the checkpoint's dtype
    rope_scaling_factor: float | None = None  # Llama-3 frequency scaling; None = plain RoPE

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads


def padded_vocab_size(vocab_size: int, tp_size: int, divisor: int = VOCAB_DIVISOR) -> int:
    """Megatron's padded vocabulary: ``vocab_size`` rounded up to a multiple of divisor * tp."""
    multiple = divisor * tp_size
    return -(-vocab_size // multiple) * multiple


def check_tp(spec: ModelSpec, tp_size: int) -> None:
    """Raise ModelConfigError unless every TP rank gets whole heads, KV groups and FFN columns."""
    if tp_size < 1:
        raise ModelConfigError(f"tensor parallel size must be >= 1, got tp={tp_size}")
    valid = _divisors(math.gcd(spec.num_attention_heads, spec.num_kv_heads, spec.ffn_hidden_size))
    for field, value in (
        ("num_attention_heads", spec.num_attention_heads),
        ("num_key_value_heads", spec.num_kv_heads),
        ("intermediate_size", spec.ffn_hidden_size),
    ):
        if value % tp_size:
            raise ModelConfigError(
                f"tp={tp_size} does not divide {field}={value}: each TP rank must hold whole "
                f"attention heads / KV groups / FFN columns; valid tp for this model: {valid}"
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_hf_config(config: Mapping | str | os.PathLike) -> ModelSpec:
    """Parse a HF config (a dict, a ``config.json`` path, or a model directory) into a ModelSpec."""
    if isinstance(config, Mapping):
        return _Parser(dict(config), "HF config").spec()
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return _Parser(raw, path).spec()


class _Parser:
    def __init__(self, raw: dict, source: str):
        self.raw = raw
        self.source = source

    def error(self, field: str, problem: str) -> ModelConfigError:
        return ModelConfigError(f"{self.source}: field '{field}' {problem}")

    def positive_int(self, field: str, default: int | None = None) -> int:
        value = self.raw.get(field)
        if value is None:
            if default is None:
                raise self.error(field, "is required but missing")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(field, f"must be a positive integer, got {value!r}")
        return value

    def number(self, field: str, value, default: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.error(field, f"must be a positive number, got {value!r}")
        return float(value)

    def flag(self, field: str, default: bool = False) -> bool:
        value = self.raw.get(field)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(field, f"must be true or false, got {value!r}")
        return value

    def architecture(self) -> str:
        archs = self.raw.get("architectures")
        if archs is None:
            # Bare configs (e.g. PretrainedConfig.save_pretrained) carry only model_type.
            model_type = self.raw.get("model_type")
            if model_type in _MODEL_TYPES:
                return _MODEL_TYPES[model_type]
            raise self.error(
                "architectures",
                f"is missing and model_type={model_type!r} is not one of {sorted(_MODEL_TYPES)}",
            )
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in FAMILIES:
            raise self.error(
                "architectures", f"= {archs!r} is not supported (supported: {sorted(FAMILIES)})"
            )
        return archs[0]

    def reject_unsupported(self, family: Family) -> None:
        raw = self.raw
        if raw.get("hidden_act", "silu") != "silu":
            raise self.error("hidden_act", f"= {raw['hidden_act']!r} is not supported (only 'silu')")
        for field in ("num_experts", "num_local_experts", "n_routed_experts"):
            if raw.get(field):
                raise self.error(field, f"= {raw[field]!r}: mixture-of-experts is not supported")
        if self.flag("use_sliding_window"):
            raise self.error("use_sliding_window", "is true: sliding-window attention is not supported")
        layer_types = raw.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise self.error(
                "layer_types", f"= {layer_types!r}: only 'full_attention' layers are supported"
            )
        # Qwen2 hard-codes its biases; for Llama/Qwen3 attention_bias also adds an o_proj bias,
        # and mlp_bias MLP biases, which the bias-free Megatron linears cannot hold.
        if family.name != "qwen2" and self.flag("attention_bias"):
            raise self.error("attention_bias", "is true: biased attention projections are not supported")
        if self.flag("mlp_bias"):
            raise self.error("mlp_bias", "is true: MLP biases are not supported")

    def rope(self) -> tuple[float, float | None]:
        """(rope_theta, llama3 scaling factor or None) from either config generation.

        transformers >= 5 writes ``rope_parameters`` (theta inside it); older files have a top-level
        ``rope_theta`` and an optional ``rope_scaling``.
        """
        field = "rope_parameters" if "rope_parameters" in self.raw else "rope_scaling"
        params = self.raw.get(field) or {}
        if not isinstance(params, dict):
            raise self.error(field, f"must be an object, got {params!r}")
        theta = self.number("rope_theta", params.get("rope_theta", self.raw.get("rope_theta")), 10000.0)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            return theta, None
        if rope_type == "llama3":
            for key, fixed in _LLAMA3_ROPE_FIXED.items():
                if params.get(key) != fixed:
                    raise self.error(
                        f"{field}.{key}",
                        f"= {params.get(key)!r}: megatron-core's llama3 RoPE scaling requires {fixed:g}",
                    )
            return theta, self.number(f"{field}.factor", params.get("factor"), 8.0)
        raise self.error(
            f"{field}.rope_type", f"= {rope_type!r} is not supported (supported: 'default', 'llama3')"
        )

    def dtype(self) -> torch.dtype:
        field = "dtype" if "dtype" in self.raw else "torch_dtype"
        name = self.raw.get(field) or "float32"
        if name not in _DTYPES:
            raise self.error(field, f"= {name!r} is not supported (supported: {sorted(_DTYPES)})")
        return _DTYPES[name]

    def spec(self) -> ModelSpec:
        architecture = self.architecture()
        family = FAMILIES[architecture]
        self.reject_unsupported(family)
        hidden = self.positive_int("hidden_size")
        heads = self.positive_int("num_attention_heads")
        kv_heads = self.positive_int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise self.error(
                "num_key_value_heads",
                f"= {kv_heads} does not divide num_attention_heads={heads} (grouped-query attention "
                "needs a whole number of query heads per KV head)",
            )
        if self.raw.get("head_dim") is not None or family.default_head_dim is not None:
            head_dim = self.positive_int("head_dim", default=family.default_head_dim)
        elif hidden % heads:
            raise self.error(
                "hidden_size",
                f"= {hidden} is not divisible by num_attention_heads={heads} and no head_dim is given",
            )
        else:
            head_dim = hidden // heads
        theta, rope_factor = self.rope()
        return ModelSpec(
            architecture=architecture,
            family=family.name,
            hidden_size=hidden,
            ffn_hidden_size=self.positive_int("intermediate_size"),
            num_layers=self.positive_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=self.positive_int("vocab_size"),
            rope_theta=theta,
            rms_norm_eps=self.number("rms_norm_eps", self.raw.get("rms_norm_eps"), 1e-6),
            tie_word_embeddings=self.flag("tie_word_embeddings"),
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
            max_position_embeddings=self.positive_int(
                "max_position_embeddings", default=family.default_max_positions
            ),
            torch_dtype=self.dtype(),
            rope_scaling_factor=rope_factor,
        )
