"""PolicyOptimizer in one process on a toy module: AdamW references for clipping and bf16 masters,
plain state_dict round trips, shard_over_dp at DP=1. The parallel cases: test_optimizer_parallel."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from megatron_lpreg.policy.optimizer import PolicyOptimizer

CLIP = 1.0


def _toy(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)).to(dtype)


def _set_grads(params, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (scale * torch.randn(p.shape, generator=g)).to(p.dtype)


def _norm(grads) -> float:
    return math.sqrt(sum(g.double().square().sum().item() for g in grads))


@pytest.mark.parametrize("clip", [CLIP, 0.0, None])
def test_update_is_adamw_on_clipped_grads(clip):
    model = _toy()
    params = list(model.parameters())
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = PolicyOptimizer(model, lr=0.01, weight_decay=0.1, clip_grad=clip)
    ref_opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1)
    assert all(m is p for m, p in zip(opt.masters, params))  # fp32: optimised in place
    norms = []
    # Adam is nearly blind to one step's gradient scale: a clipped step only shows against the
    # momentum of an unclipped one, so the norms go below, far above and above the threshold.
    for step, scale in enumerate((0.05, 100.0, 0.5)):
        _set_grads(params, scale, seed=step)
        norm = _norm(p.grad for p in params)
        coef = CLIP / (norm + 1e-6) if clip and norm > clip else 1.0
        for r, p in zip(ref, params):
            r.grad = p.grad * coef
        ref_opt.step()
        result = opt.step()
        assert result.stepped and result.lr == 0.01
        assert result.grad_norm == pytest.approx(norm, rel=1e-6)
        assert all(p.grad is None for p in params)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r, rtol=0, atol=1e-7)
        norms.append(norm)
    assert norms[0] < CLIP < norms[2] < norms[1]


def test_bf16_params_keep_fp32_masters():
    model = _toy(torch.bfloat16)
    params = list(model.parameters())
    ref = [p.detach().float().requires_grad_() for p in params]
    opt = PolicyOptimizer(model, lr=1e-3, weight_decay=0.01, clip_grad=None)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01)
    assert all(m.dtype == torch.float32 and m is not p for m, p in zip(opt.masters, params))
    for step in range(3):
        _set_grads(params, 1.0, seed=step)
        if step == 1:
            params[0].grad = None  # a parameter the loss did not reach: a zero gradient
        for r, p in zip(ref, params):
            r.grad = torch.zeros_like(r) if p.grad is None else p.grad.float()
        ref_opt.step()
        assert opt.step().stepped
        for p, m, r in zip(params, opt.masters, ref):
            torch.testing.assert_close(m, r, rtol=0, atol=1e-7)
            assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))
    # lr 1e-3 moves weights by less than bf16 resolution: only the masters remember the steps.
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in opt.masters)
    assert opt.scalar_state() == {"step": 3}


def test_plain_state_dict_round_trip():
    model = _toy(torch.bfloat16)
    opt = PolicyOptimizer(model, lr=1e-3, clip_grad=None)
    assert opt.scalar_state() == {"step": 0}
    for step in range(2):
        _set_grads(model.parameters(), 1.0, seed=step)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = copy.deepcopy(model)
    twin_opt = PolicyOptimizer(twin, lr=5.0, clip_grad=None)  # masters start as the bf16 params
    buf.seek(0)
    twin_opt.load_state_dict(torch.load(buf))
    for o in (opt, twin_opt):
        _set_grads(o.model.parameters(), 1.0, seed=7)
        assert o.step().lr == 1e-3  # the saved lr, not the constructor's
    assert twin_opt.scalar_state() == {"step": 3}
    for a, b in zip(opt.masters, twin_opt.masters):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_over_one_rank_is_the_unsharded_optimizer(dtype):
    """DP=1: the slice is the whole flat buffer; every step, norm and state is bit-identical."""
    model = _toy(dtype)
    twin = copy.deepcopy(model)
    kw = {"lr": 0.01, "weight_decay": 0.1, "clip_grad": CLIP}
    opt, sharded = PolicyOptimizer(model, **kw), PolicyOptimizer(twin, shard_over_dp=True, **kw)
    assert [m.shape for m in sharded.masters] == [(sum(p.numel() for p in model.parameters()),)]
    for step, scale in enumerate((0.05, 100.0, 0.5)):
        for o in (opt, sharded):
            _set_grads(o.model.parameters(), scale, seed=step)
            if step == 1:
                next(o.model.parameters()).grad = None
        assert opt.step() == sharded.step()
        assert all(p.grad is None for p in twin.parameters())
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    for n, _ in model.named_parameters():
        a, b = opt.param_state(n), sharded.param_state(n)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sharded.scalar_state() == {"step": 3}

    buf = io.BytesIO()
    torch.save(sharded.state_dict(), buf)
    buf.seek(0)
    resumed = PolicyOptimizer(copy.deepcopy(twin), shard_over_dp=True, **{**kw, "lr": 5.0})
    resumed.load_state_dict(torch.load(buf))
    for o in (sharded, resumed):
        _set_grads(o.model.parameters(), 1.0, seed=7)
        o.step()
    assert torch.equal(sharded.masters[0], resumed.masters[0])
