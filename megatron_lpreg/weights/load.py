"""Fill a Megatron model shard straight from a HF safetensors directory (no converted checkpoint)."""

from __future__ import annotations

import os

import torch

from megatron_lpreg.weights.hf_files import HFCheckpoint
from megatron_lpreg.weights.table import find_param, is_weight, to_megatron_shard


@torch.no_grad()
def load_hf_weights(model, spec, directory: str | os.PathLike, *, tp_rank: int, tp_size: int,
                    te: bool = False) -> int:
    """Copy this TP rank's shard of every weight from ``directory``'s safetensors into ``model``
    (read lazily, one tensor set at a time); returns how many parameters were filled."""
    reader = HFCheckpoint(directory)
    filled = 0
    for name, p in model.named_parameters():
        if not is_weight(name):
            continue
        padded = p.shape[0] * tp_size if name in ("embedding.word_embeddings.weight", "output_layer.weight") \
            else None
        to_megatron_shard(spec, find_param(spec, name, te), reader, tp_rank, tp_size, padded_vocab=padded, out=p)
        filled += 1
    return filled
