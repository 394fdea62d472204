"""A training model's weights as a plain Hugging Face directory (safetensors, config, tokenizer).

The live model's TP shards stream through the weight table (``weights.stream``, as a refit does)
to global rank 0, which writes them straight into size-bounded safetensors shards
(``HFShardWriter``): one bucket and one output shard in memory, never the model. The config and
tokenizer files come from the run's HF source, with ``torch_dtype`` set to the weights' dtype.
Other data-parallel replicas hold the same weights and only wait. Collective over the world.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_lpreg import checkpointing as ckpt
from megatron_lpreg.model.hf_config import ModelSpec
from megatron_lpreg.parallel import group_rank
from megatron_lpreg.weights.hf_files import HFShardWriter
from megatron_lpreg.weights.stream import stream_hf_weights
from megatron_lpreg.weights.table import find_param, is_weight

_HF_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
             torch.float64: "float64"}


def export_hf(model, spec: ModelSpec, hf_source: str | os.PathLike, out_dir: str | os.PathLike, *,
              tp_group=None, dp_group=None, te: bool = False, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``model`` (this rank's TP shard) to ``out_dir`` as an HF checkpoint; returns the path.
    Replaces an existing ``out_dir``; appears whole or not at all (staged, then renamed)."""
    out_dir = Path(out_dir)
    params = [(n, p) for n, p in model.named_parameters() if is_weight(n)]
    # The stream's own order, so each tensor arrives in its turn and the writer buffers nothing.
    plan = [(hf, shape, p.dtype) for n, p in params
            for hf, shape in zip(find_param(spec, n, te).hf, find_param(spec, n, te).hf_shapes)]
    with ckpt.staged_directory(out_dir, overwrite=True) as tmp:
        if group_rank(dp_group) == 0:
            writer = HFShardWriter(tmp, plan, max_shard_bytes) if group_rank(tp_group) == 0 else None
            for bucket in stream_hf_weights(model, spec, tp_group=tp_group, dst_tp_rank=0, te=te):
                for name, tensor in bucket:
                    writer.add(name, tensor.cpu())
            if writer is not None:
                writer.close()
                ckpt.copy_hf_files(hf_source, tmp)
                set_config_dtype(tmp / "config.json", params[0][1].dtype)
    return out_dir


def set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """An HF config.json states the dtype its weights were written in."""
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = _HF_DTYPE[dtype]
    if "dtype" in config:  # transformers >= 4.56 writes "dtype" as well
        config["dtype"] = _HF_DTYPE[dtype]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
