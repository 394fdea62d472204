"""Megatron checkpoints of a GPTModel in Megatron-LM's own layout, written atomically.

Layout of a checkpoint directory (format 2)::

    latest_checkpointed_iteration.txt   Megatron-LM's layout (``megatron_layout``): Megatron-LM
    iter_000000N/                       (``--load DIR --finetune``) and Megatron-Bridge load these two
    hf/                                 config.json, generation config and tokenizer files of the HF source
    lpreg_checkpoint.json               our metadata; written last, so its presence means "complete"

``iter_000000N`` is one megatron-core torch_dist save of the GPTModel's sharded state dict (decoder
layers stacked into [L, ...] tensors): dist_checkpointing stores global tensors, so any TP size
loads it. ``load_model`` also reads checkpoints Megatron-LM or Bridge wrote (no ``hf/``, no marker:
the model's config comes from elsewhere) and our previous layout (``legacy_layout``).

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

FORMAT_VERSION = 2  # 1: the previous layout (legacy_layout), still read
MARKER = "lpreg_checkpoint.json"
HF_DIR = "hf"


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
# groups: the unit a converter materialises (one decoder layer; the embedding; the rest)


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


def group_parameters(model, group: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(model-level name, parameter) of one group; looked up afresh because ``to_empty``
    replaces parameter objects."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for m in group_modules(model, group) for p in m.parameters()]


def check_dcp_files(path: str | os.PathLike) -> None:
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
    if meta.get("format") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, this code reads 1 and {FORMAT_VERSION}")
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


def save_model(model, checkpoint_dir: str | os.PathLike, metadata: dict, *, args, iteration: int = 0,
               hf_source: str | os.PathLike | None = None, overwrite: bool = False) -> None:
    """Save ``model`` in Megatron-LM's layout with one save (collective), then ``metadata`` as the
    completeness marker. ``args``: Megatron-LM args (``megatron_layout.megatron_args``)."""
    from megatron_lpreg import megatron_layout

    with staged_directory(checkpoint_dir, overwrite) as tmp:
        if hf_source is not None and _rank() == 0:
            copy_hf_files(hf_source, tmp / HF_DIR)
        megatron_layout.save_whole(model, tmp, iteration, args)
        write_metadata(tmp, {**metadata, "layout": "megatron-lm", "iteration": iteration})


def describe(checkpoint_dir: str | os.PathLike) -> dict:
    """Our metadata of a checkpoint, or for a Megatron-LM/Bridge one (no marker) what its args say:
    ``layout``, ``num_layers``, ``vocab_size`` (None when unknown) and ``iteration_dir``."""
    from megatron_lpreg import megatron_layout

    checkpoint_dir = Path(checkpoint_dir)
    meta = read_metadata(checkpoint_dir) if is_complete(checkpoint_dir) else None
    if meta is not None and meta.get("format") == 1:
        return {**meta, "layout": "legacy"}
    try:
        found = megatron_layout.find_iteration_dir(checkpoint_dir)
    except megatron_layout.LayoutError as e:
        raise CheckpointError(str(e)) from None
    if meta is not None:
        if found is None:
            raise CheckpointError(f"{checkpoint_dir}: no {megatron_layout.TRACKER} (an incomplete copy?)")
        return {**meta, "iteration_dir": found}
    if found is None:
        raise CheckpointError(f"{checkpoint_dir}: not a checkpoint (no {MARKER}, no "
                              f"{megatron_layout.TRACKER}, no torch_dist metadata.json)")
    args = megatron_layout.read_args(found)
    return {"layout": "megatron-lm", "iteration_dir": found, "args": args,
            "num_layers": getattr(args, "num_layers", None), "vocab_size": getattr(args, "vocab_size", None)}


def check_files(checkpoint_dir: str | os.PathLike, num_layers: int) -> dict:
    """A checkpoint (either layout, or Megatron-LM's) holds a ``num_layers`` model and every shard
    file its index names, whole: read from metadata and file sizes, no tensor loaded. Returns
    ``describe``'s answer."""
    from megatron_lpreg import legacy_layout

    meta = describe(checkpoint_dir)
    held = meta.get("num_layers") or (len(meta["groups"]) - 2 if isinstance(meta.get("groups"), list) else None)
    if held is not None and held != num_layers:
        raise CheckpointError(f"{checkpoint_dir}: holds a {held}-layer model ({meta.get('architecture', '?')}), "
                              f"this model has {num_layers} layers")
    if meta["layout"] == "legacy":
        for group in model_groups(num_layers):
            check_dcp_files(Path(checkpoint_dir) / legacy_layout.MODEL_DIR / group)
    else:
        check_dcp_files(meta["iteration_dir"])
    return meta


def load_model(model, checkpoint_dir: str | os.PathLike, on_group: Callable[[str], None] | None = None,
               vocab_size: int | None = None) -> dict:
    """Load a checkpoint into ``model`` (any TP size; collective); returns what ``describe`` says.
    Ours (either layout) or one Megatron-LM / Bridge wrote. ``vocab_size``: the real vocabulary,
    for a checkpoint that does not record it (padding rows are zeroed)."""
    from megatron_lpreg import legacy_layout, megatron_layout

    layers = len(model.decoder.layers)
    meta = check_files(checkpoint_dir, layers)
    if meta["layout"] == "legacy":
        for group in model_groups(layers):
            legacy_layout.load_group(model, group, checkpoint_dir)
            if on_group:
                on_group(group)
    else:
        try:
            iter_dir = meta["iteration_dir"]
            sharded = megatron_layout.model_sharded_state_dict(model, not megatron_layout.stacked(iter_dir))
            megatron_layout.load_into(model, megatron_layout.weights_only(sharded), iter_dir, "the model")
        except megatron_layout.LayoutError as e:
            raise CheckpointError(str(e)) from None
    vocab = meta.get("vocab_size") or vocab_size
    if vocab:
        zero_vocab_padding(model, int(vocab))
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
