"""Vocab-parallel statistics vs unsharded float64 references, values and gradients, TP=1 and TP=2."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.loss import (
    set_debug,
    vocab_parallel_entropy,
    vocab_parallel_forward_kl_to_proxy,
    vocab_parallel_logprobs,
    vocab_parallel_proxy_logprobs,
    vocab_parallel_reverse_kl_to_proxy,
    vocab_parallel_token_stats,
)
from tests.distributed import run_distributed
from tests.loss import reference as ref

PAD_VALUE = 100.0  # padding columns hold garbage that would dominate any softmax they leaked into
TP = 2


def _case(name, logits, target, kappa, threshold, proxy_logits=None, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    T = logits.shape[0]
    if proxy_logits is None:
        proxy_logits = logits + 0.5 * torch.randn(logits.shape, generator=g, dtype=torch.float64)
    return dict(
        name=name, logits=logits, proxy_logits=proxy_logits, target=target, kappa=kappa,
        threshold=threshold, upstream=torch.randn(4, T, generator=g, dtype=torch.float64),
    )


def make_cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    for threshold, kappa in (("minp", 0.02), ("minp", 0.3), ("fixed", 0.05)):
        z = 2.0 * torch.randn(9, 13, generator=g, dtype=torch.float64)
        t = torch.randint(0, 13, (9,), generator=g)
        cases.append(_case(f"random-{threshold}-{kappa}", z, t, kappa, threshold, seed=len(cases)))
    # Confident rows: one token takes almost all mass, so nearly everything is filtered; targets
    # alternate between the argmax (kept) and others (filtered).
    z = torch.randn(6, 11, generator=g, dtype=torch.float64)
    top = torch.randint(0, 11, (6,), generator=g)
    z[torch.arange(6), top] = 25.0
    t = torch.where(torch.arange(6) % 2 == 0, top, (top + 3) % 11)
    cases.append(_case("confident", z, t, 0.02, "minp", proxy_logits=z.clone(), seed=len(cases)))
    # Ties exactly at the threshold (p_v == kappa * max p): the reference code keeps them.
    ln2 = math.log(2.0)
    z = torch.tensor(
        [[0.0, -ln2, -ln2, -5.0, -1.0, -9.0, -0.5], [-3.0, -3.0, -3.0 - ln2, -8.0, -3.0, -4.0, -3.0 - ln2]],
        dtype=torch.float64,
    )
    t = torch.tensor([1, 2])
    cases.append(_case("ties-at-threshold", z, t, 0.5, "minp", proxy_logits=z.clone(), seed=len(cases)))
    # kappa = 1: only the (tied) maxima are kept.
    cases.append(_case("tied-max", z, torch.tensor([0, 4]), 1.0, "minp", proxy_logits=z.clone(), seed=9))
    # Tiny vocab: V=3 padded to 8, so rank 1 of TP=2 holds padding only.
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    cases.append(_case("rank-all-padding", z, torch.randint(0, 3, (5,), generator=g), 0.2, "minp", seed=11))
    return cases


def padded_width(vocab: int, tp: int, extra: int = 0) -> int:
    per = -(-vocab // tp) + extra
    return per * tp


def shard(full: torch.Tensor, rank: int, tp: int, width: int) -> torch.Tensor:
    padded = torch.full((full.shape[0], width), PAD_VALUE, dtype=full.dtype)
    padded[:, : full.shape[1]] = full
    per = width // tp
    return padded[:, rank * per : (rank + 1) * per].contiguous()


def evaluate(case, rank, tp, group, chunk_tokens=None, dtype=torch.float64):
    """Our functions on this rank's shard: values and the shard's gradients."""
    vocab = case["logits"].shape[1]
    extra = 4 if case["name"] == "rank-all-padding" else 0
    width = padded_width(vocab, tp, extra)
    z = shard(case["logits"], rank, tp, width).to(dtype).requires_grad_(True)
    y = shard(case["proxy_logits"], rank, tp, width).to(dtype)
    u = case["upstream"].to(torch.float64)
    kw = dict(group=group, vocab_size=vocab, chunk_tokens=chunk_tokens)
    out = {}
    st = vocab_parallel_token_stats(z, case["target"], kappa=case["kappa"], threshold=case["threshold"], **kw)
    ((st.logprobs * u[0]).sum() + (st.entropy * u[1]).sum()).backward()
    out.update(lp=st.logprobs.detach(), ent=st.entropy.detach(), proxy=st.proxy_logprobs,
               mass=st.kept_mass, grad_stats=z.grad.clone())
    assert not st.proxy_logprobs.requires_grad
    z.grad = None
    for key, fn, w in (("fkl", vocab_parallel_forward_kl_to_proxy, u[2]), ("rkl", vocab_parallel_reverse_kl_to_proxy, u[3])):
        v = fn(z, y, case["kappa"], case["threshold"], **kw)
        (v * w).sum().backward()
        out[key], out["grad_" + key] = v.detach(), z.grad.clone()
        z.grad = None
    # The single-purpose contract functions agree with the fused pass.
    out["lp_only"] = vocab_parallel_logprobs(z, case["target"], **kw).detach()
    out["ent_only"] = vocab_parallel_entropy(z, **kw).detach()
    out["proxy_only"] = vocab_parallel_proxy_logprobs(z, case["target"], case["kappa"], case["threshold"], **kw)
    return out


def reference(case):
    z = case["logits"].clone().requires_grad_(True)
    y, t, k, th, u = case["proxy_logits"], case["target"], case["kappa"], case["threshold"], case["upstream"]
    out = {"lp": ref.logprobs(z, t).detach(), "ent": ref.entropy(z).detach(),
           "proxy": ref.proxy_logprobs(z, t, k, th), "mass": ref.kept_mass(z.detach(), k, th)}
    ((ref.logprobs(z, t) * u[0]).sum() + (ref.entropy(z) * u[1]).sum()).backward()
    out["grad_stats"] = z.grad.clone()
    z.grad = None
    for key, fn, w in (("fkl", ref.forward_kl, u[2]), ("rkl", ref.reverse_kl, u[3])):
        v = fn(z, y, k, th)
        (v * w).sum().backward()
        out[key], out["grad_" + key] = v.detach(), z.grad.clone()
        z.grad = None
    return out


def assert_matches(ours_per_rank, expected, tp, name, atol=1e-10, rtol=1e-9):
    vocab = expected["grad_stats"].shape[1]
    for key in ("lp", "ent", "proxy", "mass", "fkl", "rkl"):
        for r, ours in enumerate(ours_per_rank):
            torch.testing.assert_close(ours[key].double(), expected[key], atol=atol, rtol=rtol,
                                       msg=lambda m: f"{name} {key} rank {r}: {m}")
    for r, ours in enumerate(ours_per_rank):
        torch.testing.assert_close(ours["lp_only"].double(), expected["lp"], atol=atol, rtol=rtol)
        torch.testing.assert_close(ours["ent_only"].double(), expected["ent"], atol=atol, rtol=rtol)
        torch.testing.assert_close(ours["proxy_only"].double(), expected["proxy"], atol=atol, rtol=rtol)
    for key in ("grad_stats", "grad_fkl", "grad_rkl"):
        full = torch.cat([o[key].double() for o in ours_per_rank], dim=1)
        torch.testing.assert_close(full[:, :vocab], expected[key], atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name} {key}: {m}")
        assert torch.all(full[:, vocab:] == 0), f"{name} {key}: padding columns got gradient"


@pytest.mark.parametrize("case", make_cases(), ids=lambda c: c["name"])
@pytest.mark.parametrize("chunk_tokens", [None, 2])
def test_tp1_matches_float64_reference(case, chunk_tokens):
    ours = evaluate(case, 0, 1, None, chunk_tokens)
    assert_matches([ours], reference(case), 1, case["name"])


def _tp2_body(ctx, cases, chunk_tokens):
    return [evaluate(c, ctx.tp_rank, ctx.tp_size, ctx.tp_group, chunk_tokens) for c in cases]


def test_tp2_matches_float64_reference():
    cases = make_cases()
    per_rank = run_distributed(_tp2_body, world_size=TP, tp_size=TP, args=(cases, 3))
    for i, case in enumerate(cases):
        assert_matches([per_rank[r][i] for r in range(TP)], reference(case), TP, case["name"])


def test_confident_rows_are_filtered_as_expected():
    case = make_cases()[3]
    proxy = ref.proxy_logprobs(case["logits"], case["target"], 0.02, "minp")
    assert torch.isfinite(proxy[::2]).all() and torch.isinf(proxy[1::2]).all()
    assert torch.allclose(proxy[::2], torch.zeros(3, dtype=torch.float64))  # only the argmax survives


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 0.0)])
def test_low_precision_inputs_are_reduced_in_float32(dtype, atol):
    case = make_cases()[0]
    expected = reference(case)
    z = case["logits"].to(dtype)
    ours = evaluate({**case, "logits": z.double()}, 0, 1, None, dtype=dtype)
    # Reference on the same rounded inputs: the only error left is float32 arithmetic.
    exp_rounded = reference({**case, "logits": z.double(), "proxy_logits": case["proxy_logits"].to(dtype).double()})
    for key in ("lp", "ent", "fkl", "rkl"):
        assert ours[key].dtype == torch.float32
        torch.testing.assert_close(ours[key].double(), exp_rounded[key], atol=5e-5, rtol=1e-5)
    assert ours["grad_stats"].dtype == dtype
    assert expected["lp"].shape == ours["lp"].shape


def test_nan_logits_raise_in_debug_mode_and_stay_local_otherwise():
    z = torch.randn(4, 10, dtype=torch.float64)
    z[2, 5] = float("nan")
    t = torch.tensor([1, 2, 3, 4])
    lp = vocab_parallel_logprobs(z, t)
    assert torch.isnan(lp[2]) and torch.isfinite(lp[[0, 1, 3]]).all()
    set_debug(True)
    try:
        with pytest.raises(FloatingPointError, match="non-finite logits at token row 2"):
            vocab_parallel_logprobs(z, t)
        with pytest.raises(FloatingPointError, match="non-finite proxy logits at token row 2"):
            vocab_parallel_forward_kl_to_proxy(z.nan_to_num(), z, 0.02)
    finally:
        set_debug(False)


def test_bad_targets_and_shapes_are_clear_errors():
    z = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 6\)"):
        vocab_parallel_logprobs(z, torch.tensor([0, 6, 1]), vocab_size=6)
    with pytest.raises(ValueError, match="vocab_size=9"):
        vocab_parallel_logprobs(z, torch.tensor([0, 1, 1]), vocab_size=9)
    with pytest.raises(ValueError, match="kappa"):
        vocab_parallel_proxy_logprobs(z, torch.tensor([0, 1, 1]), kappa=0.0)
    with pytest.raises(ValueError, match="proxy_logits shape"):
        vocab_parallel_forward_kl_to_proxy(z, torch.randn(3, 7), 0.02)


def test_batched_leading_dims_round_trip():
    z = torch.randn(2, 3, 10, dtype=torch.float64)
    t = torch.randint(0, 10, (2, 3))
    lp = vocab_parallel_logprobs(z, t)
    assert lp.shape == (2, 3)
    torch.testing.assert_close(lp, ref.logprobs(z, t))


@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_inplace_consumes_logits_and_gives_the_same_values_and_gradients(with_entropy_grad):
    case = make_cases()[0]
    vocab = case["logits"].shape[1]
    width = padded_width(vocab, 1, extra=3)
    results = []
    for inplace in (False, True):
        w = shard(case["logits"], 0, 1, width).requires_grad_(True)
        z = w * 1.0  # a non-leaf, like the output layer's logits
        st = vocab_parallel_token_stats(z, case["target"], vocab_size=vocab, inplace=inplace)
        loss = (st.logprobs * case["upstream"][0]).sum()
        if with_entropy_grad:
            loss = loss + (st.entropy * case["upstream"][1]).sum()
        loss.backward()
        results.append((st.logprobs.detach(), st.entropy.detach(), st.proxy_logprobs, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    expected = reference(case)["grad_stats"] if with_entropy_grad else None
    if expected is not None:
        torch.testing.assert_close(results[1][3][:, :vocab], expected, atol=1e-10, rtol=1e-9)
    assert torch.all(results[1][3][:, vocab:] == 0)


def test_inplace_refuses_silent_reuse_of_consumed_logits():
    w = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    z = w * 1.0
    other = (z**2).sum()  # saves z for its backward
    st = vocab_parallel_token_stats(z, torch.tensor([1, 2, 3, 4]), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (other + st.logprobs.sum()).backward()


@pytest.mark.parametrize("grad", [False, True])
def test_kept_mass_is_the_same_whether_e_is_scratch_or_kept_for_the_backward(grad):
    """The kept-mass sweep thresholds e in place when nothing reads it later (scoring pass, or e in
    a workspace); consumed logits that a backward needs must survive it."""
    g = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(40, 29, generator=g, dtype=torch.float64)
    target = torch.randint(0, 29, (40,), generator=g)
    out = []
    for inplace in (False, True):
        w = logits.clone().requires_grad_(grad)
        z = w * 1.0
        with torch.set_grad_enabled(grad):
            st = vocab_parallel_token_stats(z, target, inplace=inplace, chunk_tokens=7)
            if grad:
                (st.logprobs.sum() + st.entropy.sum()).backward()
        out.append((st.logprobs.detach(), st.entropy.detach(), st.proxy_logprobs, st.kept_mass,
                    w.grad if grad else torch.zeros(())))
    for a, b in zip(out[0][:4], out[1][:4]):
        assert torch.equal(a, b)
    # The consumed backward scales the stored e, the other recomputes exp: equal to rounding only.
    torch.testing.assert_close(out[0][4], out[1][4], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[1][3], ref.kept_mass(logits, 0.02, "minp"), atol=1e-12, rtol=1e-12)
    if grad:
        expected = torch.func.grad(lambda x: (ref.logprobs(x, target) + ref.entropy(x)).sum())(logits)
        torch.testing.assert_close(out[1][4], expected, atol=1e-10, rtol=1e-9)
