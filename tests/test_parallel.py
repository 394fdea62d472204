"""Process-group set-up: world factoring, TP/DP groups over gloo, and the hung-collective guard."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from megatron_lpreg.parallel import ParallelConfigError, factor_world
from tests.distributed import DistributedTestError, run_distributed


def test_factor_world():
    assert factor_world(8, 2) == 4
    with pytest.raises(ParallelConfigError, match="world size 6 is not divisible by tensor parallel size tp=4"):
        factor_world(6, 4)
    with pytest.raises(ParallelConfigError, match="must be >= 1"):
        factor_world(2, 0)


def _groups_body(ctx):
    import torch

    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t, group=ctx.tp_group)
    d = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(d, group=ctx.dp_group)
    return dict(tp=(ctx.tp_rank, ctx.tp_size), dp=(ctx.dp_rank, ctx.dp_size), tp_sum=t.item(),
                dp_sum=d.item(), backend=ctx.backend, device=str(ctx.device))


def test_tp_and_dp_groups_over_gloo():
    tp2 = run_distributed(_groups_body, world_size=2, tp_size=2)
    assert [r["tp"] for r in tp2] == [(0, 2), (1, 2)] and [r["dp"] for r in tp2] == [(0, 1), (0, 1)]
    assert all(r["tp_sum"] == 3.0 and r["dp_sum"] == r["tp"][0] + 1 for r in tp2)
    assert tp2[0]["backend"] == "gloo" and tp2[0]["device"] == "cpu"
    dp2 = run_distributed(_groups_body, world_size=2, tp_size=1)
    assert [r["dp"] for r in dp2] == [(0, 2), (1, 2)] and all(r["dp_sum"] == 3.0 for r in dp2)


def _not_dividing_body(ctx):
    return None


def test_world_not_divisible_by_tp_is_a_clear_error():
    with pytest.raises(DistributedTestError, match="not divisible by tensor parallel size tp=3"):
        run_distributed(_not_dividing_body, world_size=2, tp_size=3, timeout_s=60)


def _one_rank_hangs_body(ctx):
    import torch

    if ctx.rank == 1:
        time.sleep(600)
    dist.all_reduce(torch.ones(1))


def test_a_hung_rank_fails_the_test_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="did not finish|rank 0"):
        run_distributed(_one_rank_hangs_body, world_size=2, tp_size=2, timeout_s=40, collective_timeout_s=5)
    assert time.monotonic() - start < 60
