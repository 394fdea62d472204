"""Parsing HF config.json files: each family, both config generations, and every error class."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from megatron_lpreg.model import ModelConfigError, check_tp, parse_hf_config
from tests.model.tiny_models import TINY_CONFIGS


def _write(tmp_path, cfg):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_families_parse():
    qwen2, qwen3, llama = (parse_hf_config(TINY_CONFIGS[f]) for f in ("qwen2", "qwen3", "llama"))
    assert (qwen2.family, qwen2.qkv_bias, qwen2.qk_norm, qwen2.head_dim) == ("qwen2", True, False, 16)
    assert (qwen3.family, qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == ("qwen3", False, True, 24)
    assert qwen3.q_size == 96 and qwen3.kv_size == 48 and qwen3.rope_theta == 1e6
    assert (llama.family, llama.tie_word_embeddings, llama.rope_scaling_factor) == ("llama", True, 8.0)
    assert qwen2.num_kv_heads == 2 and qwen2.heads_per_group == 2 and qwen2.vocab_size == 101
    assert qwen2.torch_dtype == torch.float32


def test_real_world_qwen25_config_v4_style(tmp_path):
    # Qwen2.5-0.5B-Instruct's config.json as published (transformers 4.x keys).
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
        "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936,
    }
    spec = parse_hf_config(_write(tmp_path, cfg))
    assert spec == parse_hf_config(tmp_path)  # a model directory works too
    assert (spec.head_dim, spec.rope_theta, spec.torch_dtype) == (64, 1e6, torch.bfloat16)
    assert spec.tie_word_embeddings and spec.qkv_bias
    check_tp(spec, 2)
    with pytest.raises(ModelConfigError, match="tp=7 does not divide num_key_value_heads=2"):
        check_tp(spec, 7)


def test_llama31_rope_scaling_v4_style():
    cfg = dict(TINY_CONFIGS["llama"])
    del cfg["rope_parameters"]
    cfg.update(rope_theta=500000.0, rope_scaling={
        "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    spec = parse_hf_config(cfg)
    assert (spec.rope_theta, spec.rope_scaling_factor) == (500000.0, 32.0)


def _error(tmp_path, cfg, field):
    path = _write(tmp_path, cfg)
    with pytest.raises(ModelConfigError) as info:
        parse_hf_config(path)
    message = str(info.value)
    assert str(path) in message and f"'{field}'" in message, message
    return message


def _with(family, **changes):
    cfg = dict(TINY_CONFIGS[family])
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("field, cfg", [
    ("architectures", _with("qwen2", architectures=["Qwen2MoeForCausalLM"])),
    ("architectures", _with("qwen2", architectures=None, model_type="mistral")),
    ("hidden_size", _with("llama", hidden_size=None)),
    ("vocab_size", _with("qwen3", vocab_size=0)),
    ("num_key_value_heads", _with("qwen2", num_key_value_heads=3)),
    ("hidden_size", _with("qwen2", hidden_size=66)),  # not divisible by 4 heads, no head_dim
    ("rope_parameters.rope_type", _with("qwen2", rope_parameters={"rope_type": "yarn", "factor": 4.0})),
    ("rope_parameters.low_freq_factor", _with("llama", rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})),
    ("rope_scaling.rope_type", _with("llama", rope_parameters=None, rope_scaling={"type": "dynamic"})),
    ("use_sliding_window", _with("qwen2", use_sliding_window=True)),
    ("layer_types", _with("qwen3", layer_types=["full_attention", "sliding_attention"])),
    ("num_experts", _with("qwen3", num_experts=8)),
    ("attention_bias", _with("llama", attention_bias=True)),
    ("mlp_bias", _with("llama", mlp_bias=True)),
    ("hidden_act", _with("llama", hidden_act="gelu")),
    ("torch_dtype", _with("llama", torch_dtype="float8")),
])
def test_errors_name_file_and_field(tmp_path, field, cfg):
    _error(tmp_path, cfg, field)


def test_missing_head_dim_follows_transformers_defaults():
    # Llama/Qwen2 derive it from hidden / heads; Qwen3's config class defaults it to 128.
    assert parse_hf_config(_with("llama", head_dim=None)).head_dim == 16
    assert parse_hf_config(_with("qwen3", head_dim=None)).head_dim == 128


def test_dict_errors_and_unreadable_files(tmp_path):
    with pytest.raises(ModelConfigError, match=r"HF config: field 'intermediate_size' is required"):
        parse_hf_config(_with("qwen2", intermediate_size=None))
    with pytest.raises(ModelConfigError, match="no such file"):
        parse_hf_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ModelConfigError, match="bad.json: not valid JSON"):
        parse_hf_config(tmp_path / "bad.json")


def test_check_tp_names_the_field():
    spec = parse_hf_config(TINY_CONFIGS["qwen2"])
    check_tp(spec, 1)
    check_tp(spec, 2)
    with pytest.raises(ModelConfigError, match="num_attention_heads=4.*valid tp for this model: \\[1, 2\\]"):
        check_tp(spec, 3)
    with pytest.raises(ModelConfigError, match="tp=4 does not divide num_key_value_heads=2"):
        check_tp(spec, 4)
    with pytest.raises(ModelConfigError, match="tp=4 does not divide intermediate_size=94"):
        check_tp(replace(spec, num_attention_heads=8, num_kv_heads=8, ffn_hidden_size=94), 4)
