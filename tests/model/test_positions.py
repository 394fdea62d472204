"""model_logits(positions=...): only the wanted positions through the LM head, the same numbers.

float64 models (Qwen2: untied, QKV bias; Llama: tied embeddings) at TP=1 and TP=2, causal and
packed (block-diagonal) attention. The selected logits must equal the full logits at those
positions, and a loss on them must give every parameter the gradient the full path gives.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

B, S = 3, 10


def _packed_mask():
    """Row 0: two sequences (lengths 4 and 6) packed; other rows causal. True = masked."""
    mask = torch.ones(S, S, dtype=torch.bool).triu(1).repeat(B, 1, 1, 1).view(B, 1, S, S)
    mask[0, 0, 4:, :4] = True
    return mask


def _positions():
    want = torch.zeros(B, S, dtype=torch.bool)
    want[0, 2:4] = True  # first sequence's response (prompt ends at 1)
    want[0, 6:9] = True  # the packed second sequence
    want[1, 4:] = True
    want[2, 9] = True  # a single position
    return want


def _body(ctx, dirs):
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.model.build import build_gpt_model, model_logits
    from megatron_lpreg.weights import load_hf_weights

    out = {}
    for family, directory in dirs.items():
        spec = parse_hf_config(directory)
        model = build_gpt_model(spec, torch.float64, use_te=False).train()
        load_hf_weights(model, spec, directory, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
        ids = torch.randint(0, spec.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
        want = _positions()
        flat = want.reshape(-1).nonzero().squeeze(1)
        shuffled = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(2))]
        for attn in ("causal", "packed"):
            mask = _packed_mask() if attn == "packed" else None
            grads, values = {}, {}
            for mode in ("full", "flat", "bool", "shuffled"):
                model.zero_grad(set_to_none=True)
                if mode == "full":
                    logits = model_logits(model, ids, mask)
                    rows = logits.reshape(B * S, -1)[flat]
                else:
                    pos = {"flat": flat, "bool": want, "shuffled": shuffled}[mode]
                    rows = model_logits(model, ids, mask, positions=pos)
                    if mode == "shuffled":
                        rows = rows[torch.argsort(shuffled)]
                w = torch.randn(rows.shape, generator=torch.Generator().manual_seed(3), dtype=rows.dtype)
                (rows * w).sum().backward()
                values[mode] = rows.detach()
                grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
            for mode in ("flat", "bool", "shuffled"):
                out[(family, attn, mode)] = (
                    tuple(values[mode].shape),
                    (values[mode] - values["full"]).abs().max().item(),
                    torch.equal(values[mode], values["full"]),
                    max((grads[mode][n] - grads["full"][n]).abs().max().item() for n in grads["full"]),
                    sorted(grads["full"]) == sorted(grads[mode]),
                )
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_selected_positions_match_full_logits_and_gradients(model_dirs, tp):
    n = int(_positions().sum())
    per_rank = run_distributed(_body, world_size=tp, tp_size=tp, args=(model_dirs,))
    print(f"TP={tp} max |grad(positions) - grad(full)|: "
          f"{max(v[3] for r in per_rank for v in r.values()):.1e}")
    for rank_out in per_rank:
        for key, (shape, diff, equal, grad_diff, same_params) in rank_out.items():
            assert shape[0] == n, key
            # Logits: bit for bit (the same rows through the same matmul). Gradients: the weight
            # gradient sums over N rows instead of B * S rows with zeros, so only to rounding.
            assert equal and diff == 0.0, (key, diff)
            assert same_params and grad_diff < 1e-12, (key, grad_diff)


def test_default_path_is_unchanged_and_bad_positions_are_refused(model_dirs):
    out = run_distributed(_default_body, world_size=1, tp_size=1, args=(model_dirs["qwen2"],))[0]
    assert out == (True, True, True)


def _default_body(ctx, directory):
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.model.build import build_gpt_model, model_logits

    spec = parse_hf_config(directory)
    model = build_gpt_model(spec, torch.float64, use_te=False).eval()
    ids = torch.randint(0, spec.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model_logits(model, ids), model_logits(model, ids)
    no_hook_left = not model.output_layer._forward_pre_hooks
    refused = []
    for bad in (torch.zeros(B, S + 1, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.long)):
        try:
            model_logits(model, ids, positions=bad)
        except ValueError:
            refused.append(True)
    return a.shape == (B, S, a.shape[-1]) and torch.equal(a, b), no_hook_left, refused == [True, True]
