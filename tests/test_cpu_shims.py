"""Each CPU shim megatron-core needs, and megatron's TP layers running on them over gloo."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg import cpu_shims
from tests.distributed import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are inactive with a GPU")


@pytest.fixture
def shims():
    was = cpu_shims.applied()
    cpu_shims.apply()
    yield
    if not was:
        cpu_shims.remove()


def test_apply_is_idempotent_and_remove_restores():
    import megatron.core.tensor_parallel.random as mrandom

    # An earlier in-process test (e.g. evaluate's) may have installed them: start from torch's own.
    was_applied = cpu_shims.applied()
    cpu_shims.remove()
    before = (torch.cuda.current_device, torch.cuda.synchronize, mrandom._CUDA_RNG_STATE_TRACKER)
    try:
        cpu_shims.apply()
        cpu_shims.apply()
        assert torch.cuda.current_device() == "cpu"
        assert torch.cuda.synchronize() is None
        assert isinstance(mrandom.get_cuda_rng_tracker(), cpu_shims.CPURNGStatesTracker)
        cpu_shims.remove()
        assert (torch.cuda.current_device, torch.cuda.synchronize, mrandom._CUDA_RNG_STATE_TRACKER) == before
        assert not cpu_shims.applied()
    finally:
        if was_applied:
            cpu_shims.apply()


def test_rng_tracker_forks_reproducible_streams_without_touching_the_default(shims):
    tracker = cpu_shims.CPURNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    tracker.add("other", 124)
    torch.manual_seed(0)
    expected_default = torch.randn(3)
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.randn(4)
    after = torch.randn(3)
    torch.testing.assert_close(after, expected_default)  # the default stream did not move
    assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(123)))
    with tracker.fork():
        b = torch.randn(4)
    assert not torch.equal(a, b)  # the forked stream advanced
    with tracker.fork("other"):
        c = torch.randn(4)
    assert not torch.equal(c, a)
    with pytest.raises(RuntimeError, match="already exists"):
        tracker.add("third", 123)
    with pytest.raises(RuntimeError, match="is not added"):
        with tracker.fork("missing"):
            pass


def test_causal_mask_masks_the_future():
    m = cpu_shims.causal_attention_mask(4)
    assert m.shape == (1, 1, 4, 4) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [[False, True, True, True], [False, False, True, True],
                                [False, False, False, True], [False, False, False, False]]


def _tp_layers_body(ctx):
    """Column- then row-parallel linear at this TP size vs the dense product of the full weights."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    cfg = ModelParallelConfig(tensor_model_parallel_size=ctx.tp_size, use_cpu_initialization=True,
                              perform_initialization=True, gradient_accumulation_fusion=False)
    init = torch.nn.init.normal_
    col = ColumnParallelLinear(8, 12, config=cfg, init_method=init, bias=False, gather_output=False)
    row = RowParallelLinear(12, 8, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                            skip_bias_add=True)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y, _ = row(col(x)[0])
    y.sum().backward()
    with get_cuda_rng_tracker().fork():
        tp_stream = torch.randn(2)
    return dict(y=y.detach(), gx=x.grad, w_col=col.weight.detach(), w_row=row.weight.detach(),
                tp_stream=tp_stream, rank=ctx.tp_rank)


def test_megatron_tp_layers_run_on_gloo_and_match_dense():
    ranks = run_distributed(_tp_layers_body, world_size=2, tp_size=2)
    w_col = torch.cat([r["w_col"] for r in ranks], 0)
    w_row = torch.cat([r["w_row"] for r in ranks], 1)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = x @ w_col.T @ w_row.T
    y.sum().backward()
    for r in ranks:
        torch.testing.assert_close(r["y"], y.detach())
        torch.testing.assert_close(r["gx"], x.grad)
    # Tensor-parallel streams differ per TP rank (seed + 2718 + tp_rank), as on GPU.
    assert not torch.equal(ranks[0]["tp_stream"], ranks[1]["tp_stream"])
