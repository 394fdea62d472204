"""Process groups: torch.distributed from torchrun's environment plus megatron-core's parallel_state.

Backends: gloo on CPU (with the CPU shims megatron-core needs, see ``cpu_shims``), nccl on GPU.
Every collective gets an explicit timeout so a dead or hung rank fails the others instead of
blocking them forever.

Collectives: every torch.distributed collective of the package goes through the functions under
"Collectives" below (a test keeps it so). Each one checks that its tensors sit on the group's
device (an NCCL group reduces CUDA tensors only, a gloo group host tensors), so a host tensor sent
through a GPU group fails on the calling line with a clear message rather than deep inside NCCL.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


class ParallelConfigError(ValueError):
    """The requested parallel layout does not fit the launched world."""


@dataclass(frozen=True)
class ParallelContext:
    """What the rest of the code needs to know about its place in the world."""

    rank: int
    world_size: int
    tp_size: int
    dp_size: int
    tp_rank: int
    dp_rank: int
    device: torch.device
    backend: str
    tp_group: object  # megatron's groups, also at size 1; collectives of this package take
    dp_group: object  # ``tp``/``dp`` below (None at size 1)

    @property
    def tp(self):
        """The tensor-parallel group, None at TP=1."""
        return group_or_none(self.tp_group)

    @property
    def dp(self):
        """The data-parallel group, None at DP=1."""
        return group_or_none(self.dp_group)


def group_or_none(group):
    """``group`` if it spans more than one rank, else None. Throughout the package None means "no
    group": the caller is alone, and no collective is issued (never "the whole world")."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    return group


def group_size(group) -> int:
    """Ranks in ``group``; 1 for None."""
    return 1 if group_or_none(group) is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in ``group``; 0 for None."""
    return 0 if group_or_none(group) is None else dist.get_rank(group)


# ---------------------------------------------------------------------------------------------
# Collectives. ``group`` None (or of one rank) means this rank is alone: no collective is issued.


class CollectiveDeviceError(RuntimeError):
    """A tensor handed to a collective is not on its group's device."""


# Set by ``device_groups_on_cpu``: what counts as a host tensor while every group acts as a device group.
_strict_is_host: Callable[[torch.Tensor], bool] | None = None


@contextlib.contextmanager
def device_groups_on_cpu(is_host: Callable[[torch.Tensor], bool] = lambda t: t.device.type == "cpu"):
    """Within the block every group acts as a device (NCCL) group: a tensor for which ``is_host``
    holds (default: any CPU tensor) raises ``CollectiveDeviceError``. For CPU tests, where gloo
    accepts what NCCL rejects; every group, since megatron re-creates its groups on each init."""
    global _strict_is_host
    saved, _strict_is_host = _strict_is_host, is_host
    try:
        yield
    finally:
        _strict_is_host = saved


def group_device(group) -> torch.device:
    """Where a tensor for ``group``'s collectives lives: the current CUDA device for an NCCL group,
    else the CPU (gloo, or no group)."""
    if group_or_none(group) is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_devices(op: str, group, tensors: Iterable[torch.Tensor]) -> None:
    strict = _strict_is_host is not None
    backend = dist.get_backend(group)
    for t in tensors:
        if strict or backend == "nccl":
            wrong, need = (_strict_is_host(t) if strict else t.device.type != "cuda"), "the group's device"
        else:  # gloo: host data; another backend is left to itself
            wrong, need = backend == "gloo" and t.device.type != "cpu", "the host (gloo carries host tensors)"
        if wrong:
            caller = sys._getframe(2)  # the package line that called the collective
            raise CollectiveDeviceError(
                f"{os.path.relpath(caller.f_code.co_filename)}:{caller.f_lineno}: {op} on a "
                f"{'device (strict on CPU)' if strict else backend} group got a {tuple(t.shape)} {t.dtype} "
                f"tensor on {t.device} ({'a host tensor' if strict else 'wrong device'}); it must be on "
                f"{need}, see parallel.group_device")


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

