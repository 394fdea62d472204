"""Megatron distributed checkpoints of a GPTModel, written group by group and atomically.

Layout of a checkpoint directory::

    model/embedding/        one megatron-core dist_checkpointing (torch_dist) checkpoint per group:
    model/layer_00000/      the embedding, each decoder layer, and the final norm + output layer
    ...
    model/final/
    hf/                     config.json, generation config and tokenizer files of the HF source
    lpreg_checkpoint.json   metadata; written last, so its presence means "complete"

Why groups: megatron's whole-model sharded state dict stacks the decoder layers into [L, ...]
tensors, so one save needs every layer in memory at once. A group per layer lets the converters
stream (one layer resident), and any TP size can load it, because dist_checkpointing stores global
tensors and reshards on load. Keys are megatron's, with the two local-spec norm names mapped to the
Transformer Engine names, so checkpoints written under either layer spec load under the other.

Atomicity: everything is written into a hidden ``.<name>.partial`` sibling that is renamed into
place after the metadata is written; an interrupted save leaves no directory that looks complete,
and a failed one (an exception, e.g. a full disk) removes its partial directory.
All functions are collective over the default process group when it has several ranks (each rank
writes its own shards; rank 0 writes the metadata and renames).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lpreg import faults
from megatron_lpreg.parallel import barrier, world_group

FORMAT_VERSION = 1
MARKER = "lpreg_checkpoint.json"
MODEL_DIR = "model"
HF_DIR = "hf"

# local layer spec name -> Transformer Engine spec name (the norm is fused into the next linear)
_CANONICAL_SUFFIX = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


# Parameter dtypes by the short names checkpoints record (and the converters' --dtype accepts).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_metadata(spec, *, source, dtype: torch.dtype, tp_size: int, padded_vocab_size: int) -> dict:
    """What every model checkpoint records about its model (converters and training write it)."""
    return {
        "source": str(Path(source).resolve()), "architecture": spec.architecture,
        "dtype": {v: k for k, v in DTYPES.items()}[dtype], "tp_size": tp_size,
        "vocab_size": spec.vocab_size, "padded_vocab_size": padded_vocab_size, "num_layers": spec.num_layers,
    }


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model."""


def load_errors() -> tuple[type[BaseException], ...]:
    """What a failed dist_checkpointing load raises: torch's CheckpointException is a BaseException.
    (Called in ``except`` clauses, so torch.distributed.checkpoint is only imported once a load failed.)"""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover - older torch
        return (Exception,)
    return (Exception, CheckpointException)


