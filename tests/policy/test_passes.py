"""The log-prob and training passes of policy/passes.py on a tiny Qwen2 at TP=2 (2 gloo ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import run_distributed
from tests.model.tiny_models import save_tiny_model


def random_rollouts(vocab: int, n: int = 8, seed: int = 0):
    """``n`` sequences of varied prompt and response lengths with +-1 advantages."""
    from megatron_lpreg.policy.batching import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, 7, (n,), generator=g).tolist()
    response_lens = torch.randint(1, 20, (n,), generator=g).tolist()
    ids = [torch.randint(0, vocab, (p + r,), generator=g).tolist() for p, r in zip(prompt_lens, response_lens)]
    adv = torch.tensor([(-1.0) ** i for i in range(n)])
    return RolloutBatch.from_sequences(ids, prompt_lens, adv)


def load_policy(ctx, directory, dtype: str = "float32"):
    from megatron_lpreg.config import ModelConfig
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.policy import setup
    from megatron_lpreg.policy.passes import PolicyContext

    spec = parse_hf_config(directory)
    model = setup.load_policy(ModelConfig(path=str(directory), dtype=dtype, use_te=False), spec,
                              tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
    pc = PolicyContext(model=model, vocab_size=spec.vocab_size, pad_id=0, device=ctx.device, tp_group=ctx.tp,
                       dp_group=None, dp_size=1, micro_batch_tokens=64)
    return spec, pc


class CaptureGrads:
    """An optimiser that keeps each accumulated gradient and steps nowhere."""

    def __init__(self, model):
        self.model, self.grads = model, []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters()})
        self.model.zero_grad(set_to_none=True)


def _on_policy_both_ways(ctx, directory):
    """One update with the old log-probs from the separate pass, and from the training forward."""
    from megatron_lpreg.loss import LpRegConfig
    from megatron_lpreg.policy.passes import recompute_logprobs, train

    out = {}
    for name, cfg in (("lp_reg", LpRegConfig(rho=0.5, min_selected=1)),
                      ("lp_reg_forward_kl", LpRegConfig(rho=0.5, min_selected=1, kl="forward")),
                      ("grpo", LpRegConfig(enabled=False, eps_low=0.2, eps_high=0.28)),
                      ("grpo_support", LpRegConfig(enabled=False, eps_low=0.2, eps_high=0.28))):
        for fused in (False, True):
            spec, pc = load_policy(ctx, directory, dtype="float64")
            pc.min_p_support = name == "grpo_support"
            batch = random_rollouts(spec.vocab_size, n=8, seed=5)
            opt = CaptureGrads(pc.model)
            if fused:
                result = train(pc, batch, cfg, opt, num_minibatches=1, epochs=1, scores_from_forward=True)
                scores = result.scores
            else:
                scores = recompute_logprobs(pc, batch, cfg)
                batch.set(old_logprobs=scores.old_logprobs, proxy_logprobs=scores.proxy_logprobs)
                result = train(pc, batch, cfg, opt, num_minibatches=1, epochs=1)
            out[name, fused] = scores, opt.grads[0], result.metrics.reduce(None)
    return out


def test_on_policy_scores_from_the_training_forward_equal_the_separate_pass(tmp_path):
    directory = save_tiny_model("qwen2", tmp_path / "qwen2")
    for out in run_distributed(_on_policy_both_ways, world_size=2, tp_size=2, args=(str(directory),)):
        for name in ("lp_reg", "lp_reg_forward_kl", "grpo"):
            (s_sep, g_sep, m_sep), (s_fused, g_fused, m_fused) = out[name, False], out[name, True]
            for field in ("old_logprobs", "entropy", "proxy_logprobs", "kept_mass"):
                a, b = getattr(s_sep, field), getattr(s_fused, field)
                if a is None:
                    assert b is None and name == "grpo"
                    continue
                assert a.dtype == b.dtype == torch.float64  # a float64 model's scores keep float64
                assert torch.equal(torch.isinf(a), torch.isinf(b)), (name, field)
                torch.testing.assert_close(a[a.isfinite()], b[b.isfinite()], rtol=0, atol=1e-12)
            assert m_sep["loss/policy"] == pytest.approx(m_fused["loss/policy"], rel=0, abs=1e-12), name
            assert m_sep.get("lpreg/selected") == m_fused.get("lpreg/selected"), name
            if name != "grpo":
                assert m_sep["lpreg/selected"] > 0
            for n in g_sep:
                torch.testing.assert_close(g_sep[n], g_fused[n], rtol=0, atol=1e-12)
        # GRPO with the sampled-token metrics on: Lp-Reg's proxy (same kappa), GRPO's gradients.
        for fused in (False, True):
            support, lp_reg, grpo = out["grpo_support", fused][0], out["lp_reg", fused][0], out["grpo", fused]
            for field in ("proxy_logprobs", "kept_mass"):
                assert torch.equal(getattr(support, field), getattr(lp_reg, field)), (fused, field)
            for n, g in out["grpo_support", fused][1].items():
                assert torch.equal(g, grpo[1][n]), (fused, n)


def _response_only_logits(ctx, directory):
    """The log-prob pass (response positions through the head) against full logits at every position."""
    from megatron_lpreg.loss import LpRegConfig, vocab_parallel_logprobs
    from megatron_lpreg.model.build import model_logits
    from megatron_lpreg.policy.batching import microbatch
    from megatron_lpreg.policy.passes import recompute_logprobs

    spec, pc = load_policy(ctx, directory, dtype="float64")
    batch = random_rollouts(spec.vocab_size, n=6, seed=7)
    scores = recompute_logprobs(pc, batch, LpRegConfig())
    mb = microbatch(batch, list(range(len(batch))), pad_id=0)
    with torch.no_grad():
        full = vocab_parallel_logprobs(model_logits(pc.model, mb.tokens), mb.targets, group=pc.tp_group,
                                       vocab_size=spec.vocab_size)
    return scores.old_logprobs, full.reshape(-1)[mb.response_index]


@pytest.mark.parametrize("tp", [1, 2])
def test_response_positions_only_give_the_full_logits_numbers(tmp_path, tp):
    directory = save_tiny_model("qwen2", tmp_path / "qwen2")
    for ours, full in run_distributed(_response_only_logits, world_size=tp, tp_size=tp, args=(str(directory),)):
        torch.testing.assert_close(ours, full, rtol=0, atol=1e-12)


def _proxy_sources(ctx, directory):
    import megatron_lpreg.policy.passes as policy
    from megatron_lpreg.policy.optimizer import PolicyOptimizer
    from megatron_lpreg.loss import LpRegConfig

    losses, proxies, marks = {}, {}, []
    real_loss = policy.lp_reg_policy_loss_tensors
    for source in ("old", "current"):
        spec, pc = load_policy(ctx, directory)
        batch = random_rollouts(spec.vocab_size)
        # rho = 0.5 selects many tokens, so the proxy shapes the loss; lr moves the policy visibly.
        cfg = LpRegConfig(rho=0.5, min_selected=1, proxy_source=source)
        scores = policy.recompute_logprobs(pc, batch, cfg)
        batch.set(old_logprobs=scores.old_logprobs, proxy_logprobs=scores.proxy_logprobs)
        seen = losses[source] = []
        used = proxies[source] = []

        def record(lp, old, proxy, adv, mask, *args, **kwargs):
            loss, m = real_loss(lp, old, proxy, adv, mask, *args, **kwargs)
            seen.append(float(loss))
            used.append(proxy[mask].clone())
            return loss, m

        policy.lp_reg_policy_loss_tensors = record
        try:
            optimizer = PolicyOptimizer(pc.model, lr=1e-2, tp_group=pc.tp_group)
            step = optimizer.step
            optimizer.step = lambda: (marks.append(len(seen)), step())[1]
            policy.train(pc, batch, cfg, optimizer, num_minibatches=2, epochs=1)
        finally:
            policy.lp_reg_policy_loss_tensors = real_loss
    return losses, proxies, marks


def test_proxy_source_current_matches_old_on_policy_then_differs(tmp_path):
    directory = save_tiny_model("qwen2", tmp_path / "qwen2")
    for losses, proxies, marks in run_distributed(_proxy_sources, world_size=2, tp_size=2, args=(str(directory),)):
        old, cur = losses["old"], losses["current"]
        # Micro-batches per mini-batch, at each optimiser step: the same for both sources.
        first, total = marks[:2]
        assert marks[2:] == [first, total] and total == len(old) == len(cur)
        # First mini-batch: pi_theta == pi_old, so the proxy recomputed from the current logits is the
        # stored one (up to float32 rounding) and so is the loss.
        for a, b in zip(proxies["old"][:first], proxies["current"][:first]):
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            torch.testing.assert_close(a[a.isfinite()], b[b.isfinite()], rtol=1e-5, atol=1e-5)
        for a, b in zip(old[:first], cur[:first]):
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
        # Second: the policy has moved, the current proxy with it.
        assert any(not torch.equal(a, b) for a, b in zip(proxies["old"][first:], proxies["current"][first:]))
        assert max(abs(a - b) for a, b in zip(old[first:], cur[first:])) > 1e-4
