"""HF checkpoint -> weight table -> megatron-core GPTModel gives transformers' logits, TP=1 and TP=2.

One ``run_distributed`` call per TP size covers all three families (process start-up dominates).
Each rank loads the saved safetensors through ``weights.table``, runs ``model_logits`` and the
vocab shards are gathered over the TP group and compared with transformers' float32 logits.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.model.tiny_models import FAMILIES, load_safetensors_dir, saved_families_with_logits

TOLERANCE = 1e-5  # float32; observed ~2e-6 (different but equivalent op orders)
BATCH, SEQ = 2, 11


def _parity_body(ctx, model_dirs: dict, input_ids: torch.Tensor):
    import torch.distributed as dist

    from megatron_lpreg.model import build_gpt_model, model_logits, padded_vocab_size, parse_hf_config
    from megatron_lpreg.model.build import ModelBuildError
    from megatron_lpreg.weights import hf_to_megatron_shard, is_weight

    results = {}
    for family, directory in model_dirs.items():
        spec = parse_hf_config(directory)
        model = build_gpt_model(spec).eval()
        params = dict(model.named_parameters())
        weights = [n for n in model.state_dict() if is_weight(n)]
        shards = dict(hf_to_megatron_shard(spec, load_safetensors_dir(directory), ctx.tp_rank, ctx.tp_size))
        assert sorted(shards) == sorted(weights) == sorted(params), (family, set(shards) ^ set(weights))
        with torch.no_grad():
            for name, shard in shards.items():
                params[name].copy_(shard)
            local = model_logits(model, input_ids)
        padded = padded_vocab_size(spec.vocab_size, ctx.tp_size)
        assert local.shape == (BATCH, SEQ, padded // ctx.tp_size), local.shape
        parts = [torch.empty_like(local) for _ in range(ctx.tp_size)]
        dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
        full = torch.cat(parts, dim=-1)
        # Zero padding rows in the output layer give padding logits of exactly 0.
        assert not full[..., spec.vocab_size:].any(), family
        results[family] = full[..., :spec.vocab_size] if ctx.tp_rank == 0 else None
    try:
        build_gpt_model(spec, use_te=True)
    except ModelBuildError as e:
        results["use_te_error"] = str(e)
    return results


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """(model dirs, input ids, transformers' logits per family)."""
    return saved_families_with_logits(tmp_path_factory.mktemp("tiny_models"), BATCH, SEQ, seed=0)


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_match_transformers(hf_reference, tp):
    dirs, input_ids, reference = hf_reference
    results = run_distributed(_parity_body, world_size=tp, tp_size=tp, args=(dirs, input_ids))[0]
    assert "Transformer Engine" in results["use_te_error"]
    diffs = {f: (results[f] - reference[f]).abs().max().item() for f in FAMILIES}
    print(f"TP={tp} max |logits - transformers|: " + ", ".join(f"{f} {d:.2e}" for f, d in diffs.items()))
    assert all(d < TOLERANCE for d in diffs.values()), diffs
