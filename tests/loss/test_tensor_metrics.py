"""The tensor-metrics variant: the same loss and metrics as the float API, and no host sync."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_lpreg.loss import (
    LpRegConfig,
    lp_reg_policy_loss,
    lp_reg_policy_loss_tensors,
    metrics_to_floats,
    select_tokens,
    select_tokens_tensors,
    selection_thresholds,
)
from tests.loss import reference as ref
from tests.loss.test_policy_loss import CONFIGS, random_batch

# Calls that make the host wait for the device: reads of values, and ops whose output size depends on
# the data. (topk / kthvalue with a k known on the host do not; a k read back shows up as __int__.)
_SYNCING = {"__float__", "__int__", "__bool__", "__index__", "item", "tolist", "nonzero", "masked_select",
            "unique"}


class CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        bool_index = name in ("__getitem__", "__setitem__") and len(args) > 1 and \
            isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        if name in _SYNCING or bool_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


EXTRA = [
    dict(enabled=False, kl_cov_ratio=0.05, eps_high=math.inf),
    dict(enabled=False, high_entropy_fraction=0.2, eps_low=0.2, eps_high=0.28),
    dict(rho=0.2, ref_kl_coef=0.1),
]


def _call(fn, cfg, seed, dtype=torch.float64):
    lp, old, proxy, adv, mask, ent, kl = random_batch(seed, adv_mode="zero_row" if seed else "mixed")
    lp, old, proxy, ent, kl = (t.to(dtype) for t in (lp, old, proxy, ent, kl))
    thr = selection_thresholds(lp, adv, mask, cfg) if cfg.percentile_scope != "microbatch" else None
    x = lp.clone().requires_grad_(True)
    loss, metrics = fn(x, old, proxy, adv, mask, cfg, exact_kl=kl, entropy=ent, thresholds=thr, ref_logprobs=old)
    loss.backward()
    return loss.detach(), x.grad, metrics


@pytest.mark.parametrize("overrides", CONFIGS + EXTRA,
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tensor_variant_equals_the_float_variant_bit_for_bit(overrides, dtype):
    cfg = LpRegConfig(**overrides)
    for seed in (0, 1):
        l0, g0, floats = _call(lp_reg_policy_loss, cfg, seed, dtype)
        l1, g1, tensors = _call(lp_reg_policy_loss_tensors, cfg, seed, dtype)
        assert torch.equal(l0, l1) and torch.equal(g0, g1)
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in tensors.values())
        assert metrics_to_floats(tensors) == floats


def test_delta_rho_is_nan_in_the_tensor_variant_when_no_percentile_was_taken():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 3, dtype=torch.bool)
    _, t = lp_reg_policy_loss_tensors(lp, lp, lp, adv, mask, LpRegConfig(rho=0.1))  # k = 0
    assert math.isnan(t["lpreg/delta_rho"]) and "lpreg/delta_rho" not in metrics_to_floats(t)
    _, t = lp_reg_policy_loss_tensors(lp, lp, lp, adv, mask, LpRegConfig(rho=1.0))
    assert metrics_to_floats(t)["lpreg/delta_rho"] == pytest.approx(math.exp(-1.0))


@pytest.mark.parametrize("overrides", [dict(rho=0.05), dict(rho=0.2, regularize_positive=0.1),
                                       dict(rho=0.2, percentile_scope="batch"), *EXTRA[:2],
                                       dict(enabled=False, eps_low=0.2, eps_high=0.2)],
                         ids=["default", "pos", "batch", "kl_cov", "80_20", "grpo"])
def test_no_host_sync_in_the_tensor_variant_one_in_the_float_variant(overrides):
    cfg = LpRegConfig(**overrides)
    lp, old, proxy, adv, mask, ent, _ = random_batch(3)
    thr = selection_thresholds(lp, adv, mask, cfg) if cfg.percentile_scope != "microbatch" else None
    for fn, expected in ((lp_reg_policy_loss_tensors, []), (lp_reg_policy_loss, ["tolist"])):
        x = lp.clone().requires_grad_(True)
        with CountSyncs() as syncs:
            loss, _ = fn(x, old, proxy, adv, mask, cfg, entropy=ent, thresholds=thr)
            loss.backward()
        assert syncs.calls == expected, fn.__name__


def test_select_tokens_tensors_agrees_with_select_tokens():
    lp, _, proxy, adv, mask, _, _ = random_batch(4)
    cfg = LpRegConfig(rho=0.2, regularize_positive=0.1)
    a, b = select_tokens(lp, proxy, adv, mask, cfg), select_tokens_tensors(lp, proxy, adv, mask, cfg)
    assert torch.equal(a.lowest, b.lowest) and torch.equal(a.selected, b.selected)
    assert (a.candidates, a.lowest_count, a.delta_rho_logprob) == (
        int(b.candidates), int(b.lowest_count), float(b.delta_rho_logprob))


@pytest.mark.parametrize("overrides", [dict(rho=0.2), dict(rho=0.3, regularize_positive=0.2),
                                       dict(rho=0.05, kl="forward")])
@pytest.mark.parametrize("seed", range(4))
def test_ties_are_broken_as_the_reference_breaks_them(overrides, seed):
    """Log-probs on a 0.5 grid: many tokens tie at the k-th value; exactly k are taken, the earliest."""
    cfg = LpRegConfig(**overrides)
    lp, old, proxy, adv, mask, _, kl = random_batch(seed, B=6, S=50)
    lp = (lp * 2).round() / 2
    a, b = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    ours, m = lp_reg_policy_loss(a, old, proxy, adv, mask, cfg, exact_kl=kl)
    expected, selected = ref.policy_loss(b, old, proxy, adv, mask, cfg, exact_kl=kl)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)
    assert m["lpreg/selected"] == len(selected)
    sel = select_tokens(lp, proxy, adv, mask, cfg)
    assert sorted(map(tuple, sel.selected.nonzero().tolist())) == selected


def test_top_fraction_keeps_exactly_k_with_ties():
    lp, old, _, adv, mask, _, _ = random_batch(9)
    ent = torch.ones_like(lp)  # every entropy tied
    ent[0, 3] = 5.0
    cfg = LpRegConfig.preset("80_20")
    _, m = lp_reg_policy_loss(lp, old, lp, adv, mask, cfg, entropy=ent)
    assert m["high_entropy/kept"] == max(1, int(mask.sum() * 0.2))
