"""The KL-to-reference loss term: k1/k2/k3 values and gradients against float64 references, verl's
k3 clamp, and its place in lp_reg_policy_loss (off = bit-identical, policy == reference = 0)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.loss import LpRegConfig, lp_reg_policy_loss, ref_kl


def _reference(l: float, l_ref: float, kind: str) -> tuple[float, float]:
    """(value, d value / d l) of one token, written out by hand."""
    d = l - l_ref
    if kind == "k1":
        return d, 1.0
    if kind == "k2":
        return 0.5 * d * d, d
    x = l_ref - l  # k3 = e^x - x - 1, clamped as verl clamps it
    if not -20.0 <= x <= 20.0:
        x = max(-20.0, min(20.0, x))
        value, grad = math.exp(x) - x - 1.0, 0.0  # the input clamp stops the gradient
    else:
        value, grad = math.exp(x) - x - 1.0, -(math.exp(x) - 1.0)
    if value > 10.0:
        return 10.0, 0.0
    return value, grad


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_value_and_gradient_match_float64_reference(kind):
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(3, 7, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ref = lp.detach() + torch.randn(3, 7, generator=g, dtype=torch.float64)
    ref[0, 0] = lp[0, 0].detach() + 30.0  # k3: beyond both clamps
    ref[0, 1] = lp[0, 1].detach() + 3.0  # k3: e^3 - 4 = 16.1 > 10, output clamp
    ref[0, 2] = lp[0, 2].detach() - 25.0  # k3: x = -25 -> -20, value 19 -> 10
    ref[0, 3] = lp[0, 3].detach()  # identical: 0 for every estimator
    values = ref_kl(lp, ref, kind)
    values.sum().backward()
    values = values.detach()
    for i in range(3):
        for j in range(7):
            want, want_grad = _reference(float(lp.detach()[i, j]), float(ref[i, j]), kind)
            assert float(values[i, j]) == pytest.approx(want, rel=1e-12, abs=1e-12)
            assert float(lp.grad[i, j]) == pytest.approx(want_grad, rel=1e-12, abs=1e-12)
    assert float(values[0, 3]) == 0.0
    if kind == "k3":
        assert float(values[0, 0]) == float(values[0, 1]) == float(values[0, 2]) == 10.0
        assert (values >= 0).all()


def test_unknown_estimator_is_named():
    with pytest.raises(ValueError, match="'k4'"):
        ref_kl(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    with pytest.raises(ValueError, match="ref_kl_type"):
        LpRegConfig(ref_kl_type="k4")
    with pytest.raises(ValueError, match="ref_kl_coef"):
        LpRegConfig(ref_kl_coef=-0.1)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 4
    old = lp + 0.2 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    proxy = lp + 0.5 * torch.rand(4, 9, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -0.5, 0.3], dtype=torch.float64)
    mask = torch.rand(4, 9, generator=g) > 0.2
    return lp, old, proxy, ref, adv, mask


def _loss_and_grad(cfg, lp, *args, **kwargs):
    x = lp.clone().requires_grad_(True)
    loss, metrics = lp_reg_policy_loss(x, *args, cfg, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, metrics


@pytest.mark.parametrize("preset", ["lp_reg", "grpo"])
def test_coefficient_zero_is_bit_identical(preset):
    lp, old, proxy, ref, adv, mask = _inputs()
    cfg = LpRegConfig.preset(preset, rho=0.3)
    base = _loss_and_grad(cfg, lp, old, proxy, adv, mask)
    with_ref = _loss_and_grad(cfg, lp, old, proxy, adv, mask, ref_logprobs=ref)
    assert torch.equal(base[0], with_ref[0]) and torch.equal(base[1], with_ref[1])
    assert base[2] == with_ref[2] and "loss/ref_kl" not in with_ref[2]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_term_adds_coef_times_aggregated_kl(kind, agg):
    lp, old, proxy, ref, adv, mask = _inputs()
    coef = 0.37
    off = LpRegConfig(rho=0.3, loss_agg=agg)
    on = LpRegConfig(rho=0.3, loss_agg=agg, ref_kl_coef=coef, ref_kl_type=kind)
    loss0, grad0, _ = _loss_and_grad(off, lp, old, proxy, adv, mask)
    loss1, grad1, metrics = _loss_and_grad(on, lp, old, proxy, adv, mask, ref_logprobs=ref)
    # Float64 reference of the term, token by token.
    value = torch.zeros_like(lp)
    grad = torch.zeros_like(lp)
    for i in range(4):
        for j in range(9):
            value[i, j], grad[i, j] = _reference(float(lp[i, j]), float(ref[i, j]), kind)
    m = mask.double()
    if agg == "token_mean":
        term, dterm = (value * m).sum() / m.sum(), grad * m / m.sum()
        kl_mean = term
    else:
        rows = m.sum(-1, keepdim=True)
        nonempty = (rows > 0).sum()
        term = ((value * m).sum(-1) / rows.squeeze(-1)).sum() / nonempty
        dterm = grad * m / rows / nonempty
        kl_mean = (value * m).sum() / m.sum()
    assert float(loss1 - loss0) == pytest.approx(coef * float(term), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad1 - grad0, coef * dterm, rtol=1e-9, atol=1e-12)
    assert metrics["loss/ref_kl"] == pytest.approx(float(kl_mean), rel=1e-10)


def test_policy_equal_to_reference_has_zero_kl_and_needs_ref_logprobs():
    lp, old, proxy, _, adv, mask = _inputs()
    for kind in ("k1", "k2", "k3"):
        cfg = LpRegConfig(rho=0.3, ref_kl_coef=1.0, ref_kl_type=kind)
        off = LpRegConfig(rho=0.3)
        loss, grad, metrics = _loss_and_grad(cfg, lp, old, proxy, adv, mask, ref_logprobs=lp.clone())
        loss0, grad0, _ = _loss_and_grad(off, lp, old, proxy, adv, mask)
        assert metrics["loss/ref_kl"] == 0.0 and torch.equal(loss, loss0)
        if kind != "k1":  # k1's gradient is 1 per token even at zero KL
            assert torch.equal(grad, grad0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        lp_reg_policy_loss(lp, old, proxy, adv, mask, LpRegConfig(ref_kl_coef=0.1))
