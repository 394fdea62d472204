"""fp32 main-grad accumulation for non-fp32 parameters (PolicyOptimizer): the accuracy it buys over
summing micro-batch gradients in bf16, fp32 models untouched, and a TP=2 bf16 step against a
hand-accumulated fp32 reference."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.policy import grads as finalize
from megatron_lpreg.policy.optimizer import PolicyOptimizer
from tests.distributed import run_distributed
from tests.model.tiny_models import save_tiny_model
from tests.policy.test_optimizer import CLIP


def _mlp(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(dtype)


def _micro_batches(n: int):
    g = torch.Generator().manual_seed(n)
    # A shared mean so the micro-batch gradients point the same way and the sum grows: the case
    # where bf16's 8-bit mantissa drops the late, relatively small, contributions.
    shift = torch.randn(1, 64, generator=g)
    return [shift + 0.5 * torch.randn(4, 64, generator=g) for _ in range(n)]


def _backward(model, xs, dtype, on_each=None):
    for x in xs:
        (model(x.to(dtype)).square().mean() / len(xs)).backward()
        if on_each is not None:
            on_each()


def _rel_err(grads, ref) -> float:
    num = sum((g.double() - r).square().sum() for g, r in zip(grads, ref))
    return math.sqrt(num / sum(r.square().sum() for r in ref))


@pytest.mark.parametrize("n", [64, 256])
def test_bf16_grads_accumulate_as_accurately_as_fp32(n):
    xs = _micro_batches(n)
    ref_model = _mlp(torch.float64)
    _backward(ref_model, xs, torch.float64)
    ref = [p.grad for p in ref_model.parameters()]

    plain = _mlp(torch.bfloat16)  # no optimizer: p.grad sums in bf16
    _backward(plain, xs, torch.bfloat16)
    bf16_err = _rel_err([p.grad for p in plain.parameters()], ref)

    by_hand = _mlp(torch.bfloat16)
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in by_hand.parameters()]

    def add():
        for a, p in zip(acc, by_hand.parameters()):
            a += p.grad.float()
            p.grad = None
    _backward(by_hand, xs, torch.bfloat16, add)
    fp32_err = _rel_err(acc, ref)

    model = _mlp(torch.bfloat16)
    opt = PolicyOptimizer(model, lr=1e-3, clip_grad=None)
    _backward(model, xs, torch.bfloat16)
    assert all(p.grad is None for p in model.parameters())  # freed into the fp32 buffer
    grads = opt.grads()
    assert all(g.dtype == torch.float32 for g in grads)
    err = _rel_err(grads, ref)
    print(f"n={n}: relative error bf16 {bf16_err:.3g}, fp32 by hand {fp32_err:.3g}, main grads {err:.3g}")
    assert err <= fp32_err * (1 + 1e-6)
    assert err < bf16_err / 2
    assert opt.step().stepped
    assert opt.grads() == [None] * len(grads)  # zero_grad dropped the buffer


def test_fp32_model_step_is_the_plain_grad_step():
    """No hook and no buffer for fp32 parameters: the step is bitwise the pre-main-grad one (the
    params' own fp32 .grad, clipped, into torch's AdamW)."""
    xs = _micro_batches(8)
    model, twin = _mlp(torch.float32), _mlp(torch.float32)
    opt = PolicyOptimizer(model, lr=0.01, weight_decay=0.1, clip_grad=CLIP)
    ref_opt = torch.optim.AdamW(list(twin.parameters()), lr=0.01, weight_decay=0.1)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    for step in range(3):
        _backward(model, [x * (1 + step) for x in xs], torch.float32)
        _backward(twin, [x * (1 + step) for x in xs], torch.float32)
        assert all(g is p.grad for g, p in zip(opt.grads(), model.parameters()))
        grads = [p.grad for p in twin.parameters()]
        norm = finalize.grad_norm(list(twin.parameters()), grads, device="cpu", tp_group=None)
        if norm > CLIP:
            torch._foreach_mul_(grads, CLIP / (norm + 1e-6))
        ref_opt.step()
        ref_opt.zero_grad()
        assert opt.step().grad_norm == norm
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)


def test_a_later_optimizer_takes_over_the_hooks():
    model = _mlp(torch.bfloat16)
    first = PolicyOptimizer(model, lr=1e-3)
    second = PolicyOptimizer(model, lr=1e-3)
    _backward(model, _micro_batches(2), torch.bfloat16)
    assert first.grads() == [None] * 4 and all(g is not None for g in second.grads())


# ------------------------------------------------------------------ TP=2, a bf16 tiny qwen3

MICRO = 6


def _tp2_bf16(ctx, hf_dir: str):
    from tests.policy.test_optimizer_parallel import LR, WD, _backward as lm_backward, _batch, _load_model

    _, model = _load_model(ctx, hf_dir, torch.bfloat16)
    _, twin = _load_model(ctx, hf_dir, torch.bfloat16)
    opt = PolicyOptimizer(model, lr=LR, weight_decay=WD, clip_grad=CLIP, tp_group=ctx.tp_group)
    named = list(twin.named_parameters())
    masters = [p.detach().float().requires_grad_() for _, p in named]
    ref_opt = torch.optim.AdamW(masters, lr=LR, weight_decay=WD)
    out = {"results": [], "params_equal": [], "max_diff": []}
    for step in (1, 2):
        acc = [torch.zeros_like(m) for m in masters]
        for k in range(MICRO):
            lm_backward(ctx, model, _batch(10 * step + k))
            lm_backward(ctx, twin, _batch(10 * step + k))
            for a, (_, p) in zip(acc, named):
                if p.grad is not None:
                    a += p.grad.float()
                    p.grad = None
        finalize.sum_partial_over_tp([a for a, (n, p) in zip(acc, named) if finalize.is_tp_partial(n, p)],
                                     ctx.tp_group, 2**24)
        norm = finalize.grad_norm([p for _, p in named], acc, device="cpu", tp_group=ctx.tp_group)
        if norm > CLIP:
            torch._foreach_mul_(acc, CLIP / (norm + 1e-6))
        for m, a in zip(masters, acc):
            m.grad = a
        ref_opt.step()
        with torch.no_grad():
            for m, (_, p) in zip(masters, named):
                p.copy_(m)
        result = opt.step()
        out["results"].append((result.stepped, result.grad_norm, norm))
        out["params_equal"].append(all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters())))
        out["max_diff"].append(max((m - r).abs().max().item() for m, r in zip(opt.masters, masters)))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_tiny_model("qwen3", tmp_path_factory.mktemp("main_grads_hf") / "qwen3", seed=3))


def test_tp2_bf16_step_matches_fp32_accumulation(hf_dir):
    ranks = run_distributed(_tp2_bf16, 2, 2, args=(hf_dir,), timeout_s=180)
    for r in ranks:
        for stepped, norm, ref_norm in r["results"]:
            assert stepped and norm == pytest.approx(ref_norm, rel=1e-6)
        assert r["params_equal"] == [True, True], r
        assert max(r["max_diff"]) <= 1e-7, r
