"""The HF<->Megatron table: exact round trips at TP=1/2 for each family, layouts, and errors."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.model import ModelConfigError, padded_vocab_size, parse_hf_config
from megatron_lpreg.weights import (
    WeightTableError,
    find_param,
    hf_names_for,
    hf_param_names,
    hf_to_megatron_shard,
    is_weight,
    layer_params,
    megatron_param_names,
    megatron_shard_shape,
    megatron_to_hf,
    model_params,
    param_for_hf,
    to_megatron_shard,
)
from tests.model.tiny_models import FAMILIES, TINY_CONFIGS, hf_state_dict, tiny_hf_model


@pytest.fixture(scope="module")
def models():
    return {f: tiny_hf_model(f) for f in FAMILIES}


def _spec(family):
    return parse_hf_config(TINY_CONFIGS[family])


@pytest.mark.parametrize("te", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bitwise(models, family, tp, te):
    spec = _spec(family)
    hf = hf_state_dict(models[family])
    assert sorted(hf) == sorted(hf_param_names(spec))
    shards = [dict(hf_to_megatron_shard(spec, hf, r, tp, te=te)) for r in range(tp)]
    assert list(shards[0]) == megatron_param_names(spec, te=te)
    back = {}
    for name in megatron_param_names(spec, te=te):
        for r in range(tp):
            assert tuple(shards[r][name].shape) == megatron_shard_shape(spec, find_param(spec, name, te), tp)
        for hf_name, tensor in megatron_to_hf(spec, name, [s[name] for s in shards], te=te):
            assert hf_name not in back
            back[hf_name] = tensor
    assert sorted(back) == sorted(hf)
    for name, tensor in hf.items():
        assert tensor.dtype == back[name].dtype and torch.equal(tensor, back[name]), name


def test_megatron_names_match_local_and_te_specs():
    qwen3 = _spec("qwen3")
    local = megatron_param_names(qwen3)
    assert local[0] == "embedding.word_embeddings.weight"
    assert local[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]
    assert "decoder.layers.1.self_attention.q_layernorm.weight" in local
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in local
    te = megatron_param_names(qwen3, te=True)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te)
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in megatron_param_names(_spec("qwen2"))
    llama = _spec("llama")  # tied: no output layer, no lm_head
    assert "output_layer.weight" not in megatron_param_names(llama)
    assert "lm_head.weight" not in hf_param_names(llama)
    assert param_for_hf(llama, "lm_head.weight") is None
    assert hf_names_for(llama, "decoder.layers.1.mlp.linear_fc1.weight") == (
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight")
    assert param_for_hf(llama, "model.layers.1.self_attn.k_proj.weight").megatron == (
        "decoder.layers.1.self_attention.linear_qkv.weight")
    assert [p.megatron for p in layer_params(llama, 1)] == [
        n for n in megatron_param_names(llama) if n.startswith("decoder.layers.1.")]
    assert sum(len(layer_params(llama, i)) for i in range(2)) + 2 == len(model_params(llama))
    assert not is_weight("decoder.layers.0.self_attention.linear_qkv._extra_state")


def test_qkv_is_interleaved_per_query_group_and_split_by_groups():
    spec = _spec("qwen2")  # 4 query heads, 2 groups, head_dim 16
    d, hidden = spec.head_dim, spec.hidden_size
    # Row j of every head block holds (head id, j): the layout is readable from the values.
    def heads(tag, n):
        return torch.stack([torch.full((d, hidden), float(tag + h)) for h in range(n)]).reshape(n * d, hidden)
    hf = {"model.layers.0.self_attn.q_proj.weight": heads(100, 4),
          "model.layers.0.self_attn.k_proj.weight": heads(200, 2),
          "model.layers.0.self_attn.v_proj.weight": heads(300, 2)}
    param = find_param(spec, "decoder.layers.0.self_attention.linear_qkv.weight")
    order = lambda t: t[::d, 0].tolist()  # noqa: E731 - one value per head block
    assert order(to_megatron_shard(spec, param, hf, 0, 1)) == [100, 101, 200, 300, 102, 103, 201, 301]
    assert order(to_megatron_shard(spec, param, hf, 0, 2)) == [100, 101, 200, 300]
    assert order(to_megatron_shard(spec, param, hf, 1, 2)) == [102, 103, 201, 301]


def test_gate_up_is_gate_then_up_on_each_rank():
    spec = _spec("llama")
    ffn, hidden = spec.ffn_hidden_size, spec.hidden_size
    rows = torch.arange(ffn, dtype=torch.float32)[:, None].expand(ffn, hidden)
    hf = {"model.layers.0.mlp.gate_proj.weight": rows, "model.layers.0.mlp.up_proj.weight": rows + 1000}
    param = find_param(spec, "decoder.layers.0.mlp.linear_fc1.weight")
    shard = to_megatron_shard(spec, param, hf, 1, 2)[:, 0]
    half = ffn // 2
    assert torch.equal(shard, torch.cat([torch.arange(half, ffn), torch.arange(half, ffn) + 1000]).float())


def test_vocab_padding_rows_are_zero_and_dropped(models):
    spec = _spec("qwen2")
    hf = hf_state_dict(models["qwen2"])
    padded = padded_vocab_size(spec.vocab_size, 2)
    assert padded == 256
    param = find_param(spec, "output_layer.weight")
    r0, r1 = (to_megatron_shard(spec, param, hf, r, 2) for r in range(2))
    assert r0.shape == r1.shape == (128, spec.hidden_size)
    assert torch.equal(r0[:101], hf["lm_head.weight"]) and not r0[101:].any() and not r1.any()
    (name, back), = megatron_to_hf(spec, "output_layer.weight", [r0, r1])
    assert name == "lm_head.weight" and back.shape == (101, spec.hidden_size)


def test_padded_vocab_size_follows_megatron():
    assert padded_vocab_size(101, 1) == 128
    assert padded_vocab_size(128, 1) == 128
    assert padded_vocab_size(151936, 1) == 151936
    assert padded_vocab_size(151936, 2) == 152064
    assert padded_vocab_size(151665, 4) == 152064


def test_shape_mismatch_names_the_tensor(models):
    spec = _spec("qwen3")
    hf = dict(hf_state_dict(models["qwen3"]))
    hf["model.layers.1.self_attn.k_proj.weight"] = hf["model.layers.1.self_attn.k_proj.weight"][:-1]
    with pytest.raises(WeightTableError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        list(hf_to_megatron_shard(spec, hf, 0, 1))


def test_missing_tensor_names_it_and_its_megatron_parameter(models):
    spec = _spec("qwen2")
    hf = dict(hf_state_dict(models["qwen2"]))
    del hf["lm_head.weight"]
    with pytest.raises(WeightTableError, match=r"'lm_head\.weight'.*'output_layer\.weight'.*missing"):
        list(hf_to_megatron_shard(spec, hf, 0, 2))


def test_export_checks_shards():
    spec = _spec("llama")
    name = "decoder.layers.0.self_attention.linear_proj.weight"
    good = torch.zeros(spec.hidden_size, spec.q_size // 2)
    with pytest.raises(WeightTableError, match=r"linear_proj\.weight.*rank 1/2.*shape"):
        megatron_to_hf(spec, name, [good, torch.zeros(spec.hidden_size, spec.q_size)])
    with pytest.raises(WeightTableError, match=r"unknown Megatron parameter 'output_layer\.weight'"):
        megatron_to_hf(spec, "output_layer.weight", [torch.zeros(128, spec.hidden_size)])


def test_tp_that_splits_a_kv_head_is_rejected(models):
    spec = _spec("qwen2")  # 2 KV heads
    with pytest.raises(ModelConfigError, match="num_attention_heads=4"):
        list(hf_to_megatron_shard(spec, hf_state_dict(models["qwen2"]), 0, 3))
