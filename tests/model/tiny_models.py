"""Tiny random HF models of each supported family, built offline from configs.

Shapes are chosen to exercise the awkward cases: a vocabulary (101) that is not a multiple of 128
(padding rows), grouped-query attention (4 heads, 2 KV heads), Qwen3's explicit head_dim with
heads * head_dim != hidden, Qwen2's QKV bias, tied embeddings (Llama) and Llama-3 RoPE scaling.
Weights are re-drawn so that logits are O(1) (HF's 0.02 init gives near-constant logits, which would
make a logits comparison meaningless).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

_COMMON = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
)

TINY_CONFIGS: dict[str, dict] = {
    "qwen2": dict(_COMMON, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                  tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen3": dict(_COMMON, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=24,
                  tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # max_position_embeddings above llama3 RoPE's original 8192, as transformers expects.
    "llama": dict(_COMMON, model_type="llama", architectures=["LlamaForCausalLM"], head_dim=16,
                  tie_word_embeddings=True, max_position_embeddings=16384,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
}
FAMILIES = tuple(TINY_CONFIGS)


def tiny_hf_config(family: str):
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[family])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


@torch.no_grad()
def tiny_hf_model(family: str, seed: int = 0):
    """A float32 ``*ForCausalLM`` with unit-scale random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied lm_head is the embedding: visited once
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.1 * noise)
        elif "embed_tokens" in name:  # also the tied lm_head: keeps logits O(1)
            p.copy_(0.25 * noise)
        else:
            p.copy_(noise / math.sqrt(p.shape[-1]))
    return model.eval()


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors a HF checkpoint of ``model`` holds (no lm_head when tied)."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_tiny_model(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny model (config.json + model.safetensors) into ``directory``; returns it."""
    directory = Path(directory)
    tiny_hf_model(family, seed).save_pretrained(directory, safe_serialization=True)
    return directory


def load_safetensors_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def saved_families_with_logits(root: Path, batch: int, seq: int, seed: int):
    """Every family saved under ``root`` (family i with seed i), random input ids [batch, seq] and
    transformers' float32 logits of them: (dirs, input_ids, logits), keyed by family."""
    from transformers import AutoModelForCausalLM

    dirs = {f: str(save_tiny_model(f, Path(root) / f, seed=i)) for i, f in enumerate(FAMILIES)}
    input_ids = torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(seed))
    logits = {}
    for family, directory in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[family] = model(input_ids).logits
    return dirs, input_ids, logits
