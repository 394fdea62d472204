"""Micro-batch weighting of ``passes.train`` against a float64 whole-mini-batch reference.

Sequences dropped from the loss (``reward.mask_truncated``, ``mismatch.mask_seq_abs_diff``: a False
``RolloutBatch.trainable``) must count nowhere: under ``seq_mean_token_mean`` the accumulated
gradient of several micro-batches is that of one mean over the mini-batch's surviving sequences.
The reference runs each sequence alone through the model, gathers the full vocabulary and writes
the clipped surrogate and both means out plainly.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.model.tiny_models import save_tiny_model
from tests.policy.test_passes import CaptureGrads, load_policy, random_rollouts

DROPPED = (1, 4, 5)


def _reference_loss(pc, spec, batch, cfg):
    """The whole mini-batch's loss, float64, one sequence at a time (differentiable)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lpreg.model.build import model_logits

    per_seq, tokens_total, token_sum = [], 0, 0.0
    for i in range(len(batch)):
        if not bool(batch.trainable[i]) or batch.response_lens[i] == 0:
            continue
        start, p, r = batch.seq_starts[i], batch.prompt_lens[i], batch.response_lens[i]
        ids = batch.tokens[start:start + p + r]
        logits = model_logits(pc.model, ids[None])[0]
        if pc.tp_group is not None:
            logits = gather_from_tensor_model_parallel_region(logits)
        logp = torch.log_softmax(logits[:, :spec.vocab_size].double(), dim=-1)
        lp = logp[p - 1:p - 1 + r].gather(-1, ids[p:, None])[:, 0]
        old = batch.old_logprobs[batch.response_starts[i]:batch.response_starts[i] + r].double()
        ratio = torch.exp(lp - old)
        adv = float(batch.advantages[i])
        token_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high))
        per_seq.append(token_loss.mean())
        tokens_total += r
        token_sum = token_sum + token_loss.sum()
    if cfg.loss_agg == "seq_mean_token_mean":
        return torch.stack(per_seq).mean()
    return token_sum / tokens_total  # global_token_mean: the mini-batch's token mean


def _weighting(ctx, directory, loss_agg):
    from megatron_lpreg.loss import LpRegConfig
    from megatron_lpreg.policy.passes import microbatches, recompute_logprobs, train

    spec, pc = load_policy(ctx, directory, dtype="float64")
    cfg = LpRegConfig(enabled=False, eps_low=0.2, eps_high=0.28, loss_agg=loss_agg)
    batch = random_rollouts(spec.vocab_size, n=8, seed=11)
    batch.trainable = torch.tensor([i not in DROPPED for i in range(len(batch))])
    old = recompute_logprobs(pc, batch, cfg).old_logprobs
    # Off-policy old log-probs, so some ratios leave the clip range and the max picks both branches.
    g = torch.Generator().manual_seed(2)
    batch.set(old_logprobs=old + 0.3 * torch.randn(old.shape, generator=g, dtype=old.dtype))

    pc.micro_batch_tokens = 40  # several micro-batches, each with a different share of dropped rows
    opt = CaptureGrads(pc.model)
    result = train(pc, batch, cfg, opt, num_minibatches=1, epochs=1)
    n_microbatches = sum(1 for _ in microbatches(pc, batch, list(range(len(batch)))))
    kept_tokens = sum(n for i, n in enumerate(batch.response_lens) if i not in DROPPED)

    pc.model.zero_grad(set_to_none=True)
    ref = _reference_loss(pc, spec, batch, cfg)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in pc.model.named_parameters()}
    return result.metrics.reduce(None), float(ref.detach()), opt.grads[0], ref_grads, n_microbatches, kept_tokens


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "global_token_mean"])
def test_microbatch_weights_give_the_whole_minibatch_loss_and_gradient(tmp_path, tp, loss_agg):
    directory = save_tiny_model("qwen2", tmp_path / "qwen2")
    for metrics, ref, grads, ref_grads, n_mb, kept_tokens in run_distributed(
            _weighting, world_size=tp, tp_size=tp, args=(str(directory), loss_agg)):
        assert n_mb >= 3  # the weighting is exercised, not one micro-batch holding everything
        assert metrics["loss/tokens"] == kept_tokens
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
        if loss_agg == "seq_mean_token_mean":
            assert metrics["loss/policy"] == pytest.approx(ref, rel=0, abs=1e-12)


def _weighting_dp(ctx, directory):
    """DP=2: each rank trains its half (different numbers dropped); the DP-averaged gradient must be
    the whole mini-batch's, as the optimiser averages over DP."""
    from megatron_lpreg.loss import LpRegConfig
    from megatron_lpreg.policy.batching import RolloutBatch
    from megatron_lpreg.policy.passes import recompute_logprobs, train

    spec, pc = load_policy(ctx, directory, dtype="float64")
    pc.dp_group, pc.dp_size, pc.micro_batch_tokens = ctx.dp, ctx.dp_size, 40
    cfg = LpRegConfig(enabled=False, eps_low=0.2, eps_high=0.28, loss_agg="seq_mean_token_mean")
    whole = random_rollouts(spec.vocab_size, n=8, seed=11)
    whole.trainable = torch.tensor([i not in DROPPED for i in range(len(whole))])  # 1 of 4 here, 2 there
    whole.set(old_logprobs=recompute_logprobs(pc, whole, cfg).old_logprobs)
    mine = list(range(ctx.dp_rank * 4, ctx.dp_rank * 4 + 4))
    seqs = [whole.tokens[whole.seq_starts[i]:whole.seq_starts[i] + whole.lengths[i]].tolist() for i in mine]
    part = RolloutBatch.from_sequences(seqs, [whole.prompt_lens[i] for i in mine], whole.advantages[mine],
                                       trainable=whole.trainable[mine])
    part.set(old_logprobs=torch.cat(whole.responses(whole.old_logprobs, mine)))  # float64, as the reference's
    opt = CaptureGrads(pc.model)
    result = train(pc, part, cfg, opt, num_minibatches=1, epochs=1)
    grads = opt.grads[0]
    for g in grads.values():
        torch.distributed.all_reduce(g, group=ctx.dp)
        g /= ctx.dp_size
    ref = _reference_loss(pc, spec, whole, cfg)
    ref.backward()
    return result.metrics.reduce(ctx.dp), float(ref.detach()), grads, {n: p.grad for n, p in pc.model.named_parameters()}


def test_microbatch_weights_over_data_parallel_ranks(tmp_path):
    directory = save_tiny_model("qwen2", tmp_path / "qwen2")
    for metrics, ref, grads, ref_grads in run_distributed(_weighting_dp, world_size=2, tp_size=1,
                                                          args=(str(directory),)):
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12,
                                       msg=lambda m, name=name: f"{name}: {m}")
        assert metrics["loss/policy"] == pytest.approx(ref, rel=0, abs=1e-12)
