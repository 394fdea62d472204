"""Model checkpoints: written at TP=2, loaded at TP=1 and back, logits unchanged; atomic writes."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.model.tiny_models import FAMILIES, hf_state_dict, saved_families_with_logits, tiny_hf_model

BATCH, SEQ = 2, 9


def _logits(ctx, model, input_ids):
    import torch.distributed as dist

    from megatron_lpreg.model import model_logits

    with torch.no_grad():
        local = model_logits(model.eval(), input_ids)
    parts = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)


def _body(ctx, hf_dirs: dict, source: str, target: str, input_ids):
    """Load each family from ``source`` (a checkpoint dir, or None = the HF weights), save it to
    ``target``; return full logits (padding columns included) and, at TP=1, the HF tensors."""
    from megatron_lpreg import checkpointing
    from megatron_lpreg.megatron_layout import megatron_args
    from megatron_lpreg.model import build_gpt_model, padded_vocab_size, parse_hf_config
    from megatron_lpreg.weights import find_param, hf_to_megatron_shard, to_hf
    from megatron_lpreg.weights.hf_files import HFCheckpoint

    out = {}
    for family, hf_dir in hf_dirs.items():
        spec = parse_hf_config(hf_dir)
        model = build_gpt_model(spec)
        if source is None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, shard in hf_to_megatron_shard(spec, HFCheckpoint(hf_dir), ctx.tp_rank, ctx.tp_size):
                    params[name].copy_(shard)
        else:
            meta = checkpointing.load_model(model, f"{source}/{family}")
            assert meta["vocab_size"] == spec.vocab_size
        args = megatron_args(spec, tp_size=ctx.tp_size, dtype=torch.float32, iteration=0,
                             padded_vocab_size=padded_vocab_size(spec.vocab_size, ctx.tp_size))
        checkpointing.save_model(model, f"{target}/{family}", {"vocab_size": spec.vocab_size}, args=args,
                                 hf_source=hf_dir)
        logits = _logits(ctx, model, input_ids)
        hf = None
        if ctx.tp_size == 1:
            hf = {n: t for name, p in model.named_parameters()
                  for n, t in to_hf(spec, find_param(spec, name), [p.detach()])}
        out[family] = (logits, hf)
    return out if ctx.rank == 0 else None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_models")
    return (root, *saved_families_with_logits(root, BATCH, SEQ, seed=1))


def test_tp2_checkpoint_loads_at_tp1_and_back(models):
    root, dirs, input_ids, reference = models
    tp2 = run_distributed(_body, 2, 2, args=(dirs, None, str(root / "ck_tp2"), input_ids))[0]
    tp1 = run_distributed(_body, 1, 1, args=(dirs, str(root / "ck_tp2"), str(root / "ck_tp1"), input_ids))[0]
    again = run_distributed(_body, 2, 2, args=(dirs, str(root / "ck_tp1"), str(root / "ck_tp2b"), input_ids))[0]
    for i, family in enumerate(FAMILIES):
        a, b, c = tp2[family][0], tp1[family][0], again[family][0]
        # TP=2 pads the vocab to 256, TP=1 to 128: padding logits are exactly zero in all three.
        assert a.shape[-1] == 256 and b.shape[-1] == 128 and c.shape[-1] == 256
        assert not a[..., 101:].any() and not b[..., 101:].any() and not c[..., 101:].any(), family
        assert torch.equal(a, c), family  # same TP, same weights: bitwise the same logits
        assert (b[..., :101] - a[..., :101]).abs().max() < 1e-5, family
        assert (b[..., :101] - reference[family]).abs().max() < 1e-5, family
        original = hf_state_dict(tiny_hf_model(family, seed=i))
        weights = tp1[family][1]
        assert sorted(weights) == sorted(original)
        assert all(torch.equal(weights[n], original[n]) for n in original), family


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path):
    from megatron_lpreg import checkpointing

    final = tmp_path / "step_10"
    with pytest.raises(RuntimeError, match="disk full"):
        with checkpointing.staged_directory(final) as partial:
            (partial / "model").mkdir()
            raise RuntimeError("disk full")
    assert not final.exists() and not checkpointing.is_complete(final)
    with pytest.raises(checkpointing.CheckpointError, match="lpreg_checkpoint.json"):
        checkpointing.read_metadata(partial)
    # The next save cleans the leftover and completes.
    with checkpointing.staged_directory(final) as partial2:
        assert not (partial2 / "model").exists()
        checkpointing.write_metadata(partial2, {"vocab_size": 7})
    assert checkpointing.read_metadata(final)["vocab_size"] == 7
    with pytest.raises(checkpointing.CheckpointError, match="not empty"):
        with checkpointing.staged_directory(final):
            pass
    with checkpointing.staged_directory(final, overwrite=True) as partial3:
        checkpointing.write_metadata(partial3, {"vocab_size": 8})
    assert checkpointing.read_metadata(final)["vocab_size"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10"]
