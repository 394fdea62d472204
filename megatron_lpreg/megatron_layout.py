"""Megatron-LM's checkpoint layout, written and read the way Megatron-LM and Megatron-Bridge do::

    latest_checkpointed_iteration.txt    the iteration N (or "release"); Megatron-LM reads it first
    iter_000000N/                        ONE megatron-core torch_dist save of
                                           {'model': GPTModel.sharded_state_dict(),
                                            'checkpoint_version': 3.0, 'iteration': N, 'args': Namespace}
        run_config.yaml                  the model's shape for Megatron-Bridge

Keys are the GPTModel's own: decoder layers stacked, ``decoder.layers.self_attention.linear_qkv.weight``
is one [L, ...] tensor, each layer a chunk ``[i]`` of it. Megatron-LM's ``--load DIR --finetune``
(or ``--no-load-optim --no-load-rng``) and Bridge load the model part; ``args`` says
``no_save_optim``/``no_save_rng``, since our optimiser and RNG state sit beside it in our own form.

Two ways to write it: ``save_whole`` (the model is resident: one save, the training checkpoint) and
``StreamingWriter`` (a converter: one group resident at a time, each group saved on its own and the
saves joined by ``dcp_index``, which writes the same index one save would). Reading goes a group at
a time: each group's sharded state dict names its slice ``[i]`` of the stacked tensors, so
megatron's loader reads just that layer's bytes (as a pipeline stage reads its layers).
"""

from __future__ import annotations

import os
import shutil
from argparse import Namespace
from pathlib import Path

import torch

from megatron_lpreg.checkpointing import _barrier, _rank  # the one place ranks synchronise

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.yaml"
CHECKPOINT_VERSION = 3.0
_PARTS = ".parts"  # the streaming writer's per-group saves, merged and removed by finish()


