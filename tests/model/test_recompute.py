"""Full activation recomputation changes memory, never numbers: same loss and gradients at TP=2."""

from __future__ import annotations

import torch

from tests.distributed import run_distributed
from tests.model.tiny_models import save_tiny_model


def _body(ctx, directory):
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.model.build import build_gpt_model, model_logits
    from megatron_lpreg.weights import load_hf_weights

    spec = parse_hf_config(directory)
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in ("none", "full"):
        model = build_gpt_model(spec, torch.float32, use_te=False, recompute=mode).train()
        load_hf_weights(model, spec, directory, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
        loss = model_logits(model, ids).float().square().mean()
        loss.backward()
        out[mode] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_a, grads_a), (loss_b, grads_b) = out["none"], out["full"]
    return loss_a - loss_b, max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)


def test_full_recompute_matches_no_recompute(tmp_path):
    directory = save_tiny_model("qwen3", tmp_path / "qwen3")
    for loss_diff, grad_diff in run_distributed(_body, world_size=2, tp_size=2, args=(str(directory),)):
        assert loss_diff == 0.0 and grad_diff == 0.0
