"""The torch-DCP index of a torch_dist checkpoint: join several saves into one, read one region.

A torch_dist checkpoint is shard files plus one ``.metadata`` index saying, for every tensor, its
global shape, its stored chunks and where each chunk's bytes are (file, offset, length). Saves of
disjoint parts of a model therefore join by moving their shard files into one directory and uniting
their indexes: the result holds the same chunks, bytes and index entries as one save of the whole
model, up to file names, and any reader (megatron-core, torch DCP, Megatron-LM, Bridge) loads it.
This is what lets a converter write Megatron-LM's layout with one layer resident.

A decoder layer is saved as a stack of one (megatron's layer axis prepended, of length 1: a save of
layer ``i`` of ``[L, ...]`` alone is something megatron's writer cannot express in one process, it
places the other layers' chunks on rank ``(0 + 1) % 1``); the merge moves it to ``[i]`` of ``L``.

Reading goes the other way: ``read_regions`` reads one layer's slice of the stacked tensors by
looking its chunks up in the index and loading just those (megatron's loader, in a one-process
world, cannot be asked for part of a stacked tensor, for the same reason).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import torch

INDEX = ".metadata"


class MergeError(RuntimeError):
    """Two parts disagree about a tensor, or a part is not a torch-DCP save."""


def read_index(directory: str | os.PathLike):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(directory)).read_metadata()


def _merge_entry(key: str, have, new, part: Path):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if isinstance(have, TensorStorageMetadata) and isinstance(new, TensorStorageMetadata):
        if have.size != new.size or have.properties.dtype != new.properties.dtype:
            raise MergeError(f"{part}: {key} is {tuple(new.size)} {new.properties.dtype} here, "
                             f"{tuple(have.size)} {have.properties.dtype} in an earlier part")
        taken = {tuple(c.offsets) for c in have.chunks}
        clash = [tuple(c.offsets) for c in new.chunks if tuple(c.offsets) in taken]
        if clash:
            raise MergeError(f"{part}: chunk {clash[0]} of {key} is already stored by an earlier part")
        have.chunks.extend(new.chunks)
        return have
    raise MergeError(f"{part}: {key} is stored by an earlier part too")


def _at_layer(text: str, layer: int, layers: int) -> str:
    """A ShardedObject's storage key ``<key>/shard_<offsets>_<shape>`` moved from layer 0 of 1 to
    ``layer`` of ``layers`` (the layer axis comes first)."""
    key, _, where = text.rpartition("/shard_")
    offsets, shape = (part.split(".") for part in where.split("_"))
    if offsets[0] != "0" or shape[0] != "1":
        raise MergeError(f"{text}: expected a one-layer stack")
    return f"{key}/shard_{'.'.join([str(layer), *offsets[1:]])}_{'.'.join([str(layers), *shape[1:]])}"


def restack(index, layer: int, layers: int):
    """The index of a one-layer stack (layer axis of length 1) as layer ``layer`` of ``layers``."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata,
    )

    def move(offsets):
        if offsets[0] != 0:
            raise MergeError(f"chunk at {tuple(offsets)}: expected a one-layer stack")
        return torch.Size([layer, *offsets[1:]])

    tensors, renamed = {}, {}
    for key, entry in index.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            if entry.size[0] != 1:
                raise MergeError(f"{key} {tuple(entry.size)}: expected a one-layer stack")
            tensors[key] = TensorStorageMetadata(
                entry.properties, torch.Size([layers, *entry.size[1:]]),
                [ChunkStorageMetadata(move(c.offsets), c.sizes) for c in entry.chunks])
        else:
            renamed[key] = _at_layer(key, layer, layers)
            tensors[renamed[key]] = entry
    storage = {}
    for where, info in index.storage_data.items():
        if where.offset is not None:
            where = MetadataIndex(where.fqn, move(where.offset), where.index)
        else:
            where = MetadataIndex(renamed.get(where.fqn, where.fqn), None, where.index)
        storage[where] = info
    planner = {renamed.get(k, k): v for k, v in (index.planner_data or {}).items()}
    return Metadata(state_dict_metadata=tensors, planner_data=planner, storage_data=storage,
                    storage_meta=index.storage_meta, version=index.version)