class LayoutError(RuntimeError):
    """Not a Megatron-LM-layout checkpoint, or one that does not fit the model."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def is_torch_dist(path: Path) -> bool:
    return (path / "metadata.json").is_file() and (path / ".metadata").is_file()


def find_iteration_dir(path: str | os.PathLike) -> Path | None:
    """The torch_dist directory of a Megatron-LM-layout checkpoint: the one the tracker names,
    or ``path`` itself when it is an ``iter_*`` directory; None if ``path`` is neither."""
    path = Path(path)
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            found = path / "release"
        elif text.isdigit():
            found = path / iteration_dir_name(int(text))
        else:
            raise LayoutError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
        if not is_torch_dist(found):
            raise LayoutError(f"{tracker} names {found.name}, which is not a torch_dist checkpoint "
                              f"(no metadata.json/.metadata)")
        return found
    return path if is_torch_dist(path) else None


# ---------------------------------------------------------------------------------------------
# what Megatron-LM and Bridge read besides the tensors


def megatron_args(spec, *, tp_size: int, dtype: torch.dtype, padded_vocab_size: int, iteration: int) -> Namespace:
    """The Megatron-LM ``args`` of a GPTModel of ``spec`` (``--use-checkpoint-args`` rebuilds it)."""
    from megatron_lpreg.model.hf_config import VOCAB_DIVISOR

    return Namespace(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, num_query_groups=spec.num_kv_heads,
        group_query_attention=spec.num_kv_heads != spec.num_attention_heads, kv_channels=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings, seq_length=spec.max_position_embeddings,
        position_embedding_type="rope", add_position_embedding=False, rotary_base=spec.rope_theta,
        rotary_percent=1.0, use_rope_scaling=spec.rope_scaling_factor is not None,
        rope_scaling_factor=spec.rope_scaling_factor or 8.0,
        normalization="RMSNorm", norm_epsilon=spec.rms_norm_eps, swiglu=True, add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias, qk_layernorm=spec.qk_norm,
        untie_embeddings_and_output_weights=not spec.tie_word_embeddings,
        vocab_size=spec.vocab_size, padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=VOCAB_DIVISOR,
        tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=1,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        ckpt_format="torch_dist", use_dist_ckpt=True, iteration=iteration,
        no_save_optim=True, no_save_rng=True,  # ours sit beside the model part, in our own form
    )


def run_config(args: Namespace) -> dict:
    """Megatron-Bridge's ``run_config.yaml`` for ``args``: the model section Bridge reads the
    parallel sizes and shape from (``model`` now, ``model_config`` in older Bridge)."""
    model = {
        "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
        "num_layers": args.num_layers, "hidden_size": args.hidden_size, "ffn_hidden_size": args.ffn_hidden_size,
        "num_attention_heads": args.num_attention_heads, "num_query_groups": args.num_query_groups,
        "kv_channels": args.kv_channels, "seq_length": args.seq_length,
        "normalization": args.normalization, "layernorm_epsilon": args.norm_epsilon,
        "gated_linear_unit": True, "add_bias_linear": False, "add_qkv_bias": args.add_qkv_bias,
        "qk_layernorm": args.qk_layernorm, "position_embedding_type": "rope", "rotary_base": args.rotary_base,
        "share_embeddings_and_output_weights": not args.untie_embeddings_and_output_weights,
        "vocab_size": args.padded_vocab_size, "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "bf16": args.bf16, "fp16": args.fp16,
        # Bridge's YAML form of a dtype and of a function: an object its loader resolves, not called
        "params_dtype": {"_target_": str(args.params_dtype), "_call_": False},
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
    }
    return {"model": model, "model_config": dict(model),
            "checkpoint": {"save_optim": False, "save_rng": False, "ckpt_format": "torch_dist"}}


def write_side_files(root: Path, iteration: int, args: Namespace | None) -> None:
    """Tracker and run_config.yaml (rank 0; none without ``args``): what makes ``root`` a
    Megatron-LM/Bridge load directory. The tracker is written last, as Megatron-LM does."""
    import yaml

    if _rank() == 0:
        if args is not None:
            (root / iteration_dir_name(iteration) / RUN_CONFIG).write_text(
                yaml.safe_dump(run_config(args), sort_keys=False))
        (root / TRACKER).write_text(f"{iteration}\n")
    _barrier()


def read_args(iter_dir: Path) -> Namespace | None:
    """Megatron-LM's ``args`` from ``common.pt``; Bridge's ``run_config.yaml`` model section as a
    Namespace when there are none; None if neither is there."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    if isinstance(common.get("args"), Namespace):
        return common["args"]
    path = iter_dir / RUN_CONFIG
    if path.is_file():
        import yaml

        config = yaml.safe_load(path.read_text()) or {}
        model = config.get("model") or config.get("model_config")
        if isinstance(model, dict):
            return Namespace(**model)
    return None


# ---------------------------------------------------------------------------------------------
# sharded state dicts: the whole model, or one group of it


def weights_only(sharded: dict) -> dict:
    """Drop ``_extra_state`` objects (TE/fp8 metadata, no weights): a load asks for weights only, so
    checkpoints written under either layer spec load under the other."""
    return {k: v for k, v in sharded.items() if not k.endswith("_extra_state")}


def stacked(iter_dir: Path) -> bool:
    """Whether the checkpoint stacks its decoder layers (``decoder.layers.<name>``, [L, ...]: the
    default) or keys them per layer (``decoder.layers.<i>.<name>``: megatron's non-homogeneous
    layers option)."""
    from megatron_lpreg.dcp_index import read_index

    return not any(k.startswith("decoder.layers.") and k.split(".")[2].isdigit()
                   for k in read_index(iter_dir).state_dict_metadata)


def model_sharded_state_dict(model, per_layer: bool = False) -> dict:
    """``model.sharded_state_dict()``, with per-layer keys if ``per_layer`` (see ``stacked``)."""
    return model.sharded_state_dict(metadata={"non_homogeneous_layers": True} if per_layer else None)


