"""Consecutive skipped optimiser steps: a few are noise (one bad batch), many in a row mean the
run has diverged and every further step only burns compute on a policy that no longer moves."""

from __future__ import annotations

import torch

from megatron_lpreg.parallel import all_reduce


class TrainingDiverged(RuntimeError):
    """Too many optimiser steps in a row had a non-finite gradient norm."""


class SkipCounter:
    """Counts the optimiser steps skipped in a row (``PolicyOptimizer.step`` results).

    ``limit``: ``exceeded`` turns true at that many (0: never). Every rank sees the same results
    (the gradient norm is all-reduced before the skip decision), so every rank stops together.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def add(self, results) -> None:
        for r in results:
            self.in_a_row = 0 if r.stepped else self.in_a_row + 1

    @property
    def exceeded(self) -> bool:
        return bool(self.limit) and self.in_a_row >= self.limit


def weights_finite(model, group=None) -> bool:
    """Every parameter finite on every rank of ``group`` (collective; None: this rank only)."""
    # On the parameters' device: an NCCL group cannot reduce a host tensor.
    bad = torch.zeros(1, device=next(model.parameters()).device)
    with torch.no_grad():
        for p in model.parameters():
            if not torch.isfinite(p).all():
                bad.fill_(1.0)
                break
    all_reduce(bad, group, "max")
    return not bool(bad.item())
