"""HF<->Megatron weight names and tensor-parallel split rules (``table``), in one place."""

from megatron_lpreg.weights.table import (
    RULES,
    Param,
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
    to_hf,
    to_megatron_shard,
)
from megatron_lpreg.weights.tp_rules import Split
from megatron_lpreg.weights.load import load_hf_weights

__all__ = [
    "RULES", "Param", "Split", "WeightTableError", "find_param", "hf_names_for", "hf_param_names",
    "hf_to_megatron_shard", "is_weight", "load_hf_weights", "layer_params", "megatron_param_names",
    "megatron_shard_shape", "megatron_to_hf", "model_params", "param_for_hf", "to_hf",
    "to_megatron_shard",
]