def merge_parts(parts: list[tuple[Path, int | None]], dest: Path, layers: int, file_prefix: str = "__part") -> int:
    """Move the shard files of the torch-DCP saves ``parts`` (in order; each with the decoder layer
    it holds as a one-layer stack, or None) into ``dest`` and write one index there; returns the
    number of stored chunks. The parts' own index and shard files are consumed (other files in
    them, e.g. megatron's ``common.pt``, are left for the caller)."""
    from torch.distributed.checkpoint.metadata import Metadata

    dest.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    storage: dict = {}
    planner: dict = {}
    first = None
    for n, (part, layer) in enumerate(parts):
        index = read_index(part)
        if layer is not None:
            index = restack(index, layer, layers)
        first = first or index
        renamed = {}
        for name in sorted({info.relative_path for info in index.storage_data.values()}):
            renamed[name] = f"{file_prefix}{n:05d}_{name.lstrip('_')}"
            os.replace(part / name, dest / renamed[name])
        for where, info in index.storage_data.items():
            storage[where] = dataclasses.replace(info, relative_path=renamed[info.relative_path])
        for key, entry in index.state_dict_metadata.items():
            tensors[key] = _merge_entry(key, tensors[key], entry, part) if key in tensors else entry
        planner.update(index.planner_data or {})
        (part / INDEX).unlink()
    if first is None:
        raise MergeError(f"{dest}: nothing to merge")
    merged = Metadata(state_dict_metadata=tensors, planner_data=planner, storage_data=storage,
                      storage_meta=first.storage_meta, version=first.version)
    tmp = dest / (INDEX + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(merged, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest / INDEX)
    return len(storage)


def check_covered(directory: str | os.PathLike) -> None:
    """Every tensor of a torch-DCP index is covered by its chunks exactly once (by volume): a merge
    that lost or doubled a layer is caught before anyone reads the checkpoint."""
    from math import prod

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, entry in read_index(directory).state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            stored = sum(prod(c.sizes) for c in entry.chunks)
            if stored != prod(entry.size):
                raise MergeError(f"{directory}: {key} {tuple(entry.size)} has {stored} of "
                                 f"{prod(entry.size)} elements stored")


# ---------------------------------------------------------------------------------------------
# reading regions


def _overlap(chunk_offsets, chunk_sizes, region_offsets, region_sizes):
    """Per-dimension (start in chunk, start in region, length) of two boxes, or None if disjoint."""
    out = []
    for c0, cn, r0, rn in zip(chunk_offsets, chunk_sizes, region_offsets, region_sizes):
        lo, hi = max(c0, r0), min(c0 + cn, r0 + rn)
        if lo >= hi:
            return None
        out.append((lo - c0, lo - r0, hi - lo))
    return out


@torch.no_grad()
def read_regions(directory: str | os.PathLike, wanted: list[tuple[str, tuple[int, ...], torch.Tensor]]) -> None:
    """Fill each destination tensor with region ``offsets`` (of its shape) of stored tensor ``key``,
    reading only the stored chunks that overlap it (one at a time: the index gives each chunk's file,
    offset and length); rows of the destination beyond the stored tensor (a larger vocabulary
    padding) are left as they are. Local: no process group."""
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    directory = Path(directory)
    index = read_index(directory)
    for key, offsets, dest in wanted:
        entry = index.state_dict_metadata.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise MergeError(f"{directory}: no tensor {key!r}")
        for chunk in entry.chunks:
            overlap = _overlap(chunk.offsets, chunk.sizes, offsets, dest.shape)
            if overlap is None:
                continue
            info = index.storage_data[MetadataIndex(key, chunk.offsets)]
            if getattr(info, "transform_descriptors", None):
                raise MergeError(f"{directory}: {key} is stored transformed ({info.transform_descriptors}); "
                                 f"only plain torch_dist chunks are read here")
            with open(directory / info.relative_path, "rb") as f:
                f.seek(info.offset)
                stored = torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
            src = stored[tuple(slice(a, a + n) for a, _, n in overlap)]
            dest[tuple(slice(b, b + n) for _, b, n in overlap)].copy_(src.view(src.shape))
            del stored, src
