"""Refit through shared memory: every TP rank writes its own shards straight into the engine's weights.

When the rollout engine lives on the same machine as every rank of its TP group (the transformers
engine on CPU), nothing needs to travel: the engine's parameters are moved into one /dev/shm mapping
that the whole group maps too, and each rank places its shards where they belong in the full HF
tensors (``table.place_shard``). No bucket, no gather, no merge and no extra memory at all; the
ranks copy in parallel. It is the CPU counterpart of the CUDA-IPC handles colocated vLLM refits use.

The file is unlinked once every rank has mapped it, so a crash leaves nothing behind in /dev/shm.
Where a rank cannot see the engine rank's file (another machine, another /dev/shm namespace, no
/dev/shm), ``SharedWeights.attach`` returns None on every rank and the trainer streams buckets
instead (``stream.stream_hf_weights``).
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from dataclasses import dataclass

import torch

from megatron_lpreg.model.hf_config import ModelSpec
from megatron_lpreg.parallel import (all_reduce, barrier, broadcast_object, group_device, group_or_none, group_rank,
                                     group_size)
from megatron_lpreg.weights.stream import RefitStats
from megatron_lpreg.weights.table import find_param, is_weight, place_shard
from megatron_lpreg.weights.tp_rules import Split

SHM_DIR = "/dev/shm"
_ALIGN = 64  # bytes: every tensor starts on a cache line
_TOKEN_BYTES = 16  # the header: random bytes that prove a rank mapped the engine rank's memory


class SharedWeightsError(RuntimeError):
    """The engine's weights no longer live in the shared mapping (e.g. it slept at level 2)."""


@dataclass
class _Entry:
    offset: int
    shape: tuple[int, ...]
    dtype: str


def _layout(named: list[tuple[str, torch.Tensor]]) -> tuple[dict[str, _Entry], int]:
    entries, offset = {}, _ALIGN
    for name, t in named:
        entries[name] = _Entry(offset, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return entries, offset


def _views(arena: torch.Tensor, layout: dict[str, _Entry]) -> dict[str, torch.Tensor]:
    out = {}
    for name, e in layout.items():
        dtype = getattr(torch, e.dtype)
        nbytes = torch.Size(e.shape).numel() * torch.empty((), dtype=dtype).element_size()
        out[name] = arena[e.offset:e.offset + nbytes].view(dtype).view(e.shape)
    return out


class SharedWeights:
    """One TP group's map of the engine's weights: HF name -> a view into the shared mapping."""

    def __init__(self, arena: torch.Tensor, views: dict[str, torch.Tensor], group, dst_rank: int, path: str):
        self.path = path  # unlinked already: only the mappings keep the memory
        self.arena = arena
        self.views = views
        self.group = group
        self.dst_rank = dst_rank
        self.nbytes = int(arena.numel())

    @classmethod
    def attach(cls, engine_model: torch.nn.Module | None, *, group=None, dst_rank: int = 0,
               shm_dir: str = SHM_DIR) -> "SharedWeights | None":
        """Collective over ``group``: move the engine's parameters (``engine_model`` of TP rank
        ``dst_rank``) into shared memory that every rank of the group maps. A rank that passes its own
        engine model too (same architecture) has it compute with the shared weights from then on: its
        private copy is dropped, so the group holds one copy of the model however many engines run
        on it. None on every rank when some rank cannot map it."""
        group = group_or_none(group)
        rank, size = group_rank(group), group_size(group)
        arena = path = None
        msg: list = [None]
        if rank == dst_rank:
            if engine_model is None:
                raise ValueError("SharedWeights.attach: the engine rank must pass the engine's model")
            named = list(engine_model.named_parameters())  # tied parameters are listed once
            layout, total = _layout(named)
            path = os.path.join(shm_dir, f"megatron-lpreg-weights-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            try:
                _reserve(path, total)
                arena = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
                token = secrets.token_bytes(_TOKEN_BYTES)
                arena[:_TOKEN_BYTES].copy_(torch.frombuffer(bytearray(token), dtype=torch.uint8))
                msg = [(path, total, layout, token)]
            except (OSError, RuntimeError):
                arena = None
                if os.path.exists(path):
                    os.unlink(path)
                path = None
        if size > 1:
            msg = [broadcast_object(msg[0], group, dst_rank)]
        if rank != dst_rank and msg[0] is not None:
            arena = _map_existing(*msg[0])
        ok = torch.tensor([int(arena is not None)], dtype=torch.int32, device=group_device(group))
        all_reduce(ok, group, "min")
        if path is not None:
            os.unlink(path)  # every rank that could map it has: the memory lives while mapped
        if not ok.item():
            return None
        layout = msg[0][2]
        views = _views(arena, layout)
        if engine_model is not None:
            with torch.no_grad():
                for name, p in engine_model.named_parameters():
                    if rank == dst_rank:
                        views[name].copy_(p.data)
                    p.data = views[name]  # frees the private copy; a tied head follows its embedding
        barrier(group)  # no engine reads the views before the engine rank has filled them
        return cls(arena, views, group, dst_rank, msg[0][0])

    def check_engine(self, engine_model: torch.nn.Module) -> None:
        """The engine still computes with the shared weights (raises SharedWeightsError if not)."""
        for name, p in engine_model.named_parameters():
            view = self.views.get(name)
            if view is None or p.data_ptr() != view.data_ptr():
                raise SharedWeightsError(
                    f"engine parameter {name!r} is no longer in the shared refit memory (re-allocated, e.g. "
                    "by sleep(level=2)); set rollout.refit_shared_memory=false to stream buckets instead")

    @torch.no_grad()
    def refit(self, model, spec: ModelSpec, *, te: bool = False, engine_model: torch.nn.Module | None = None,
              stats: RefitStats | None = None) -> None:
        """Collective over the group: write this rank's Megatron shards into the engine's weights.
        The barriers keep every write inside the window where the engine is idle."""
        rank, size = group_rank(self.group), group_size(self.group)
        if engine_model is not None:
            self.check_engine(engine_model)
        start = time.perf_counter()
        barrier(self.group)
        written = tensors = 0
        for name, p in model.named_parameters():
            if not is_weight(name):
                continue
            param = find_param(spec, name, te)
            if param.split is Split.REPLICATED and rank != self.dst_rank:
                continue  # identical on every rank: one writer
            place_shard(spec, param, p.detach(), [self.views[h] for h in param.hf], rank, size)
            written += p.numel() * p.element_size()
            tensors += len(param.hf)
        barrier(self.group)
        if stats is not None:
            stats.bytes += written
            stats.tensors += tensors
            stats.seconds += time.perf_counter() - start


def _reserve(path: str, total: int) -> None:
    """Create the file with all its pages allocated now: a sparse file on a full tmpfs (Docker's
    /dev/shm is 64 MB by default) would kill the process with SIGBUS at the first write instead."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, total)
    finally:
        os.close(fd)


def _map_existing(path: str, total: int, layout, token: bytes) -> torch.Tensor | None:
    """The engine rank's mapping, if this rank sees the same memory (not merely a same-named file)."""
    try:
        if os.path.getsize(path) != total:
            return None
        arena = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    except (OSError, RuntimeError):
        return None
    if bytes(arena[:_TOKEN_BYTES].tolist()) != token:
        return None
    return arena
