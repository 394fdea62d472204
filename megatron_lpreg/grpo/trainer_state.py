"""What a step changes besides weights and optimiser: saved together with them, restored on resume."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lpreg.data import PromptSampler
from megatron_lpreg.grpo.skips import SkipCounter


@dataclass
class TrainerState:
    """The step count, the data position, the best validation score and the run of skipped steps.

    ``world_size``/``tp_size`` are saved so a resume can tell whether the per-rank RNG states still
    fit the world (they are written, never restored: the layout comes from the config)."""

    sampler: PromptSampler
    skips: SkipCounter
    world_size: int
    tp_size: int
    step: int = 0
    best: dict | None = None  # {"val/mean": score, "step": step}

    def record_validation(self, score: float) -> None:
        if self.best is None or score > self.best["val/mean"]:
            self.best = {"val/mean": score, "step": self.step}

    def state_dict(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "best": self.best,
                "world_size": self.world_size, "tp_size": self.tp_size, "consecutive_skips": self.skips.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.best = state.get("best")
        self.skips.in_a_row = int(state.get("consecutive_skips", 0))
