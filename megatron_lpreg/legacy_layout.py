"""Read (and, for tests and the save-time benchmark, write) the previous checkpoint layout.

Before format 2, a checkpoint held one dist_checkpointing save per group, each with per-layer keys
(``decoder.layers.{i}.…``), and no Megatron-LM tracker::

    model/embedding/  model/layer_00000/ ...  model/final/     lpreg_checkpoint.json ("format": 1)
    optim/<group>/    (training checkpoints)

``checkpointing.load_model`` and ``megatron_to_hf`` still read its model part; to move one to the
Megatron-LM layout, convert it to HF and back (``megatron_to_hf`` then ``hf_to_megatron``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_lpreg.checkpointing import (
    MARKER, CheckpointError, _barrier, _rank, check_dcp_files, first_line, group_parameters, load_errors,
    model_groups, staged_directory,
)

FORMAT = 1
MODEL_DIR = "model"

# local layer spec name -> Transformer Engine spec name (the norm is fused into the next linear)
_CANONICAL_SUFFIX = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _canonical_key(key: str) -> str:
    for local, te in _CANONICAL_SUFFIX.items():
        if key.endswith("." + local):
            return key[: -len(local)] + te
    return key


def group_sharded_state_dict(model, group: str) -> dict:
    """megatron-core's sharded state dict of one group's weights (no ``_extra_state`` objects:
    they hold fp8 metadata of TE layers, which these checkpoints do not carry).

    Dict keys are ``model.state_dict()`` names; the sharded tensors' own keys are the canonical
    checkpoint keys.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if group.startswith("layer_"):
        i = int(group[len("layer_"):])
        sd = model.decoder.layers[i].sharded_state_dict(
            prefix=f"decoder.layers.{i}.", sharded_offsets=(), metadata=None)
    elif group == "embedding":
        sd = model.embedding.sharded_state_dict(prefix="embedding.")
    elif group == "final":
        sd = {k: v for k, v in model.sharded_state_dict().items()
              if not k.startswith(("embedding.", "decoder.layers."))}
    else:
        raise CheckpointError(f"unknown checkpoint group {group!r}")
    out = {}
    for name, item in sd.items():
        if name.endswith("_extra_state"):
            continue
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            raise CheckpointError(f"unexpected {type(item).__name__} for {name!r} in group {group}")
        item.key = _canonical_key(item.key)
        out[name] = item
    return out


def save_group(model, group: str, checkpoint_dir: str | os.PathLike) -> None:
    from megatron.core import dist_checkpointing

    path = Path(checkpoint_dir) / MODEL_DIR / group
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(group_sharded_state_dict(model, group), str(path))


def save_model(model, checkpoint_dir: str | os.PathLike, metadata: dict) -> None:
    """A whole checkpoint in this layout: what tests of the reader, and the save-time benchmark's
    "before" column, need (collective)."""
    import json

    groups = model_groups(len(model.decoder.layers))
    with staged_directory(checkpoint_dir, overwrite=True) as tmp:
        for group in groups:
            save_group(model, group, tmp)
        _barrier()
        if _rank() == 0:
            (tmp / MARKER).write_text(json.dumps({**metadata, "format": FORMAT, "groups": groups}))


@torch.no_grad()
def load_group(model, group: str, checkpoint_dir: str | os.PathLike) -> None:
    from megatron.core import dist_checkpointing

    path = Path(checkpoint_dir) / MODEL_DIR / group
    check_dcp_files(path)
    sharded = group_sharded_state_dict(model, group)
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except load_errors() as e:  # re-raised with the group named; megatron's errors are long
        raise CheckpointError(f"{path}: cannot load group {group!r} into this model: {first_line(e)}") from e
    params = group_parameters(model, group)
    missing = [n for n, _ in params if n not in loaded]
    if missing:
        raise CheckpointError(f"{path}: group {group!r} lacks {missing}")
    for name, param in params:
        tensor = loaded[name]
        if tensor.shape != param.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
        if tensor.data_ptr() != param.data_ptr():
            param.copy_(tensor)
