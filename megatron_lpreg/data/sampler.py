"""Deterministic, resumable prompt batching.

The order of epoch ``e`` depends only on ``(seed, e)`` -- never on the global RNG state -- so a run
resumed from ``state_dict()`` continues with exactly the batches the uninterrupted run would have
drawn. Batches never straddle an epoch boundary.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def epoch_order(dataset_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The index order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1 unshuffled."""
    if dataset_len < 0:
        raise ValueError(f"dataset_len must be non-negative, got {dataset_len}")
    if not shuffle:
        return list(range(dataset_len))
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    # A SeedSequence over the pair keeps (seed, epoch) streams distinct (seed+epoch would collide).
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(dataset_len).tolist()


class PromptSampler(Iterator[list[int]]):
    """Endless iterator of index batches over epochs.

    ``state_dict()`` is ``{"epoch": e, "position": p}``: the next batch starts at offset ``p`` of
    epoch ``e``'s order. After the last full batch of an epoch the state moves to ``(e + 1, 0)``.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True):
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if drop_last and batch_size > dataset_len:
            raise ValueError(
                f"batch_size {batch_size} > dataset_len {dataset_len} with drop_last=True: an epoch has no batch"
            )
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: list[int] = []

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.dataset_len // self.batch_size
        return -(-self.dataset_len // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def _epoch_end(self) -> int:
        """Offset past the last index used in an epoch (drop_last discards the short tail)."""
        return self.batches_per_epoch * self.batch_size if self.drop_last else self.dataset_len

    def order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            self._order = epoch_order(self.dataset_len, self.seed, epoch, self.shuffle)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[int]:
        order = self.order(self.epoch)
        start = self.position
        stop = min(start + self.batch_size, self._epoch_end)
        batch = order[start:stop]
        self.position = stop
        if self.position >= self._epoch_end:
            self.epoch += 1
            self.position = 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if not 0 <= position < self._epoch_end:
            raise ValueError(
                f"position {position} out of range for an epoch of {self._epoch_end} used indices "
                f"(dataset_len={self.dataset_len}, batch_size={self.batch_size}, drop_last={self.drop_last})"
            )
        self.epoch, self.position = epoch, position