def group_sharded_state_dict(model, group: str, alone: bool = False, per_layer: bool = False) -> dict:
    """The entries of ``model.sharded_state_dict()`` that belong to ``group`` (``checkpointing.
    model_groups``), built for that group alone: a layer is its slice ``[i]`` of the stacked keys,
    exactly as the whole model's dict has it (megatron's TransformerBlock does the same per layer).
    ``alone``: a layer as a stack of one (``[0]`` of 1), the form ``dcp_index`` restacks.
    ``per_layer``: keys of a checkpoint that is not stacked (``stacked``)."""
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    if group.startswith("layer_"):
        i = int(group[len("layer_"):])
        prefix = f"decoder.layers.{i}."
        if per_layer:
            return model.decoder.layers[i].sharded_state_dict(prefix, [], None)
        offsets = [(0, 0, 1)] if alone else [(0, i, len(model.decoder.layers))]
        sd = model.decoder.layers[i].sharded_state_dict(prefix, offsets, None)
        replace_prefix_for_sharding(sd, prefix, "decoder.layers.")
        return sd
    if group == "embedding":
        return model.embedding.sharded_state_dict(prefix="embedding.")
    if group == "final":
        # GPTModel decides how a tied output layer is stored: take its own dict for the rest.
        return {k: v for k, v in model.sharded_state_dict().items()
                if not k.startswith(("embedding.", "decoder.layers."))}
    raise LayoutError(f"unknown checkpoint group {group!r}")