# torch 2.13 renamed the flat-tensor collectives (the old names warn); torch 2.6 has only the old ones.
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce(tensor: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over ``group`` in place (``op``: sum, max or min); returns it."""
    if group_or_none(group) is not None:
        _check_devices("all_reduce", group, [tensor])
        dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group)
    return tensor


def all_gather(outputs: list[torch.Tensor], tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``tensor`` into ``outputs`` (one per rank, in group-rank order); returns it."""
    if group_or_none(group) is None:
        outputs[0].copy_(tensor)
        return outputs
    _check_devices("all_gather", group, [tensor, *outputs])
    dist.all_gather(outputs, tensor, group=group)
    return outputs


def all_gather_into(out: torch.Tensor, tensor: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``tensor`` end to end in ``out`` (1-D, group size x its length); returns it."""
    if group_or_none(group) is None:
        return out.copy_(tensor)
    _check_devices("all_gather_into", group, [out, tensor])
    _all_gather_flat(out, tensor, group=group)
    return out


def reduce_scatter_into(out: torch.Tensor, tensor: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of ``tensor`` (1-D) summed over ``group``, into ``out``; returns it."""
    if group_or_none(group) is None:
        return out.copy_(tensor)
    _check_devices("reduce_scatter_into", group, [out, tensor])
    _reduce_scatter_flat(out, tensor, group=group)
    return out


def exchange(sends: list[tuple[torch.Tensor, int]], receives: list[tuple[torch.Tensor, int]], group) -> None:
    """Point-to-point within ``group``: each (tensor, group rank) of ``sends`` goes to that rank, each of
    ``receives`` is filled from it; returns when all are done."""
    _check_devices("exchange", group, [t for t, _ in sends] + [t for t, _ in receives])
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, r), group=group) for t, r in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, r), group=group) for t, r in receives]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def barrier(group) -> None:
    """Wait for every rank of ``group``."""
    if group_or_none(group) is not None:
        dist.barrier(group=group)


def world_group():
    """The whole world as a group (None before init_distributed or in a world of one)."""
    return group_or_none(dist.group.WORLD) if dist.is_initialized() else None


def all_gather_object(value, group) -> list:
    """Every rank's ``value`` (pickled: small objects), in group-rank order; ``[value]`` alone."""
    if group_or_none(group) is None:
        return [value]
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, value, group=group)
    return parts


def broadcast_object(value, group, src_group_rank: int = 0):
    """``value`` of the group's ``src_group_rank``, on every rank of ``group`` (pickled: small objects
    only)."""
    if group_or_none(group) is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src_group_rank), group=group)
    return box[0]


def factor_world(world_size: int, tp_size: int) -> int:
    """Data-parallel size for ``world_size`` ranks at tensor-parallel size ``tp_size``."""
    if tp_size < 1:
        raise ParallelConfigError(f"tensor parallel size must be >= 1, got tp={tp_size}")
    if world_size % tp_size:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tensor parallel size tp={tp_size}; "
            f"launch a multiple of {tp_size} processes (e.g. torchrun --nproc-per-node {tp_size})"
        )
    return world_size // tp_size


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ParallelConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(
    tp_size: int = 1,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    seed: int = 1234,
) -> ParallelContext:
    """Initialise torch.distributed and megatron-core model parallelism.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun sets them; without
    them this is a world of one on a free local port. The data-parallel size is world / tp.
    """
    from megatron.core import parallel_state

    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dp_size = factor_world(world_size, tp_size)
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from megatron_lpreg import cpu_shims

        cpu_shims.apply()
        device = torch.device("cpu")

    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # A world of one needs no rendezvous: an in-process store cannot lose a port race with
            # another process the way "pick a free port, then bind it" can.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                raise ParallelConfigError("MASTER_PORT is not set; launch with torchrun")
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size,
        # Megatron's groups take minutes; a fraction keeps a short timeout_s short (not 1 minute).
        distributed_timeout_minutes=timeout_s / 60,
    )
    if use_cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_shims.model_parallel_cpu_manual_seed(seed)

    return ParallelContext(
        rank=rank,
        world_size=world_size,
        tp_size=tp_size,
        dp_size=dp_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        backend=backend,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
