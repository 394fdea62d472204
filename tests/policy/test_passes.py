"""The log-prob and training passes of policy/passes.py on a tiny Qwen2 at TP=2 (2 gloo ranks)."""

from __future__ import annotations

import math

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


def load_policy(ctx, directory):
    from megatron_lpreg.config import ModelConfig
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.policy import setup
    from megatron_lpreg.policy.passes import PolicyContext

    spec = parse_hf_config(directory)
    model = setup.load_policy(ModelConfig(path=str(directory), dtype="float32", use_te=False), spec,
                              tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
    pc = PolicyContext(model=model, vocab_size=spec.vocab_size, pad_id=0, device=ctx.device, tp_group=ctx.tp,
                       dp_group=None, dp_size=1, micro_batch_tokens=64)
    return spec, pc


def _proxy_sources(ctx, directory):
    import megatron_lpreg.policy.passes as policy
    from megatron_lpreg.policy.optimizer import PolicyOptimizer
    from megatron_lpreg.loss import LpRegConfig

    losses, proxies, marks = {}, {}, []
    real_loss = policy.lp_reg_policy_loss
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

        policy.lp_reg_policy_loss = record
        try:
            optimizer = PolicyOptimizer(pc.model, lr=1e-2, tp_group=pc.tp_group)
            step = optimizer.step
            optimizer.step = lambda: (marks.append(len(seen)), step())[1]
            policy.train(pc, batch, cfg, optimizer, num_minibatches=2, epochs=1)
        finally:
            policy.lp_reg_policy_loss = real_loss
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