def _state(model_sd: dict, iteration: int, args: Namespace | None) -> dict:
    state = {"model": model_sd, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    if args is not None:
        state["args"] = args
    return state


def save_whole(model, root: Path, iteration: int, args: Namespace) -> Path:
    """One save of the whole model into ``root/iter_N`` plus the side files (collective)."""
    from megatron.core import dist_checkpointing

    iter_dir = root / iteration_dir_name(iteration)
    if _rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(_state(model.sharded_state_dict(), iteration, args), str(iter_dir))
    write_side_files(root, iteration, args)
    return iter_dir


class StreamingWriter:
    """Megatron-LM's layout from one group at a time (one process, no process group needed
    beyond megatron's own): ``save(model, group)`` after each group is materialised, then
    ``finish()``. The result is one torch_dist save: shard files and one merged index."""

    def __init__(self, root: Path, iteration: int, args: Namespace):
        self.root, self.iteration, self.args = Path(root), iteration, args
        self.parts: list[tuple[Path, int | None]] = []
        self.layers = args.num_layers
        (self.root / _PARTS).mkdir(parents=True, exist_ok=True)

    def save(self, model, group: str) -> None:
        from megatron.core import dist_checkpointing

        part = self.root / _PARTS / f"{len(self.parts):05d}"
        part.mkdir()
        layer = int(group[len("layer_"):]) if group.startswith("layer_") else None
        dist_checkpointing.save(_state(group_sharded_state_dict(model, group, alone=True), self.iteration,
                                       self.args), str(part))
        self.parts.append((part, layer))

    def finish(self) -> Path:
        from megatron_lpreg import dcp_index

        iter_dir = self.root / iteration_dir_name(self.iteration)
        dcp_index.merge_parts(self.parts, iter_dir, self.layers)
        for name in ("common.pt", "metadata.json"):  # the same in every part
            os.replace(self.parts[-1][0] / name, iter_dir / name)
        shutil.rmtree(self.root / _PARTS)
        dcp_index.check_covered(iter_dir)
        write_side_files(self.root, self.iteration, self.args)
        return iter_dir


# ---------------------------------------------------------------------------------------------
# reading


def check_shapes(iter_dir: Path, sharded: dict, vocab_keys=("embedding.word_embeddings.weight",
                                                            "output_layer.weight")) -> None:
    """Every tensor ``sharded`` asks for is in the checkpoint's index with the same global shape
    (vocab rows may differ: padding depends on the TP size that wrote it): one line naming the first
    that is not, before megatron's loader reports it in pages."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_lpreg.dcp_index import read_index

    stored = read_index(iter_dir).state_dict_metadata
    for item in sharded.values():
        if isinstance(item, ShardedTensorFactory):
            want = {item.key: None}  # its stored form is megatron's business; the key must exist
        elif isinstance(item, ShardedTensor):
            want = {item.key: tuple(item.global_shape)}
        else:
            continue
        for key, shape in want.items():
            entry = stored.get(key)
            if not isinstance(entry, TensorStorageMetadata):
                raise LayoutError(f"{iter_dir}: no tensor {key!r} (a checkpoint of another architecture, "
                                  f"or written with different layer options)")
            have = tuple(entry.size)
            if shape is None or have == shape:
                continue
            if key in vocab_keys and have[1:] == shape[1:]:
                continue
            raise LayoutError(f"{iter_dir}: {key} has shape {have}, this model's is {shape} "
                              f"(a checkpoint of another model size?)")


def checkpoint_dtype(iter_dir: Path) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (that of the word embeddings)."""
    from megatron_lpreg.dcp_index import read_index

    entry = read_index(iter_dir).state_dict_metadata.get("embedding.word_embeddings.weight")
    if entry is None:
        raise LayoutError(f"{iter_dir}: no embedding.word_embeddings.weight (not a GPT model checkpoint)")
    return entry.properties.dtype


@torch.no_grad()
def load_into(model, sharded: dict, iter_dir: Path, what: str) -> None:
    """Load ``sharded`` (model.state_dict() names -> sharded entries, weights only) from
    ``iter_dir`` and copy it into ``model``'s parameters of those names (collective). ``sharded``
    may be one group: megatron's check that the request covers every stored tensor whole is off,
    ``check_shapes`` and the copy below check what is asked for."""
    from megatron.core import dist_checkpointing

    from megatron_lpreg.checkpointing import CheckpointError, first_line, load_errors

    check_shapes(iter_dir, sharded)
    params = dict(model.named_parameters())
    names = [n for n in sharded if n in params]
    try:
        loaded = dist_checkpointing.load({"model": sharded}, str(iter_dir), validate_access_integrity=False)["model"]
    except load_errors() as e:  # megatron's messages run to pages
        raise CheckpointError(f"{iter_dir}: cannot load {what} into this model: {first_line(e)}") from e
    missing = [n for n in names if n not in loaded]
    if missing:
        raise CheckpointError(f"{iter_dir}: {what} lacks {missing}")
    for name in names:
        tensor, param = loaded[name], params[name]
        if tensor.shape != param.shape:
            raise CheckpointError(
                f"{iter_dir}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
        if tensor.data_ptr() != param.data_ptr():
            param.copy_(tensor)


@torch.no_grad()
def read_group(model, group: str, iter_dir: Path) -> None:
    """Fill ``group``'s parameters (this TP rank's shards) from ``iter_dir``, reading only the
    group's bytes: for a layer, its slice ``[i]`` of each stacked tensor, located through the
    torch-DCP index (megatron's loader cannot hand out part of a stacked tensor in one process).
    Local: no collectives."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_lpreg.dcp_index import read_regions

    sharded = weights_only(group_sharded_state_dict(model, group, per_layer=not stacked(iter_dir)))
    check_shapes(iter_dir, sharded)
    params = dict(model.named_parameters())
    wanted, factories = [], []

    def want(sh: ShardedTensor) -> None:
        if sh.flattened_range is not None:
            raise LayoutError(f"{sh.key}: flattened shards are not read here")
        dest = sh.data.view((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
        wanted.append((sh.key, tuple(sh.global_offset), dest))

    for name, item in sharded.items():
        if name not in params:
            continue
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            for sh in nested_values(built):
                want(sh)
            factories.append((name, item, built))
        else:
            want(item)
    read_regions(iter_dir, wanted)
    for name, factory, built in factories:
        merged = factory.merge_fn(dict_list_map_inplace(lambda sh: sh.data, built))
        if merged.data_ptr() != params[name].data_ptr():
            params[name].copy_(merged)
