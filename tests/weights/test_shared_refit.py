"""Shared-memory refit: each TP rank places its own shards in the engine's weights (no gather)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.model.tiny_models import FAMILIES, save_tiny_model, tiny_hf_model
from tests.rollout.test_hf_engine_refit import SEQUENCES, _megatron_logprobs, _tp_model_and_engine


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_placing_every_ranks_shard_rebuilds_the_hf_tensors(family, tp):
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.weights import model_params, to_megatron_shard
    from megatron_lpreg.weights.table import place_shard

    hf = tiny_hf_model(family, seed=3)
    spec = parse_hf_config(hf.config.to_dict())
    full = {n: p.detach() for n, p in hf.named_parameters()}
    rebuilt = {n: torch.full_like(t, float("nan")) for n, t in full.items()}
    for param in model_params(spec):
        for rank in range(tp):
            shard = to_megatron_shard(spec, param, full, rank, tp)
            place_shard(spec, param, shard, [rebuilt[h] for h in param.hf], rank, tp)
    for name, t in full.items():
        assert torch.equal(rebuilt[name], t), name  # NaN anywhere = a hole nobody wrote


def test_place_shard_rejects_a_wrong_shape():
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.weights import WeightTableError, find_param
    from megatron_lpreg.weights.table import place_shard

    hf = tiny_hf_model("qwen2")
    spec = parse_hf_config(hf.config.to_dict())
    param = find_param(spec, "decoder.layers.0.mlp.linear_fc2.weight")
    full = [hf.model.layers[0].mlp.down_proj.weight.detach().clone()]
    with pytest.raises(WeightTableError, match="linear_fc2.*TP rank 1/2 has shape"):
        place_shard(spec, param, torch.zeros(3, 3), full, 1, 2)


def _body(ctx, dirs: dict):
    from megatron_lpreg.weights.hf_files import HFCheckpoint
    from megatron_lpreg.weights.stream import RefitStats, stream_hf_weights
    from megatron_lpreg.weights.shared_refit import SharedWeights, SharedWeightsError

    out = {}
    for family, directory in dirs.items():
        spec, model, engine = _tp_model_and_engine(ctx, directory)
        shared = SharedWeights.attach(engine.model if engine else None, group=ctx.tp_group)
        assert shared is not None
        torch.distributed.barrier()
        res = {"leftovers": [shared.path] if os.path.exists(shared.path) else []}
        stats = RefitStats()
        shared.refit(model, spec, engine_model=engine.model if engine else None, stats=stats)
        if engine is not None:
            engine.mark_loaded()
            checkpoint = HFCheckpoint(directory)
            res["exact"] = all(torch.equal(p, checkpoint[n]) for n, p in engine.model.named_parameters())
        res["scores0"] = (_megatron_logprobs(ctx, model, spec, SEQUENCES), engine.score(SEQUENCES) if engine else None)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # a "training step": replicated parameters stay equal across ranks
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        shared.refit(model, spec, engine_model=engine.model if engine else None, stats=stats)
        streamed = {}
        for bucket in stream_hf_weights(model, spec, tp_group=ctx.tp_group, dst_tp_rank=0):
            streamed.update((n, t.clone()) for n, t in bucket)
        if engine is not None:
            res["equal_to_stream"] = all(torch.equal(p, streamed[n]) for n, p in engine.model.named_parameters())
            res["tied"] = engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()
        res["scores1"] = (_megatron_logprobs(ctx, model, spec, SEQUENCES), engine.score(SEQUENCES) if engine else None)
        res["bytes"] = stats.bytes
        if engine is not None:
            engine.sleep(level=2)
            engine.update_weights(streamed.items())
            with pytest.raises(SharedWeightsError, match="no longer in the shared refit memory"):
                shared.check_engine(engine.model)
        out[family] = res
    return out


def _fallback_body(ctx):
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.rollout import HFEngine
    from megatron_lpreg.weights import shared_refit
    from tests.model.tiny_models import tiny_hf_config

    engine = HFEngine.from_config(tiny_hf_config("qwen2")) if ctx.tp_rank == 0 else None
    before = {n: p.data_ptr() for n, p in engine.model.named_parameters()} if engine else None
    if ctx.tp_rank == 1:  # as if rank 1 were on another machine
        shared_refit._map_existing = lambda *args: None
    made = []
    reserve = shared_refit._reserve
    shared_refit._reserve = lambda path, total: (made.append(path), reserve(path, total))
    shared = shared_refit.SharedWeights.attach(engine.model if engine else None, group=ctx.tp_group)
    untouched = before == {n: p.data_ptr() for n, p in engine.model.named_parameters()} if engine else None
    del parse_hf_config
    return shared is None, untouched, [p for p in made if os.path.exists(p)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_refit_models")
    return {f: str(save_tiny_model(f, root / f, seed=i)) for i, f in enumerate(FAMILIES)}


def test_shared_refit_from_tp2_shards_equals_the_streamed_refit(model_dirs):
    results = run_distributed(_body, 2, 2, args=(model_dirs,))
    for family in FAMILIES:
        res0, res1 = results[0][family], results[1][family]
        assert res0["exact"] and res0["equal_to_stream"], family
        assert res0["leftovers"] == [] and res1["leftovers"] == []  # unlinked once mapped
        if family == "llama":
            assert res0["tied"]  # the tied head still shares the embedding's (shared) memory
        for key in ("scores0", "scores1"):
            ours, theirs = res0[key]
            for a, b in zip(ours, theirs):
                assert a.shape == b.shape and (a - b).abs().max() < 1e-5, (family, key)
        # Both ranks wrote: rank 1 its halves of the split tensors, rank 0 those and the replicated ones.
        assert 0 < res1["bytes"] < res0["bytes"]


def test_attach_falls_back_when_a_rank_cannot_map_the_engine_memory():
    results = run_distributed(_fallback_body, 2, 2)
    for fell_back, _, leftovers in results:
        assert fell_back and leftovers == []
    assert results[0][1] is True  # the engine keeps its own weights


def test_attach_falls_back_when_shm_has_no_room(tmp_path, monkeypatch):
    """posix_fallocate fails up front (ENOSPC) instead of a SIGBUS at the first write."""
    import errno

    from megatron_lpreg.rollout import HFEngine
    from megatron_lpreg.weights import shared_refit
    from tests.model.tiny_models import tiny_hf_config

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    engine = HFEngine.from_config(tiny_hf_config("qwen2"))
    assert shared_refit.SharedWeights.attach(engine.model, shm_dir=str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    shared = shared_refit.SharedWeights.attach(engine.model, shm_dir=str(tmp_path))
    assert shared is not None and list(tmp_path.iterdir()) == []  # world of one: mapped, then unlinked
    assert all(p.data_ptr() == shared.views[n].data_ptr() for n, p in engine.model.named_parameters())
