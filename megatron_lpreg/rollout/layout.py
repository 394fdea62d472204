"""Where a replica's rollouts run: which ranks hold an engine, which slice of the prompts each
engine samples, and whose results count. One answer per run, the same for training rollouts and
validation, so the seeds, the slicing and the gathering cannot disagree.

Three layouts, chosen from the engine and the refit (``rollout_layout``):

``spmd``    vLLM: every trainer rank holds its shard of an engine of ``rollout.tp`` consecutive
            ranks (vLLM's TP groups are consecutive ranks, as Megatron's). A trainer replica of TP t
            hosts t / rollout.tp engines, each sampling its own slice of the replica's prompts. All
            ranks of one engine call generate with identical arguments; the first one's result
            counts (it grades), the others' are identical copies.
``sliced``  the transformers engine where the TP group maps one copy of the weights (CPU shared
            memory): every TP rank runs a whole engine on it and samples its own slice.
``rank0``   the transformers engine elsewhere: TP rank 0 of each replica samples everything.

An engine's ``slot`` numbers the engines of the world (replica-major); it picks the sampling seed,
so a layout samples the same tokens after a resume and different engines sample different noise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RolloutLayout:
    name: str  # "spmd" | "sliced" | "rank0"
    engine_tp: int  # ranks per engine
    has_engine: bool  # this rank builds (its shard of) an engine and joins its generate calls
    leader: bool  # this rank's results count: it grades them and contributes them to the gather
    slice_index: int  # which slice of the replica's prompts this rank's engine samples
    slices: int  # engines per trainer replica
    slot: int  # this rank's engine among the world's engines (the sampling seed's slot)
    engines: int  # engines in the world

    def describe(self) -> str:
        return f"layout={self.name} engine_tp={self.engine_tp} engines={self.engines}"


class RolloutLayoutError(ValueError):
    """rollout.tp does not fit the trainer's tensor-parallel size."""


def check_engine_tp(engine_tp: int, tp_size: int) -> None:
    if engine_tp < 1 or tp_size % engine_tp:
        raise RolloutLayoutError(f"rollout.tp={engine_tp} must divide parallel.tp={tp_size} (every engine "
                                 f"lives inside one trainer replica's TP group)")


def rollout_layout(kind: str, *, tp_size: int, tp_rank: int, dp_rank: int, dp_size: int, engine_tp: int | None = None,
                   shared_weights: bool = False) -> RolloutLayout:
    """The layout for engine ``kind`` ("vllm" or "hf"); ``engine_tp`` (vllm): rollout.tp, default
    the trainer's TP; ``shared_weights`` (hf): whether the TP group maps one copy of the weights."""
    if kind == "vllm":
        etp = tp_size if engine_tp is None else engine_tp
        check_engine_tp(etp, tp_size)
        slices = tp_size // etp
        index = tp_rank // etp
        return RolloutLayout("spmd", etp, True, tp_rank % etp == 0, index, slices, dp_rank * slices + index,
                             dp_size * slices)
    if engine_tp not in (None, 1) and engine_tp != tp_size:
        raise RolloutLayoutError(f"rollout.tp={engine_tp} applies to the vllm engine; the transformers engine runs "
                                 f"whole on one rank (leave rollout.tp unset)")
    if shared_weights and tp_size > 1:
        return RolloutLayout("sliced", 1, True, True, tp_rank, tp_size, dp_rank * tp_size + tp_rank,
                             dp_size * tp_size)
    first = tp_rank == 0
    return RolloutLayout("rank0", 1, first, first, 0, 1, dp_rank, dp_size)
