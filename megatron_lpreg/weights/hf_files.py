"""Streaming access to HF safetensors checkpoints: a lazy reader and a size-bounded shard writer.

The reader is a Mapping from HF tensor name to tensor that opens the right shard only when a
tensor is asked for, so a converter holds one layer, never the model. The writer buffers tensors
up to ``max_shard_bytes`` and then writes a shard, so it holds at most one output shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class HFCheckpointError(ValueError):
    """A HF checkpoint directory is incomplete or inconsistent."""


class HFCheckpoint(Mapping):
    """Read-only lazy view of the tensors of a (sharded) safetensors checkpoint directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise HFCheckpointError(f"{self.directory}: not a directory")
        self._file_of = self._locate()

    def _locate(self) -> dict[str, Path]:
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFCheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            files = {name: self.directory / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.exists():
                    raise HFCheckpointError(f"{index}: lists shard {shard.name}, which is missing")
            return files
        shards = sorted(self.directory.glob("*.safetensors"))
        if not shards:
            raise HFCheckpointError(f"{self.directory}: no *.safetensors files (and no {INDEX_NAME})")
        from safetensors import SafetensorError, safe_open

        files: dict[str, Path] = {}
        for shard in shards:
            try:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        files[name] = shard
            except SafetensorError as e:
                raise HFCheckpointError(f"{shard}: not a readable safetensors file ({e})") from None
        return files

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        path = self._file_of[name]  # KeyError for an unknown name, as a Mapping should
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except SafetensorError as e:
            raise HFCheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the shard headers (no tensor is read)."""
        from safetensors import safe_open

        shapes = {}
        for path in sorted(set(self._file_of.values())):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        return shapes


_ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


class HFShardWriter:
    """Streams tensors into ``model-0000k-of-0000n.safetensors`` shards plus the index.

    ``plan`` lists every tensor (name, shape, dtype) in file order; from it the shard boundaries and
    each shard's header are known before any data arrives, so tensor bytes go straight to disk and
    nothing is buffered but tensors that arrive ahead of their turn (in the converters, at most one
    layer's). Each shard is fsynced when complete.
    """

    def __init__(self, directory: str | os.PathLike, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 1024**3):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if len({name for name, _, _ in plan}) != len(plan):
            raise HFCheckpointError("the shard plan names a tensor twice")
        self._plan = [(name, tuple(shape), dtype, _numel(shape) * dtype.itemsize) for name, shape, dtype in plan]
        self._shards: list[list[int]] = [[]]  # plan indices per shard
        size = 0
        for i, (_, _, _, nbytes) in enumerate(self._plan):
            if self._shards[-1] and size + nbytes > max_shard_bytes:
                self._shards.append([])
                size = 0
            self._shards[-1].append(i)
            size += nbytes
        n = len(self._shards)
        self._file_names = [SINGLE_NAME] if n == 1 else \
            [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self._shard_of = {i: k for k, idx in enumerate(self._shards) for i in idx}
        self._next = 0  # plan index of the next tensor to write
        self._early: dict[int, torch.Tensor] = {}
        self._file = None
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        index = next((i for i in range(self._next, len(self._plan)) if self._plan[i][0] == name), None)
        if index is None:
            raise HFCheckpointError(f"tensor {name!r} is not in the plan, or was written already")
        _, shape, dtype, _ = self._plan[index]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise HFCheckpointError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                    f"the plan says {dtype} {shape}")
        self._early[index] = tensor.detach()
        while self._next in self._early:
            self._write(self._next, self._early.pop(self._next))
            self._next += 1

    def _write(self, index: int, tensor: torch.Tensor) -> None:
        shard = self._shard_of[index]
        if self._shards[shard][0] == index:
            self._file = open(self.directory / self._file_names[shard], "wb")
            self._file.write(self._header(shard))
        flat = tensor.contiguous().reshape(-1)
        if flat.numel():
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))
        self.total_bytes += self._plan[index][3]
        if self._shards[shard][-1] == index:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _header(self, shard: int) -> bytes:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in self._shards[shard]:
            name, shape, dtype, nbytes = self._plan[i]
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        return len(raw).to_bytes(8, "little") + raw

    def close(self) -> int:
        if self._next != len(self._plan):
            missing = [self._plan[i][0] for i in range(self._next, len(self._plan)) if i not in self._early]
            raise HFCheckpointError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        if len(self._shards) > 1:
            weight_map = {self._plan[i][0]: self._file_names[k] for k, idx in enumerate(self._shards) for i in idx}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            _fsync(self.directory / INDEX_NAME)
        return self.total_bytes


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fsync(path: Path) -> None:
    """Data on disk before the directory holding it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
