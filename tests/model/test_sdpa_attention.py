"""The local spec's SDPA core attention gives megatron's unfused attention's numbers.

float64 Qwen2 (GQA, QKV bias) and Llama (tied embeddings, head_dim != hidden / heads) at TP=1 and
TP=2, causal (no mask: SDPA's is_causal; and the explicit causal mask) and packed (block-diagonal
causal) attention: logits and every parameter's gradient must agree with the unfused path to
float64 rounding. The two attentions only differ in op order, so ~1e-12 is a real bound.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

B, S = 3, 10
TOLERANCE = 1e-12


def _causal_mask():
    return torch.ones(S, S, dtype=torch.bool).triu(1).view(1, 1, S, S)


def _packed_mask():
    """Row 0: three sequences (lengths 3, 4, 3) packed; row 1: two (6, 4); row 2 causal. True = masked."""
    segments = torch.tensor([[0] * 3 + [1] * 4 + [2] * 3, [0] * 6 + [1] * 4, [0] * S])
    mask = (segments.unsqueeze(2) != segments.unsqueeze(1)) | torch.ones(S, S, dtype=torch.bool).triu(1)
    return mask.unsqueeze(1)


def _body(ctx, dirs):
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.model.build import build_gpt_model, model_logits
    from megatron_lpreg.model.sdpa_attention import SDPADotProductAttention, needs_explicit_causal_mask
    from megatron_lpreg.weights import load_hf_weights

    out = {}
    for family, directory in dirs.items():
        spec = parse_hf_config(directory)
        models = {}
        for attention in ("sdpa", "unfused"):
            model = build_gpt_model(spec, torch.float64, use_te=False, local_attention=attention).train()
            load_hf_weights(model, spec, directory, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
            models[attention] = model
        kinds = {a: {type(m.self_attention.core_attention).__name__ for m in models[a].decoder.layers}
                 for a in models}
        out[(family, "modules")] = (kinds["sdpa"] == {SDPADotProductAttention.__name__},
                                    kinds["unfused"] == {"DotProductAttention"},
                                    not needs_explicit_causal_mask(models["sdpa"]),
                                    needs_explicit_causal_mask(models["unfused"]))
        ids = torch.randint(0, spec.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
        for attn, mask in (("causal", None), ("causal-explicit", _causal_mask()), ("packed", _packed_mask())):
            values, grads = {}, {}
            for attention, model in models.items():
                model.zero_grad(set_to_none=True)
                logits = model_logits(model, ids, mask)
                w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=logits.dtype)
                (logits * w).sum().backward()
                values[attention] = logits.detach()
                grads[attention] = {n: p.grad.clone() for n, p in model.named_parameters()}
            ref, got = values["unfused"], values["sdpa"]
            out[(family, attn)] = (
                (got - ref).abs().max().item(),
                ref.abs().max().item(),
                max((grads["sdpa"][n] - grads["unfused"][n]).abs().max().item() for n in grads["unfused"]),
                sorted(grads["sdpa"]) == sorted(grads["unfused"]),
            )
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_matches_unfused_attention(model_dirs, tp):
    per_rank = run_distributed(_body, world_size=tp, tp_size=tp, args=(model_dirs,))
    for rank, rank_out in enumerate(per_rank):
        for key, value in rank_out.items():
            if key[1] == "modules":
                assert all(value), (rank, key, value)
                continue
            diff, scale, grad_diff, same_params = value
            print(f"TP={tp} rank {rank} {key}: |logits diff| {diff:.1e} (|logits| {scale:.1f}), "
                  f"|grad diff| {grad_diff:.1e}")
            # O(1) logits, so the comparison means something (rank 1's TP=2 vocab shard is all
            # padding rows, exactly 0 on both paths).
            assert scale > 1.0 or rank > 0, key
            assert same_params and diff < TOLERANCE and grad_diff < TOLERANCE, (rank, key, diff, grad_diff)


def test_unknown_local_attention_is_refused(model_dirs):
    assert run_distributed(_refused_body, world_size=1, tp_size=1, args=(model_dirs["qwen2"],))[0]


def _refused_body(ctx, directory):
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.model.build import ModelBuildError, build_gpt_model

    try:
        build_gpt_model(parse_hf_config(directory), torch.float64, use_te=False, local_attention="flash")
    except ModelBuildError:
        return True
    return False
