"""The rollout engine protocol: what the GRPO loop asks of vLLM (GPU) and transformers (CPU).

Log-probs returned by an engine are of the raw model distribution (temperature 1, no top-p/top-k
filtering), as vLLM's default ``raw_logprobs``: the trainer compares them with its own recomputed
old log-probs to monitor the rollout/training mismatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"sampling n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_tokens < 1:
            raise ValueError(f"sampling top_k >= 0 and max_tokens >= 1 required, got {self.top_k}, {self.max_tokens}")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: torch.Tensor  # [len(token_ids)] float32, per generated token, under the raw distribution
    finish_reason: str  # "stop" (a stop token was generated; it is included) or "length"


class RolloutEngine(Protocol):
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        """``n`` completions per prompt, in prompt order."""

    def score(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """log p(token t | tokens < t) for t >= 1 of each sequence (prompt log-probs)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load full HF-named tensors; returns how many were loaded."""

    def sleep(self, level: int = 1) -> None:
        """Release memory between rollouts; level 2 also drops the weights (refit before use)."""

    def wake(self) -> None: ...

    def close(self) -> None:
        """Stop what the engine started (processes, memory); the engine is unusable after it."""


def stop_token_ids(tokenizer, hf_dir: Path) -> tuple[int, ...]:
    """EOS ids of the tokenizer and of generation_config.json (chat models end turns with their own)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(hf_dir).eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    except (OSError, ValueError):
        pass
    return tuple(sorted(ids))