def first_line(error: BaseException, limit: int = 300) -> str:
    """One line of a library's error for a one-line message (megatron's can run to pages)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        # torch's CheckpointException wraps each rank's error with its traceback: report the error.
        first = next(iter(failures.values()))
        error = first[0] if isinstance(first, tuple) else first
    text = " ".join(str(error).split("\n", 1)[0].split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    barrier(world_group())


# ---------------------------------------------------------------------------------------------
# groups


def layer_group(i: int) -> str:
    return f"layer_{i:05d}"


def model_groups(num_layers: int) -> list[str]:
    return ["embedding", *(layer_group(i) for i in range(num_layers)), "final"]


def group_modules(model, group: str) -> list[torch.nn.Module]:
    """The submodules of ``model`` whose parameters form ``group`` (to materialise or free them)."""
    if group == "embedding":
        return [model.embedding]
    if group == "final":
        mods = [model.decoder.final_layernorm]
        if getattr(model.output_layer, "weight", None) is not None:  # None when tied
            mods.append(model.output_layer)
        return mods
    if group.startswith("layer_"):
        return [model.decoder.layers[int(group[len("layer_"):])]]
    raise CheckpointError(f"unknown checkpoint group {group!r}")


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


def group_parameters(model, group: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(model-level name, parameter) of one group; looked up afresh because ``to_empty``
    replaces parameter objects."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for m in group_modules(model, group) for p in m.parameters()]


def save_group(model, group: str, checkpoint_dir: str | os.PathLike) -> None:
    from megatron.core import dist_checkpointing

    path = Path(checkpoint_dir) / MODEL_DIR / group
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(group_sharded_state_dict(model, group), str(path))


def check_group_files(path: str | os.PathLike) -> None:
    """Every shard file a dist_checkpointing directory's index refers to is there and long enough.

    A truncated or lost ``.distcp`` file otherwise surfaces as an unpickling or short-read error deep
    inside torch; here it is named, before any tensor is read (the index is a few KB).
    """
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not (path / "metadata.json").exists():
        raise CheckpointError(f"{path}: missing (not a complete checkpoint group)")
    try:
        index = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a missing or corrupt .metadata file, in whatever form torch reports it
        raise CheckpointError(f"{path}: unreadable checkpoint index ({first_line(e)})") from None
    needed: dict[str, int] = {}
    for info in (getattr(index, "storage_data", None) or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing shard file")
        have = shard.stat().st_size
        if have < size:
            raise CheckpointError(f"{shard}: truncated ({have} bytes, the index needs {size})")


@torch.no_grad()
def load_group(model, group: str, checkpoint_dir: str | os.PathLike) -> None:
    from megatron.core import dist_checkpointing

    path = Path(checkpoint_dir) / MODEL_DIR / group
    check_group_files(path)
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


# ---------------------------------------------------------------------------------------------
# whole checkpoints


def read_metadata(checkpoint_dir: str | os.PathLike) -> dict:
    path = Path(checkpoint_dir) / MARKER
    if not path.exists():
        raise CheckpointError(f"{checkpoint_dir}: not a complete checkpoint (no {MARKER})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, this code reads {FORMAT_VERSION}")
    return meta


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    return (Path(checkpoint_dir) / MARKER).exists()


def check_writable(final: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace a non-empty ``final`` unless ``overwrite``."""
    final = Path(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise CheckpointError(f"{final} exists and is not empty (pass overwrite/--force to replace it)")


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden partial directory; on success it replaces ``final`` (collective).

    The caller writes the metadata marker last, inside the block. A non-empty ``final`` is an
    error unless ``overwrite``; on an exception the partial directory stays hidden.
    """
    final = Path(final)
    check_writable(final, overwrite)
    partial = final.parent / f".{final.name}.partial"
    if _rank() == 0:
        if partial.exists():
            shutil.rmtree(partial)  # the leftover of an interrupted save
        partial.mkdir(parents=True)
    _barrier()
    try:
        yield partial
    except BaseException:
        # Free what was written (a full disk is a likely cause); the name is hidden either way.
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    _barrier()
    if _rank() == 0:
        faults.point("checkpoint_rename")
        old = final.parent / f".{final.name}.old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(partial, final)
        if old.exists():
            shutil.rmtree(old)
    _barrier()


def write_metadata(checkpoint_dir: str | os.PathLike, metadata: dict) -> None:
    """Write the completeness marker (rank 0); call it after every group is saved."""
    _barrier()
    if _rank() == 0:
        path = Path(checkpoint_dir) / MARKER
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, **metadata}, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def copy_hf_files(source: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy config, generation config and tokenizer files (everything but weights) of a HF
    directory; returns the names copied."""
    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for item in sorted(source.iterdir()):
        if not item.is_file() or item.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf") \
                or item.name.endswith(".index.json"):
            continue
        shutil.copy2(item, dest / item.name)
        copied.append(item.name)
    return copied


def save_model(
    model,
    checkpoint_dir: str | os.PathLike,
    metadata: dict,
    *,
    hf_source: str | os.PathLike | None = None,
    overwrite: bool = False,
    on_group: Callable[[str], None] | None = None,
) -> None:
    """Save every group of ``model`` (collective), then ``metadata`` as the completeness marker."""
    groups = model_groups(len(model.decoder.layers))
    with staged_directory(checkpoint_dir, overwrite) as tmp:
        if hf_source is not None and _rank() == 0:
            copy_hf_files(hf_source, tmp / HF_DIR)
        for group in groups:
            save_group(model, group, tmp)
            if on_group:
                on_group(group)
        write_metadata(tmp, {**metadata, "groups": groups})


def load_model(model, checkpoint_dir: str | os.PathLike, on_group: Callable[[str], None] | None = None) -> dict:
    """Load a complete checkpoint into ``model`` (any TP size; collective); returns its metadata."""
    meta = read_metadata(checkpoint_dir)
    groups = model_groups(len(model.decoder.layers))
    if meta.get("groups") != groups:
        held = meta.get("num_layers") or (len(meta["groups"]) - 2 if isinstance(meta.get("groups"), list) else "?")
        raise CheckpointError(f"{checkpoint_dir}: holds a {held}-layer model ({meta.get('architecture', '?')}), "
                              f"this model has {len(groups) - 2} layers")
    for group in groups:
        load_group(model, group, checkpoint_dir)
        if on_group:
            on_group(group)
    zero_vocab_padding(model, int(meta["vocab_size"]))
    return meta


@torch.no_grad()
def zero_vocab_padding(model, vocab_size: int) -> None:
    """Zero the embedding / output rows of padding ids (>= vocab_size) on this TP rank.

    A checkpoint written at another TP size has another padded vocabulary; megatron loads the
    overlap (``allow_shape_mismatch``) and leaves the rest as initialised. Zero rows keep padding
    logits at exactly 0 (the loss masks them anyway).
    """
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            first_id = rank * param.shape[0]
            start = min(max(vocab_size - first_id, 0), param.shape[0])
            param[start:].zero_()
