"""lp_reg_policy_loss: hand-computed selections, float64 reference comparisons, baselines, TP=2."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_lpreg.loss import (
    PRESETS,
    LpRegConfig,
    aggregate,
    lp_reg_policy_loss,
    select_tokens,
    selection_thresholds,
    vocab_parallel_forward_kl_to_proxy,
    vocab_parallel_token_stats,
)
from tests.distributed import run_distributed
from tests.loss import reference as ref

INF = float("inf")


def _row(values):
    return torch.tensor([values], dtype=torch.float64)


# --------------------------------------------------------------------------- hand-computed selection


def test_selection_picks_the_k_lowest_negative_tokens_that_the_proxy_supports():
    lp = _row([-0.1, -0.2, -5.0, -0.3, -4.0, -0.5, -0.6, -0.7, -0.8, -0.9])
    proxy = _row([-0.1] * 10)
    proxy[0, 2] = -INF  # lowest token, but the proxy filtered it: not regularised
    proxy[0, 4] = -3.0  # second lowest, proxy gives it more mass than the policy: regularised
    adv = torch.tensor([-1.0], dtype=torch.float64)
    mask = torch.ones(1, 10, dtype=torch.bool)
    cfg = LpRegConfig(rho=0.2)  # k = int(10 * 0.2) = 2
    sel = select_tokens(lp, proxy, adv, mask, cfg)
    assert sel.lowest.nonzero()[:, 1].tolist() == [2, 4]
    assert sel.selected.nonzero()[:, 1].tolist() == [4]
    _, m = lp_reg_policy_loss(lp, lp.clone(), proxy, adv, mask, cfg)
    assert (m["lpreg/candidates"], m["lpreg/lowest"], m["lpreg/selected"]) == (10, 2, 1)
    assert m["lpreg/pass_share"] == 0.5 and m["lpreg/selected_share"] == 0.1
    assert m["lpreg/delta_rho"] == pytest.approx(math.exp(-4.0))
    # D = x - log x - 1 with x = exp(-3 - (-4)) = e: e - 1 - 1
    assert m["lpreg/kl_mean"] == pytest.approx(math.e - 2.0)


def test_fewer_than_min_selected_regularises_nothing():
    lp = _row([-0.1 * i for i in range(1, 11)])
    proxy = torch.zeros_like(lp)
    adv, mask = torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 10, dtype=torch.bool)
    assert select_tokens(lp, proxy, adv, mask, LpRegConfig(rho=0.1)).selected.sum() == 0  # k = 1
    quirk_off = select_tokens(lp, proxy, adv, mask, LpRegConfig(rho=0.1, min_selected=1))
    assert quirk_off.selected.nonzero()[:, 1].tolist() == [9]


def test_only_negative_advantages_are_candidates_and_masks_are_respected():
    lp = torch.tensor([[-3.0, -2.0, -1.0, -4.0], [-9.0, -8.0, -7.0, -6.0], [-5.0, -5.5, -0.5, -0.1]],
                      dtype=torch.float64)
    proxy = torch.zeros_like(lp)
    adv = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    cfg = LpRegConfig(rho=1.0)
    sel = select_tokens(lp, proxy, adv, mask, cfg)
    # Row 0 is positive, row 1 negative but fully masked, row 2 zero-advantage: no candidate at all.
    assert sel.candidates == 0 and sel.selected.sum() == 0
    _, m = lp_reg_policy_loss(lp, lp.clone(), proxy, adv, mask, cfg)
    assert m["lpreg/selected"] == 0 and m["loss/tokens"] == 8


def test_all_positive_advantages_are_plain_policy_gradient():
    g = torch.Generator().manual_seed(3)
    lp = (-torch.rand(3, 6, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    adv = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    on, _ = lp_reg_policy_loss(lp, old, torch.zeros_like(lp), adv, mask, LpRegConfig(rho=1.0))
    off, m = lp_reg_policy_loss(lp, old, torch.zeros_like(lp), adv, mask, LpRegConfig(enabled=False))
    assert on.item() == off.item()
    assert m["lpreg/selected"] == 0 and m["lpreg/candidates"] == 0


def test_proxy_equal_to_policy_is_not_selected_and_positive_side_is_optional():
    lp = _row([-1.0, -2.0, -3.0, -4.0])
    proxy = _row([0.0, 0.0, -3.0, -1.0])  # token 2: l == proxy, strict < fails
    mask = torch.ones(1, 4, dtype=torch.bool)
    cfg = LpRegConfig(rho=0.5)
    assert select_tokens(lp, proxy, torch.tensor([-1.0]), mask, cfg).selected.nonzero()[:, 1].tolist() == [3]
    assert select_tokens(lp, proxy, torch.tensor([1.0]), mask, cfg).selected.sum() == 0
    pos = LpRegConfig(rho=0.5, regularize_positive=0.5)
    assert select_tokens(lp, proxy, torch.tensor([1.0]), mask, pos).selected.nonzero()[:, 1].tolist() == [3]


def test_microbatch_scope_takes_exactly_k_even_with_ties_batch_scope_takes_all_ties():
    lp = _row([-5.0, -5.0, -5.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    proxy = torch.zeros_like(lp)
    adv, mask = torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 10, dtype=torch.bool)
    assert select_tokens(lp, proxy, adv, mask, LpRegConfig(rho=0.2)).selected.sum() == 2
    cfg = LpRegConfig(rho=0.2, percentile_scope="batch")
    thr = selection_thresholds(lp, adv, mask, cfg)
    assert thr.neg == -5.0
    assert select_tokens(lp, proxy, adv, mask, cfg, thr).selected.sum() == 3


def test_batch_all_tokens_scope_keeps_only_negative_tokens_of_the_lowest_overall():
    lp = torch.tensor([[-9.0, -8.0, -0.1, -0.2], [-7.0, -0.3, -0.4, -0.5]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    cfg = LpRegConfig(rho=3 / 8, percentile_scope="batch_all_tokens")  # k = 3: -9, -8, -7
    thr = selection_thresholds(lp, adv, mask, cfg)
    sel = select_tokens(lp, torch.zeros_like(lp), adv, mask, cfg, thr)
    assert sel.selected.nonzero().tolist() == [[1, 0]]  # -9 and -8 have A > 0
    with pytest.raises(ValueError, match="needs mini-batch thresholds"):
        select_tokens(lp, torch.zeros_like(lp), adv, mask, cfg)


# --------------------------------------------------------------------------- vs float64 reference


def random_batch(seed, B=4, S=40, adv_mode="mixed"):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, S, generator=g, dtype=torch.float64) * 6
    old = lp + 0.2 * torch.randn(B, S, generator=g, dtype=torch.float64)
    proxy = lp + torch.randn(B, S, generator=g, dtype=torch.float64)
    proxy[torch.rand(B, S, generator=g) < 0.2] = -INF
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    if adv_mode == "zero_row":
        adv[1] = 0.0
    mask = torch.rand(B, S, generator=g) < 0.85
    mask[2, 20:] = False
    ent = torch.rand(B, S, generator=g, dtype=torch.float64) * 3
    kl = torch.rand(B, S, generator=g, dtype=torch.float64)
    return lp, old, proxy, adv, mask, ent, kl


CONFIGS = [
    dict(),
    dict(rho=0.05),
    dict(rho=0.2, beta=0.5, kl_clamp=0.5),
    dict(rho=0.2, regularize_positive=0.1),
    dict(rho=0.2, kl="forward"),
    dict(rho=0.2, kl="reverse", eps_low=0.2, eps_high=0.28),
    dict(rho=0.2, percentile_scope="batch"),
    dict(rho=0.1, percentile_scope="batch_all_tokens", regularize_positive=0.05),
    dict(rho=0.2, entropy_coef=0.01),
    dict(enabled=False, eps_low=0.2, eps_high=0.2),
    dict(enabled=False, eps_low=0.2, eps_high=0.28, clip_ratio_c=1.1),
    dict(rho=0.2, clip_ratio_c=1.1),
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_match_reference(overrides, seed):
    cfg = LpRegConfig(**overrides)
    lp, old, proxy, adv, mask, ent, kl = random_batch(seed, adv_mode="zero_row" if seed else "mixed")
    thr = selection_thresholds(lp, adv, mask, cfg) if cfg.percentile_scope != "microbatch" else None
    a, b = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    ea, eb = ent.clone().requires_grad_(True), ent.clone().requires_grad_(True)
    ka, kb = kl.clone().requires_grad_(True), kl.clone().requires_grad_(True)
    ours, metrics = lp_reg_policy_loss(a, old, proxy, adv, mask, cfg, exact_kl=ka, entropy=ea, thresholds=thr)
    expected, selected = ref.policy_loss(b, old, proxy, adv, mask, cfg, exact_kl=kb, entropy_t=eb, thresholds=thr)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)
    ours.backward()
    expected.backward()
    for x, y in ((a, b), (ea, eb), (ka, kb)):
        torch.testing.assert_close(x.grad if x.grad is not None else torch.zeros_like(x),
                                   y.grad if y.grad is not None else torch.zeros_like(y), atol=1e-12, rtol=1e-12)
    assert torch.isfinite(a.grad).all()
    if cfg.enabled:
        assert metrics["lpreg/selected"] == len(selected)


def test_exact_kl_callable_is_only_asked_for_the_selected_tokens():
    lp, old, proxy, adv, mask, _, kl = random_batch(5)
    cfg = LpRegConfig(rho=0.2, kl="forward")
    seen = []

    def only_selected(sel_mask):
        seen.append(int(sel_mask.sum()))
        return kl[sel_mask] * 1.0

    with_callable, m = lp_reg_policy_loss(lp, old, proxy, adv, mask, cfg, exact_kl=only_selected)
    with_tensor, _ = lp_reg_policy_loss(lp, old, proxy, adv, mask, cfg, exact_kl=kl)
    assert seen == [m["lpreg/selected"]] and seen[0] > 0
    assert with_callable.item() == with_tensor.item()
    with pytest.raises(ValueError, match="needs exact_kl"):
        lp_reg_policy_loss(lp, old, proxy, adv, mask, cfg)


def test_filtered_targets_never_produce_nan_gradients():
    lp = _row([-9.0, -8.0, -7.0, -0.1]).requires_grad_(True)
    proxy = torch.full_like(lp, -INF)  # every token filtered by the proxy
    loss, m = lp_reg_policy_loss(lp, lp.detach(), proxy, torch.tensor([-1.0]), torch.ones(1, 4, dtype=torch.bool),
                                 LpRegConfig(rho=1.0))
    loss.backward()
    assert m["lpreg/lowest"] == 4 and m["lpreg/selected"] == 0
    assert torch.isfinite(lp.grad).all()


def test_nonfinite_inputs_are_counted_not_hidden():
    lp, old, proxy, adv, mask, _, _ = random_batch(2)
    mask[0, 0] = True
    lp[0, 0] = float("nan")
    loss, m = lp_reg_policy_loss(lp, old, proxy, adv, mask, LpRegConfig())
    assert m["loss/nonfinite_tokens"] == 1 and torch.isnan(loss)


# --------------------------------------------------------------------------- baselines


def _ppo(lp, old, adv, eps_low, eps_high):
    r = torch.exp(lp - old)
    return torch.maximum(-adv * r, -adv * r.clamp(1 - eps_low, 1 + eps_high))


def test_clip_presets_are_ppo_clip():
    lp, old, _, adv, mask, _, _ = random_batch(7)
    old = lp + 0.5 * torch.randn_like(lp)
    a2 = adv.unsqueeze(-1).expand_as(lp)
    for name, (lo, hi) in (("grpo", (0.2, 0.2)), ("clip_higher", (0.2, 0.28))):
        loss, m = lp_reg_policy_loss(lp, old, lp, adv, mask, LpRegConfig.preset(name))
        expected = _ppo(lp, old, a2, lo, hi)[mask].mean()
        torch.testing.assert_close(loss, expected)
        assert 0 < m["pg/clipfrac"] < 1
        # The split by bound, against the ratio directly (float64 reference).
        r = torch.exp(lp.double() - old.double())
        high = (r > 1 + hi) & (a2 > 0) & mask
        low = (r < 1 - lo) & (a2 < 0) & mask
        assert m["pg/clipfrac_high"] == pytest.approx(float(high.sum() / mask.sum()))
        assert m["pg/clipfrac_low"] == pytest.approx(float(low.sum() / mask.sum()))
        assert high.any() and low.any()
        assert m["pg/clipfrac"] == pytest.approx(m["pg/clipfrac_high"] + m["pg/clipfrac_low"])


def test_gspo_uses_length_normalised_sequence_ratios():
    lp, old, _, adv, mask, _, _ = random_batch(8)
    lp = lp.requires_grad_(True)
    cfg = LpRegConfig.preset("gspo")
    loss, _ = lp_reg_policy_loss(lp, old, lp.detach(), adv, mask, cfg)
    seq = torch.stack([(lp[b] - old[b])[mask[b]].mean() for b in range(lp.shape[0])])
    s = torch.exp(seq).unsqueeze(-1).expand_as(lp)
    a2 = adv.unsqueeze(-1).expand_as(lp)
    per_tok = torch.maximum(-a2 * s, -a2 * s.clamp(1 - 3e-4, 1 + 4e-4))
    expected = torch.stack([per_tok[b][mask[b]].mean() for b in range(lp.shape[0])]).mean()
    torch.testing.assert_close(loss, expected)
    # Gradient: d/d l_t of s_i is s_i (token-level stop-gradient form), so each token sees A * s_i.
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[~mask].abs().sum() == 0


def test_kl_cov_penalises_the_top_covariance_tokens():
    lp = _row([-1.0, -2.0, -3.0, -4.0]).repeat(2, 1)
    old = lp - 0.1
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    cfg = LpRegConfig.preset("kl_cov", kl_cov_ratio=0.25)  # max(1, int(8 * 0.25)) = 2 tokens
    loss, m = lp_reg_policy_loss(lp, old, lp, adv, mask, cfg)
    # cov = (A - 0)(l - mean l): largest for (A=+1, l=-1) and (A=-1, l=-4).
    base = -adv.unsqueeze(-1) * torch.exp(lp - old)
    expected = base.clone()
    expected[0, 0] += 0.1
    expected[1, 3] += 0.1
    assert m["kl_cov/selected"] == 2
    torch.testing.assert_close(loss, expected.mean())


def test_80_20_trains_only_on_the_highest_entropy_tokens():
    lp, old, _, adv, mask, ent, _ = random_batch(9)
    mask = torch.ones_like(mask)
    cfg = LpRegConfig.preset("80_20")
    loss, m = lp_reg_policy_loss(lp, old, lp, adv, mask, cfg, entropy=ent)
    k = int(mask.sum() * 0.2)
    keep = torch.zeros(mask.numel(), dtype=torch.bool)
    keep[ent.reshape(-1).topk(k).indices] = True
    expected = _ppo(lp, old, adv.unsqueeze(-1).expand_as(lp), 0.2, 0.28).reshape(-1)[keep].mean()
    assert m["high_entropy/kept"] == k
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        lp_reg_policy_loss(lp, old, lp, adv, mask, cfg)


def test_entropy_bonus_gradient_flows_into_the_entropy():
    lp, old, _, adv, mask, ent, _ = random_batch(10)
    ent = ent.requires_grad_(True)
    loss, _ = lp_reg_policy_loss(lp, old, lp, adv, mask, LpRegConfig.preset("entropy_bonus"), entropy=ent)
    loss.backward()
    n = mask.sum()
    torch.testing.assert_close(ent.grad, torch.where(mask, -0.001 / n, 0.0).to(ent.dtype))


def test_aggregation_modes():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(x, m).item() == pytest.approx(16 / 4)
    assert aggregate(x, m, "seq_mean_token_mean").item() == pytest.approx((2 + 10) / 2)
    assert aggregate(x, m, "global_token_mean", global_tokens=8).item() == pytest.approx(16 / 8)
    with pytest.raises(ValueError, match="global_tokens"):
        aggregate(x, m, "global_token_mean")


def test_config_defaults_validation_and_presets():
    c = LpRegConfig()
    assert (c.kappa, c.rho, c.beta, c.threshold, c.kl, c.percentile_scope, c.min_selected, c.kl_clamp,
            c.eps_low, c.eps_high, c.regularize_positive, c.enabled) == (
        0.02, 0.01, 1.0, "minp", "k3", "microbatch", 2, 10.0, 1.0, 9.0, 0.0, True)
    for bad in (dict(kl="js"), dict(rho=2.0), dict(kappa=0.0), dict(threshold="topk"), dict(eps_low=1.5)):
        with pytest.raises(ValueError, match="LpRegConfig"):
            LpRegConfig(**bad)
    for name in PRESETS:
        LpRegConfig.preset(name)
    with pytest.raises(ValueError, match="unknown loss preset"):
        LpRegConfig.preset("ppo2")


# --------------------------------------------------------------------------- end to end on shards


def _pipeline(logits_shard, proxy_shard, target, old, adv, mask, cfg, group, vocab):
    """Sharded logits -> fused stats -> Lp-Reg loss, as the trainer will call it."""
    B, S = target.shape
    st = vocab_parallel_token_stats(logits_shard, target, group=group, vocab_size=vocab,
                                    kappa=cfg.kappa, threshold=cfg.threshold)
    with torch.no_grad():
        proxy = vocab_parallel_token_stats(proxy_shard, target, group=group, vocab_size=vocab,
                                           kappa=cfg.kappa, entropy=False).proxy_logprobs

    def exact(sel):
        return vocab_parallel_forward_kl_to_proxy(
            logits_shard[sel], proxy_shard[sel], cfg.kappa, group=group, vocab_size=vocab)

    return lp_reg_policy_loss(st.logprobs, old, proxy, adv, mask, cfg,
                              exact_kl=exact if cfg.kl == "forward" else None, entropy=st.entropy)


def e2e_inputs(seed=0, B=3, S=24, V=37):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, S, V, generator=g, dtype=torch.float64)
    # A flatter old policy: the current policy has pushed low tokens below what the proxy gives them.
    proxy_logits = 0.4 * logits + 0.3 * torch.randn(B, S, V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (B, S), generator=g)
    old = ref.logprobs(proxy_logits, target)
    adv = torch.tensor([-1.0, 0.5, -0.7], dtype=torch.float64)
    mask = torch.rand(B, S, generator=g) < 0.9
    return logits, proxy_logits, target, old, adv, mask


E2E_CONFIGS = [LpRegConfig(rho=0.2), LpRegConfig(rho=0.2, kl="forward", entropy_coef=0.01),
               LpRegConfig(rho=0.2, clip_ratio_c=1.5)]


def _e2e_body(ctx, configs):
    logits, proxy_logits, target, old, adv, mask = e2e_inputs()
    V = logits.shape[-1]
    per = -(-V // ctx.tp_size)
    pad = torch.full((*logits.shape[:2], per * ctx.tp_size - V), 100.0, dtype=logits.dtype)
    sl = slice(ctx.tp_rank * per, (ctx.tp_rank + 1) * per)
    out = []
    for cfg in configs:
        z = torch.cat([logits, pad], -1)[..., sl].contiguous().requires_grad_(True)
        y = torch.cat([proxy_logits, pad], -1)[..., sl].contiguous()
        loss, metrics = _pipeline(z, y, target, old, adv, mask, cfg, ctx.tp_group, V)
        loss.backward()
        out.append((loss.item(), z.grad, metrics["lpreg/selected"]))
    return out


def _e2e_reference(cfg):
    logits, proxy_logits, target, old, adv, mask = e2e_inputs()
    z = logits.clone().requires_grad_(True)
    proxy = ref.proxy_logprobs(proxy_logits.reshape(-1, logits.shape[-1]), target.reshape(-1), cfg.kappa,
                               cfg.threshold).view(target.shape)
    flat = z.reshape(-1, z.shape[-1])
    lp = ref.logprobs(flat, target.reshape(-1)).view(target.shape)
    ent = ref.entropy(flat).view(target.shape)
    kl = ref.forward_kl(flat, proxy_logits.reshape(-1, z.shape[-1]), cfg.kappa, cfg.threshold).view(target.shape)
    loss, selected = ref.policy_loss(lp, old, proxy, adv, mask, cfg, exact_kl=kl, entropy_t=ent)
    loss.backward()
    return loss.item(), z.grad, len(selected)


def _check_e2e(per_rank, tp):
    V = e2e_inputs()[0].shape[-1]
    for i, cfg in enumerate(E2E_CONFIGS):
        exp_loss, exp_grad, exp_sel = _e2e_reference(cfg)
        assert exp_sel > 0, "the case must exercise the regulariser"
        grad = torch.cat([per_rank[r][i][1] for r in range(tp)], -1)
        for r in range(tp):
            assert per_rank[r][i][0] == pytest.approx(exp_loss, abs=1e-12)
            assert per_rank[r][i][2] == exp_sel
        torch.testing.assert_close(grad[..., :V], exp_grad, atol=1e-12, rtol=1e-10)
        assert torch.all(grad[..., V:] == 0)


class _Single:
    tp_rank, tp_size, tp_group = 0, 1, None


def test_end_to_end_tp1_matches_reference():
    _check_e2e([_e2e_body(_Single, E2E_CONFIGS)], 1)


def test_end_to_end_tp2_matches_reference():
    _check_e2e(run_distributed(_e2e_body, world_size=2, tp_size=2, args=(E2E_CONFIGS,)), 2)


def _dp_threshold_body(ctx, cfg):
    lp, _, _, adv, mask, _, _ = random_batch(11, B=8)
    mine = slice(ctx.dp_rank * 4, (ctx.dp_rank + 1) * 4)
    halves = [(lp[mine][:2], adv[mine][:2], mask[mine][:2]), (lp[mine][2:], adv[mine][2:], mask[mine][2:])]
    thr = selection_thresholds(*map(list, zip(*halves)), cfg, group=ctx.dp_group)
    return thr.neg, thr.pos, thr.pool_sizes


def test_batch_scope_thresholds_agree_across_dp_ranks():
    cfg = LpRegConfig(rho=0.1, regularize_positive=0.05, percentile_scope="batch")
    per_rank = run_distributed(_dp_threshold_body, world_size=2, tp_size=1, args=(cfg,))
    lp, _, _, adv, mask, _, _ = random_batch(11, B=8)
    local = selection_thresholds(lp, adv, mask, cfg)
    for neg, pos, sizes in per_rank:
        assert (neg, pos, sizes) == (local.neg, local.pos, local.pool_sizes)
    assert local.neg is not None and local.pos is not None


# --------------------------------------------------------------------------- truncated importance sampling


@pytest.mark.parametrize("overrides", [dict(rho=0.2), dict(rho=0.2, beta=0.5, kl="forward"),
                                       dict(enabled=False, eps_low=0.2, eps_high=0.2)],
                         ids=["k3", "forward", "grpo"])
def test_tis_weighted_loss_and_gradient_match_reference(overrides):
    from megatron_lpreg.grpo.mismatch import tis_weights

    cfg = LpRegConfig(**overrides)
    lp, old, proxy, adv, mask, _, kl = random_batch(3)
    g = torch.Generator().manual_seed(9)
    engine = old + 0.7 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    cap = 1.5
    w, m = tis_weights(old, engine, mask, cap)
    expected_w = ref.tis_weights(old, engine, cap)
    torch.testing.assert_close(w[mask], expected_w[mask], atol=1e-12, rtol=1e-12)
    assert torch.all(w[~mask] == 1.0)
    ratio = torch.exp(old - engine)[mask]
    assert m["mismatch/tis_capped"] == pytest.approx(float((ratio > cap).double().mean()))
    assert 0.1 < m["mismatch/tis_capped"] < 0.9  # the test exercises both sides of the cap
    assert m["mismatch/tis_weight_mean"] == pytest.approx(float(expected_w[mask].mean()))
    a, b = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    ka, kb = kl.clone(), kl.clone()
    ours, metrics = lp_reg_policy_loss(a, old, proxy, adv, mask, cfg, exact_kl=ka, pg_weight=w)
    expected, selected = ref.policy_loss(b, old, proxy, adv, mask, cfg, exact_kl=kb, pg_weight=expected_w)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)
    if cfg.enabled:
        assert metrics["lpreg/selected"] == len(selected) > 0  # the unweighted D_t is in play
    unweighted, _ = ref.policy_loss(lp.clone(), old, proxy, adv, mask, cfg, exact_kl=kl.clone())
    assert abs(float(unweighted) - float(expected)) > 1e-3  # the weights changed the loss


def test_without_tis_the_loss_is_unchanged_bit_for_bit():
    """pg_weight=None takes no extra operation; weights of exactly 1 give the same bits too."""
    lp, old, proxy, adv, mask, _, _ = random_batch(4)
    for dtype in (torch.float64, torch.float32):
        results = []
        for weight in (None, torch.ones_like(lp, dtype=dtype)):
            x = lp.to(dtype).clone().requires_grad_(True)
            loss, m = lp_reg_policy_loss(x, old.to(dtype), proxy.to(dtype), adv.to(dtype), mask,
                                         LpRegConfig(rho=0.2), pg_weight=weight)
            loss.backward()
            results.append((loss.detach(), x.grad, m))
        (l0, g0, m0), (l1, g1, m1) = results
        assert torch.equal(l0, l1) and torch.equal(g0, g1) and m0 == m1


def test_dual_clip_caps_negative_advantage_tokens_and_is_off_by_default():
    lp, old, proxy, adv, mask, _, _ = random_batch(0)
    assert LpRegConfig().clip_ratio_c == 0.0
    _, plain = lp_reg_policy_loss(lp, old, proxy, adv, mask, LpRegConfig(enabled=False))
    assert "pg/clipfrac_dual" not in plain
    _, m = lp_reg_policy_loss(lp, old, proxy, adv, mask, LpRegConfig(enabled=False, clip_ratio_c=1.1))
    r, a = torch.exp(lp - old), adv[:, None].expand_as(lp)
    assert m["pg/clipfrac_dual"] == pytest.approx(float(((r > 1.1) & (a < 0) & mask).sum() / mask.sum()))
    assert m["pg/clipfrac_dual"] > 0
    with pytest.raises(ValueError, match="clip_ratio_c"):
        LpRegConfig(clip_ratio_c=1.0)
