"""Training checkpoints: model, optimiser, RNG, data position and step, written atomically.

A training checkpoint is a model checkpoint in Megatron-LM's layout (``megatron_lpreg.checkpointing``:
``iter_<step>/`` + tracker; it loads with ``load_model``, with Megatron-LM's ``--finetune`` and
Bridge, and converts with ``checkpoint_tools.megatron_to_hf``) plus, beside it, in our own form::

    optim/                optimiser moments (and fp32 masters) of every parameter: one megatron-core
                          dist_checkpointing save under the parameters' own sharding (layers stacked
                          as the model's are), so a run saved at one TP size resumes at another
    rng/rank_<r>.pt       torch and megatron RNG states of each rank
    trainer_state.json    step, data-sampler position, best validation score, optimiser counters

``checkpoints/best.json`` names the checkpoint saved at the step of the best validation score
(``record_best``); pruning never deletes it.

all written into the hidden staging directory before the completeness marker, so ``resume: auto``
only ever sees whole checkpoints. ``optimizer`` is a ``PolicyOptimizer`` (its checkpoint entries:
``policy.optimizer_state``). Saves and loads are collectives over the whole world.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lpreg import checkpointing as ckpt
from megatron_lpreg import faults
from megatron_lpreg.parallel import barrier, world_group

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
OPTIM_DIR = "optim"
RNG_DIR = "rng"
STATE_FILE = "trainer_state.json"
BEST_FILE = "best.json"  # in checkpoints/: which step's checkpoint scored the best validation


def step_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def complete_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, path) of every complete training checkpoint under ``run_dir``, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and ckpt.is_complete(path) and (path / STATE_FILE).exists():
                found.append((int(match.group(1)), path))
    return sorted(found)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state()}
    try:
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # noqa: BLE001 - no tracker initialised (plain single-process use)
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if "tracker" in state:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _optim_sharded(model, optimizer) -> dict:
    from megatron_lpreg.megatron_layout import weights_only

    return optimizer.sharded_state_dict(weights_only(model.sharded_state_dict()))


def save_optimizer(model, optimizer, directory) -> None:
    """The optimiser's tensors in one dist_checkpointing save (collective)."""
    from megatron.core import dist_checkpointing

    if ckpt._rank() == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
    ckpt._barrier()
    dist_checkpointing.save(_optim_sharded(model, optimizer), str(directory))


def load_optimizer(model, optimizer, directory) -> None:
    """Load what ``save_optimizer`` wrote, at any TP size (collective; load the model first)."""
    from megatron.core import dist_checkpointing

    where = Path(directory)
    if not (where / "metadata.json").exists():
        raise ckpt.CheckpointError(f"{where}: missing optimiser state (not a training checkpoint?)")
    ckpt.check_dcp_files(where)
    try:
        loaded = dist_checkpointing.load(_optim_sharded(model, optimizer), str(where))
    except ckpt.load_errors() as e:  # megatron's messages are long
        raise ckpt.CheckpointError(f"{where}: cannot load optimiser state: {ckpt.first_line(e)}") from e
    optimizer.load_sharded_state_dict(loaded)


def save_training_checkpoint(path, *, model, optimizer, metadata: dict, trainer_state: dict,
                             hf_source=None, megatron_args=None) -> None:
    """Write a complete training checkpoint at ``path`` (collective; replaces an existing one).
    ``megatron_args``: Megatron-LM's args for the model part (``megatron_layout.megatron_args``).
    A failed write (OSError) is a CheckpointError naming the checkpoint that remains the newest."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        _save(Path(path), model, optimizer, metadata, trainer_state, hf_source, megatron_args)
    except (OSError, CheckpointException) as e:  # a full disk, a quota: the partial directory is gone
        found = complete_checkpoints(Path(path).parent.parent)
        kept = f"the newest complete one is still {found[-1][1]}" if found else "there is no earlier complete one"
        raise ckpt.CheckpointError(f"{path}: checkpoint not saved ({_write_error(e)}); {kept}") from e


def _write_error(e: BaseException) -> str:
    """The OSError's words; megatron's shard writer wraps them in a CheckpointException, which
    carries them on its coordinator rank only (the others learn just that a write failed)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    # Its writer's errors arrive pickled (no __cause__), as RuntimeError("Worker failure: <OSError>").
    words = [str(exc).splitlines()[0][:200] for exc, _ in getattr(e, "failures", {}).values()]
    return f"a shard write failed: {words[0]}" if words else "a shard write failed on another rank"


def _save(path: Path, model, optimizer, metadata: dict, trainer_state: dict, hf_source, megatron_args) -> None:
    from megatron_lpreg import megatron_layout

    rank = dist.get_rank() if dist.is_initialized() else 0
    step = trainer_state["step"]
    with ckpt.staged_directory(path, overwrite=True) as tmp:
        if rank == 0:
            if hf_source is not None:
                ckpt.copy_hf_files(hf_source, tmp / ckpt.HF_DIR)
            (tmp / RNG_DIR).mkdir()
        megatron_layout.save_whole(model, tmp, step, megatron_args)
        faults.point("checkpoint_shard")
        save_optimizer(model, optimizer, tmp / OPTIM_DIR)
        torch.save(_rng_state(), tmp / RNG_DIR / f"rank_{rank:05d}.pt")
        if rank == 0:
            state = {**trainer_state, "optimizer": optimizer.scalar_state()}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        faults.point("checkpoint_commit")
        ckpt.write_metadata(tmp, {**metadata, "layout": "megatron-lm", "iteration": step, "step": step})


def load_training_checkpoint(path, *, model, optimizer) -> dict:
    """Restore model, optimiser and (same world size) RNG from ``path``; returns the trainer state."""
    path = Path(path)
    meta = ckpt.load_model(model, path)
    if meta["layout"] == "legacy":
        raise ckpt.CheckpointError(f"{path}: a training checkpoint of the previous layout cannot be resumed; "
                                   f"start a new run from its weights with model.load: {path}")
    load_optimizer(model, optimizer, path / OPTIM_DIR)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path / STATE_FILE}: cannot read the trainer state ({ckpt.first_line(e)})") from None
    optimizer.load_scalar_state(state.pop("optimizer"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = path / RNG_DIR / f"rank_{rank:05d}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rng.exists() and state.get("world_size") == world:
        _set_rng_state(torch.load(rng, weights_only=False))
    else:
        logger.warning("%s: RNG states not restored (saved by %s ranks, now %d)", path, state.get("world_size"), world)
    return state


def record_best(run_dir, step: int, score: float) -> None:
    """Name the checkpoint of ``step`` as the best by validation (rank 0; atomic replace)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = Path(run_dir) / "checkpoints" / BEST_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "path": step_dir(run_dir, step).name, "val/mean": score}) + "\n")
    tmp.replace(path)


def best_checkpoint(run_dir) -> Path | None:
    """The checkpoint ``record_best`` last named, if it is still complete."""
    try:
        best = json.loads((Path(run_dir) / "checkpoints" / BEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    path = step_dir(run_dir, int(best["step"]))
    return path if ckpt.is_complete(path) else None


def prune_checkpoints(run_dir, keep_last: int | None) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and the best (rank 0 only)."""
    if not keep_last or (dist.is_initialized() and dist.get_rank() != 0):
        return
    best = best_checkpoint(run_dir)
    for _, path in complete_checkpoints(run_dir)[:-keep_last]:
        if path != best:
            shutil.rmtree(path, ignore_errors=True)
