"""The warning when Lp-Reg regularises nothing for several steps, and its reason."""

from __future__ import annotations

from megatron_lpreg.config import load_config
from megatron_lpreg.grpo.lpreg_activity import INACTIVE_STEPS, LpRegActivity


def _loss(*overrides):
    return load_config(None, list(overrides)).loss


def _metrics(selected, lowest, candidates, delta=None):
    m = {"lpreg/selected": selected, "lpreg/lowest": lowest, "lpreg/candidates": candidates}
    return m if delta is None else {**m, "lpreg/delta_rho": delta}


def test_warns_once_per_stretch_of_inactive_steps():
    watch = LpRegActivity(_loss("loss.rho=0.05"))
    quiet = _metrics(0.0, 0.0, 30.0)
    said = [watch.update(quiet) for _ in range(2 * INACTIVE_STEPS)]
    assert [i for i, w in enumerate(said) if w] == [INACTIVE_STEPS - 1]  # once, at the N-th step
    assert watch.update(_metrics(3.0, 4.0, 30.0)) is None  # active again: a new stretch may warn
    said = [watch.update(quiet) for _ in range(INACTIVE_STEPS)]
    assert said[:-1] == [None] * (INACTIVE_STEPS - 1) and said[-1]


def test_the_reason_k_below_min_selected():
    watch = LpRegActivity(_loss("loss.rho=0.05"))
    warning = [watch.update(_metrics(0.0, 0.0, 30.0)) for _ in range(INACTIVE_STEPS)][-1]
    assert warning == (
        f"Lp-Reg regularised no token in the last {INACTIVE_STEPS} steps: k = int(rho x negative-advantage "
        "tokens) < loss.min_selected=2 in every micro-batch (rho=0.05; at most 30 such tokens in a step): "
        "a micro-batch needs at least 40 of them; raise loss.rho, the prompts or tokens per micro-batch "
        "(grpo.micro_batch_tokens), or set loss.percentile_scope=batch (docs/lp_reg.md)")


def test_the_reason_none_in_the_proxy_support():
    watch = LpRegActivity(_loss())
    warning = [watch.update(_metrics(0.0, 6.0, 700.0, delta=0.004)) for _ in range(INACTIVE_STEPS)][-1]
    assert "the 30 lowest-probability negative-advantage tokens examined in them were all outside the proxy's " \
           "support " \
           "(p < kappa x max p, kappa=0.02)" in warning and "lpreg/delta_rho=0.004" in warning


def test_the_reason_no_negative_advantage_and_silence_without_lp_reg():
    watch = LpRegActivity(_loss())
    warning = [watch.update(_metrics(0.0, 0.0, 0.0)) for _ in range(INACTIVE_STEPS)][-1]
    assert "no response token had a negative advantage" in warning
    grpo = LpRegActivity(_loss("loss.preset=grpo"))  # plain GRPO reports lpreg/selected 0 but no lpreg/lowest
    assert all(grpo.update({"lpreg/selected": 0.0, "lpreg/candidates": 9.0}) is None for _ in range(20))
