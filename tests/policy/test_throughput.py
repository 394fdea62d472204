"""Model FLOPs against an independent count, the peak measurement and the stopwatch."""

from __future__ import annotations

import time

import torch

from megatron_lpreg.model import parse_hf_config
from megatron_lpreg.policy.throughput import Stopwatch, forward_flops, linear_flops_per_token, measure_peak_flops

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 128}


def test_linear_flops_are_two_per_decoder_weight():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", **{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")})
    model = AutoModelForCausalLM.from_config(config)
    weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert linear_flops_per_token(parse_hf_config(CONFIG)) == 2 * weights


def test_forward_flops_by_hand():
    spec = parse_hf_config(CONFIG)
    per_token = linear_flops_per_token(spec)
    # Causal attention over 3 tokens: 1 + 2 + 3 keys, scores and weighted sum, q width 64, 2 layers.
    attention = 2 * 2 * 64 * 6 * 2
    assert forward_flops(spec, [3]) == 3 * per_token + attention + 2 * 64 * 100 * 3
    # Only the response positions through the head.
    assert forward_flops(spec, [3], head_positions=1) == 3 * per_token + attention + 2 * 64 * 100


def test_peak_is_a_positive_rate_and_the_stopwatch_adds_up():
    assert measure_peak_flops(torch.device("cpu"), torch.float32, size=128, seconds=0.05) > 0
    clock = Stopwatch(torch.device("cpu"))
    clock.start()
    time.sleep(0.01)
    clock.lap("a")
    clock.lap("b")
    clock.start()
    time.sleep(0.01)
    clock.lap("a")
    seconds = clock.seconds
    assert set(seconds) == {"a", "b"} and seconds["a"] >= 0.02 and seconds["b"] >= 0
