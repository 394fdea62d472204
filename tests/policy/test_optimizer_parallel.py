"""PolicyOptimizer on gloo ranks, a tiny Qwen3: grad norm across TP shards, data-parallel
averaging, non-finite skips and sharded checkpoints resharded TP=2 -> TP=1. shard_over_dp (ZeRO-1):
the same steps as without it, 1/DP of the state, and checkpoints that load in either mode and
layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_lpreg.policy.optimizer import PolicyOptimizer
from tests.distributed import run_distributed
from tests.model.tiny_models import save_tiny_model
from tests.policy.test_optimizer import CLIP, _norm

FAMILY = "qwen3"  # q/k layernorms (more replicated params) and SwiGLU (a ShardedTensorFactory)
VOCAB = 101
LR, WD = 1e-3, 0.01
TIMEOUT_S = 120


def _batch(step: int, rank: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(100 * step + rank))


def _load_model(ctx, hf_dir: str, dtype=torch.float32):
    from megatron_lpreg.model import build_gpt_model, parse_hf_config
    from megatron_lpreg.weights import hf_to_megatron_shard
    from megatron_lpreg.weights.hf_files import HFCheckpoint

    spec = parse_hf_config(hf_dir)
    model = build_gpt_model(spec, dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shard in hf_to_megatron_shard(spec, HFCheckpoint(hf_dir), ctx.tp_rank, ctx.tp_size):
            params[name].copy_(shard)
    return spec, model


def _optimizer(ctx, model, **kw) -> PolicyOptimizer:
    kw = {"lr": LR, "weight_decay": WD, "clip_grad": CLIP, **kw}
    return PolicyOptimizer(model, dp_group=ctx.dp_group, tp_group=ctx.tp_group, **kw)


def _backward(ctx, model, input_ids) -> None:
    from megatron_lpreg.loss import vocab_parallel_logprobs
    from megatron_lpreg.model import model_logits

    logits = model_logits(model, input_ids)[:, :-1]
    logp = vocab_parallel_logprobs(logits, input_ids[:, 1:], group=ctx.tp_group, vocab_size=VOCAB)
    (-logp.mean()).backward()


def _full(ctx, spec, tensors: dict) -> dict:
    """Megatron name -> this rank's shard, gathered over TP into full HF tensors by HF name."""
    import torch.distributed as dist

    from megatron_lpreg.weights import find_param, to_hf

    out = {}
    for name, t in tensors.items():
        shards = [torch.empty_like(t) for _ in range(ctx.tp_size)]
        dist.all_gather(shards, t.detach().contiguous(), group=ctx.tp_group)
        out.update(to_hf(spec, find_param(spec, name), shards))
    return out


def _full_state(ctx, spec, model, opt) -> dict:
    names = [n for n, _ in model.named_parameters()]
    return {kind: _full(ctx, spec, {n: opt.param_state(n)[kind] for n in names})
            for kind in opt.param_state(names[0])}


def _snapshot(model, opt) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for n, _ in model.named_parameters():
        tensors += [t.detach().clone() for t in opt.param_state(n).values()]
    return tensors + [torch.tensor(float(opt.scalar_state()["step"]))]


def _unchanged(before, model, opt) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt), strict=True))


def _replicas_agree(ctx, model) -> dict[str, bool]:
    """Whether each replicated (not TP-sharded) parameter is the same on every TP rank."""
    import torch.distributed as dist

    out = {}
    for name, p in model.named_parameters():
        if not getattr(p, "tensor_model_parallel", False):
            copies = [torch.empty_like(p) for _ in range(ctx.tp_size)]
            dist.all_gather(copies, p.detach(), group=ctx.tp_group)
            out[name] = all(torch.equal(c, copies[0]) for c in copies)
    return out


def _save(ctx, model, opt, directory: str, with_model: bool = True) -> None:
    """The model (unless not ``with_model``) and the optimizer next to it, as a training checkpoint
    holds them."""
    import torch.distributed as dist

    from megatron_lpreg.megatron_layout import save_whole
    from megatron_lpreg.policy.training_checkpoint import save_optimizer

    if with_model:
        save_whole(model, Path(directory), 0, None)
    save_optimizer(model, opt, Path(directory) / "optimizer")
    if ctx.rank == 0:
        (Path(directory) / "optimizer.json").write_text(json.dumps(opt.scalar_state()))
    dist.barrier()


def _load(model, opt, directory: str, with_model: bool = True) -> None:
    from megatron_lpreg import megatron_layout
    from megatron_lpreg.policy.training_checkpoint import load_optimizer

    if with_model:
        iter_dir = megatron_layout.find_iteration_dir(Path(directory) / "iter_0000000")
        megatron_layout.load_into(model, megatron_layout.weights_only(model.sharded_state_dict()), iter_dir, "model")
    load_optimizer(model, opt, Path(directory) / "optimizer")
    opt.load_scalar_state(json.loads((Path(directory) / "optimizer.json").read_text()))


def _tp2_part(ctx, hf_dir: str, ckpt: str):
    spec, model = _load_model(ctx, hf_dir)
    opt = _optimizer(ctx, model)
    params = dict(model.named_parameters())
    out = {}
    _backward(ctx, model, _batch(1))
    out["norm1"] = opt.step().grad_norm

    # A bad gradient on one TP rank only, in a replicated (counted-once) and in a sharded param.
    out["nonfinite"] = []
    for name, rank, value in (("decoder.layers.0.input_layernorm.weight", 1, math.inf),
                              ("decoder.layers.1.mlp.linear_fc2.weight", 0, math.nan)):
        _backward(ctx, model, _batch(2))
        before = _snapshot(model, opt)
        if ctx.tp_rank == rank:
            params[name].grad.view(-1)[3] = value
        result = opt.step()
        out["nonfinite"].append((result.stepped, math.isfinite(result.grad_norm),
                                 _unchanged(before, model, opt), all(p.grad is None for p in params.values())))

    _backward(ctx, model, _batch(2))
    out["stepped2"] = opt.step().stepped
    _save(ctx, model, opt, f"{ckpt}/fp32")
    out["state"] = _full_state(ctx, spec, model, opt)
    _backward(ctx, model, _batch(3))
    out["stepped3"] = opt.step().stepped
    out["params3"] = _full(ctx, spec, params)
    out["replicas_agree"] = _replicas_agree(ctx, model)

    # bf16: the fp32 masters are checkpointed too.
    spec, model = _load_model(ctx, hf_dir, torch.bfloat16)
    opt = _optimizer(ctx, model)
    _backward(ctx, model, _batch(1))
    opt.step()
    _save(ctx, model, opt, f"{ckpt}/bf16", with_model=False)
    out["bf16_state"] = _full_state(ctx, spec, model, opt)
    return out


def _tp1_part(ctx, hf_dir: str, ckpt: str):
    """TP=1 (the same data on every DP rank, so averaging changes nothing): the reference norm,
    and resuming the TP=2 run from its checkpoint."""
    spec, model = _load_model(ctx, hf_dir)
    opt = _optimizer(ctx, model)
    out = {}
    _backward(ctx, model, _batch(1))
    out["norm1_float64"] = _norm(p.grad for p in model.parameters())
    out["norm1"] = opt.step().grad_norm

    from megatron_lpreg.model import build_gpt_model

    model = build_gpt_model(spec)  # freshly initialised: everything comes from the checkpoint
    opt = _optimizer(ctx, model)
    _load(model, opt, f"{ckpt}/fp32")
    out["state"] = _full_state(ctx, spec, model, opt)
    _backward(ctx, model, _batch(3))
    out["stepped3"] = opt.step().stepped
    out["params3"] = _full(ctx, spec, dict(model.named_parameters()))

    model = build_gpt_model(spec, torch.bfloat16)
    opt = _optimizer(ctx, model)
    _load(model, opt, f"{ckpt}/bf16", with_model=False)
    out["bf16_state"] = _full_state(ctx, spec, model, opt)
    return out


def _dp_part(ctx, hf_dir: str):
    """Different data on each DP rank: one step on the mean gradient, identical params."""
    import torch.distributed as dist

    _, model = _load_model(ctx, hf_dir)
    params = list(model.parameters())
    # Buckets smaller than the embedding: some hold one tensor, some several.
    opt = _optimizer(ctx, model, clip_grad=None, bucket_numel=5000)
    ref = [p.detach().clone().requires_grad_() for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=LR, weight_decay=WD)
    out = {"norms": []}
    for step in (1, 2):
        _backward(ctx, model, _batch(step, rank=ctx.dp_rank))
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        both = [torch.empty_like(flat) for _ in range(ctx.dp_size)]
        dist.all_gather(both, flat, group=ctx.dp_group)
        assert not torch.equal(both[0], both[1])
        mean = (both[0] + both[1]) / 2
        offset = 0
        for r in ref:
            r.grad = mean[offset:offset + r.numel()].view_as(r).clone()
            offset += r.numel()
        ref_opt.step()
        out["norms"].append((opt.step().grad_norm, _norm([mean])))
    out["diff_to_reference"] = max((p - r).abs().max().item() for p, r in zip(params, ref))
    out["params"] = torch.cat([p.detach().reshape(-1) for p in params])

    _backward(ctx, model, _batch(3, rank=ctx.dp_rank))
    before = _snapshot(model, opt)
    if ctx.dp_rank == 1:
        params[2].grad.view(-1)[0] = math.inf
    out["nonfinite"] = (opt.step().stepped, _unchanged(before, model, opt))
    return out


def _state_numel(opt) -> int:
    """Elements of this rank's optimizer tensors: fp32 masters that are not the params, moments."""
    params = {id(p) for p in opt.params}
    masters = sum(m.numel() for m in opt.masters if id(m) not in params)
    return masters + sum(t.numel() for st in opt.optimizer.state.values() for k, t in st.items() if k != "step")


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _shard_part(ctx, hf_dir: str, ckpt: str):
    """TP=1 x DP=2, different data per rank: shard_over_dp against the unsharded optimizer; its
    non-finite skips; its checkpoints saved, and the TP=2 unsharded ones loaded."""
    from megatron_lpreg.model import build_gpt_model

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        key = str(dtype).removeprefix("torch.")
        spec, model = _load_model(ctx, hf_dir, dtype)
        _, twin = _load_model(ctx, hf_dir, dtype)
        opt, sharded = _optimizer(ctx, model), _optimizer(ctx, twin, shard_over_dp=True)
        res = {"norms": []}
        for step in (1, 2):  # clipped steps: the norm is above CLIP
            # The same backward on both (bf16 gradients go to each optimizer's fp32 buffer).
            _backward(ctx, model, _batch(step, rank=ctx.dp_rank))
            _backward(ctx, twin, _batch(step, rank=ctx.dp_rank))
            res["norms"].append((opt.step().grad_norm, sharded.step().grad_norm))
        pairs = list(zip(model.parameters(), twin.parameters()))
        res["param_diff"] = max((p.float() - q.float()).abs().max().item() for p, q in pairs)
        res["params_equal"] = all(torch.equal(p, q) for p, q in pairs)
        res["state_diff"] = max(_max_diff(opt.param_state(n), sharded.param_state(n))
                                for n, _ in model.named_parameters())
        res["numel"] = (_state_numel(opt), _state_numel(sharded))
        res["params"] = torch.cat([q.detach().float().reshape(-1) for q in twin.parameters()])
        _save(ctx, twin, sharded, f"{ckpt}/shard_{key}", with_model=dtype == torch.float32)
        res["state"] = _full_state(ctx, spec, twin, sharded)
        out[key] = res

    # A bad gradient on one rank, landing in the other rank's slice or its own.
    params = list(twin.parameters())
    out["nonfinite"] = []
    for index, rank, value in ((0, 1, math.inf), (-1, 0, math.nan)):
        _backward(ctx, twin, _batch(3, rank=ctx.dp_rank))
        before = _snapshot(twin, sharded)
        if ctx.dp_rank == rank:
            sharded.grads()[index].view(-1)[-1] = value
        result = sharded.step()
        out["nonfinite"].append((result.stepped, math.isfinite(result.grad_norm),
                                 _unchanged(before, twin, sharded), all(p.grad is None for p in params)))

    # The unsharded TP=2 checkpoints, loaded sharded over DP=2; one more step on the TP=2 run's data.
    model = build_gpt_model(spec)
    opt = _optimizer(ctx, model, shard_over_dp=True)
    _load(model, opt, f"{ckpt}/fp32")
    out["from_tp2"] = {"state": _full_state(ctx, spec, model, opt)}
    _backward(ctx, model, _batch(3))
    out["from_tp2"]["stepped3"] = opt.step().stepped
    out["from_tp2"]["params3"] = _full(ctx, spec, dict(model.named_parameters()))
    model = build_gpt_model(spec, torch.bfloat16)
    opt = _optimizer(ctx, model, shard_over_dp=True)
    _load(model, opt, f"{ckpt}/bf16", with_model=False)
    out["from_tp2"]["bf16_state"] = _full_state(ctx, spec, model, opt)
    return out


def _shard_tp2_part(ctx, hf_dir: str, ckpt: str):
    """TP=2 (DP=1): the DP=2 sharded checkpoints loaded unsharded; the sharded norm at TP=2."""
    from megatron_lpreg.model import build_gpt_model

    spec, model = _load_model(ctx, hf_dir)
    opt = _optimizer(ctx, model, shard_over_dp=True)
    _backward(ctx, model, _batch(1))
    out = {"norm1": opt.step().grad_norm}
    model = build_gpt_model(spec)
    opt = _optimizer(ctx, model)
    _load(model, opt, f"{ckpt}/shard_float32")
    out["state"] = _full_state(ctx, spec, model, opt)
    model = build_gpt_model(spec, torch.bfloat16)
    opt = _optimizer(ctx, model)
    _load(model, opt, f"{ckpt}/shard_bfloat16", with_model=False)
    out["bf16_state"] = _full_state(ctx, spec, model, opt)
    return out


def _body(ctx, hf_dir: str, ckpt: str):
    # One world for every part, re-initialised from TP=2 to TP=1 x DP=2 and back in between:
    # starting the ranks (importing megatron) costs far more than the parts themselves.
    from megatron_lpreg.parallel import init_distributed

    tp2 = _tp2_part(ctx, hf_dir, ckpt)
    ctx = init_distributed(tp_size=1, backend="gloo", timeout_s=TIMEOUT_S)
    assert ctx.tp_size == 1 and ctx.dp_size == 2
    out = {"tp2": tp2, "tp1": _tp1_part(ctx, hf_dir, ckpt), "dp": _dp_part(ctx, hf_dir),
           "shard": _shard_part(ctx, hf_dir, ckpt)}
    ctx = init_distributed(tp_size=2, backend="gloo", timeout_s=TIMEOUT_S)
    out["shard_tp2"] = _shard_tp2_part(ctx, hf_dir, ckpt)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_tiny_model(FAMILY, tmp_path_factory.mktemp("optimizer_hf") / FAMILY, seed=3))


@pytest.fixture(scope="module")
def ranks(hf_dir, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("optimizer_ckpt"))
    return run_distributed(_body, 2, 2, args=(hf_dir, ckpt), timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(ranks):
    """(TP=2 results, TP=1 results, both of rank 0; per-rank DP=2 results)"""
    return ranks[0]["tp2"], ranks[0]["tp1"], [r["dp"] for r in ranks]


def test_grad_norm_is_the_unsharded_norm_at_tp1_and_tp2(runs):
    tp2, tp1, _ = runs
    assert tp1["norm1"] == pytest.approx(tp1["norm1_float64"], rel=1e-6)
    assert tp2["norm1"] == pytest.approx(tp1["norm1_float64"], rel=1e-5)
    assert tp1["norm1"] > CLIP  # so the later steps are clipped ones


def test_replicated_params_stay_equal_over_tp(runs):
    agree = runs[0]["replicas_agree"]
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in agree  # partial grads per rank
    assert "decoder.final_layernorm.weight" in agree
    assert all(agree.values()), agree


def test_non_finite_grad_on_one_rank_skips_the_step(runs):
    tp2, _, dp = runs
    for stepped, finite, unchanged, cleared in tp2["nonfinite"]:
        assert not stepped and not finite
        assert unchanged and cleared
    assert [r["nonfinite"] for r in dp] == [(False, True), (False, True)]


def test_sharded_checkpoint_tp2_resumes_at_tp1(runs):
    tp2, tp1, _ = runs
    for key in ("state", "bf16_state"):
        saved, loaded = tp2[key], tp1[key]
        assert sorted(saved) == sorted(loaded)
        assert ("master" in saved) == (key == "bf16_state")
        for kind in saved:
            assert sorted(saved[kind]) == sorted(loaded[kind])
            for name, t in saved[kind].items():
                assert t.abs().sum() > 0, (key, kind, name)
                assert torch.equal(t, loaded[kind][name]), (key, kind, name)
    # One more step from the resumed state (moments and step count) matches the TP=2 run's.
    assert tp2["stepped2"] and tp2["stepped3"] and tp1["stepped3"]
    for name, t in tp2["params3"].items():
        torch.testing.assert_close(tp1["params3"][name], t, rtol=0, atol=2e-5)


def test_data_parallel_step_is_one_step_on_the_mean_gradient(runs):
    dp = runs[2]
    for out in dp:
        for norm, reference in out["norms"]:
            assert norm == pytest.approx(reference, rel=1e-6)
        assert out["diff_to_reference"] <= 1e-7
    assert torch.equal(dp[0]["params"], dp[1]["params"])


# ---------------------------------------------------------------------------------------------
# shard_over_dp


def test_sharded_steps_match_unsharded_at_dp2(ranks):
    for r in ranks:
        for key in ("float32", "bfloat16"):
            res = r["shard"][key]
            for norm, sharded_norm in res["norms"]:
                assert norm > CLIP
                assert sharded_norm == pytest.approx(norm, rel=1e-6)
            assert res["param_diff"] <= 1e-6, key  # fp32 params, bf16 ones
            assert res["state_diff"] <= 1e-6, key  # masters and moments
        assert r["shard"]["bfloat16"]["params_equal"]  # the masters round to the same bf16
    for key in ("float32", "bfloat16"):  # the all-gather leaves every DP rank the same params
        assert torch.equal(ranks[0]["shard"][key]["params"], ranks[1]["shard"][key]["params"])


def test_sharded_state_is_half_per_rank_at_dp2(ranks):
    for r in ranks:
        full, half = r["shard"]["bfloat16"]["numel"]
        assert half == pytest.approx(full / 2, abs=3)  # master + moments of a padded half
        full, half = r["shard"]["float32"]["numel"]
        assert half == pytest.approx(full * 3 / 4, abs=3)  # + a master slice an fp32 model lacks


def test_sharded_non_finite_grad_on_one_rank_skips_everywhere(ranks):
    for r in ranks:
        for stepped, finite, unchanged, cleared in r["shard"]["nonfinite"]:
            assert not stepped and not finite
            assert unchanged and cleared


def test_sharded_grad_norm_at_tp2(ranks):
    assert ranks[0]["shard_tp2"]["norm1"] == pytest.approx(ranks[0]["tp2"]["norm1"], rel=1e-6)


def _assert_same_state(saved: dict, loaded: dict, master: bool) -> None:
    assert sorted(saved) == sorted(loaded) and ("master" in saved) == master
    for kind in saved:
        assert sorted(saved[kind]) == sorted(loaded[kind])
        for name, t in saved[kind].items():
            assert t.abs().sum() > 0, (kind, name)
            assert torch.equal(t, loaded[kind][name]), (kind, name)


def test_sharded_dp2_checkpoint_loads_unsharded_at_tp2(ranks):
    shard, loaded = ranks[0]["shard"], ranks[0]["shard_tp2"]
    _assert_same_state(shard["float32"]["state"], loaded["state"], master=False)
    _assert_same_state(shard["bfloat16"]["state"], loaded["bf16_state"], master=True)


def test_unsharded_tp2_checkpoint_loads_sharded_at_dp2(ranks):
    tp2 = ranks[0]["tp2"]
    for r in ranks:
        loaded = r["shard"]["from_tp2"]
        _assert_same_state(tp2["state"], loaded["state"], master=False)
        _assert_same_state(tp2["bf16_state"], loaded["bf16_state"], master=True)
        # The resumed step (moments, step count, fp32 weights from the model) matches TP=2's.
        assert loaded["stepped3"]
        for name, t in tp2["params3"].items():
            torch.testing.assert_close(loaded["params3"][name], t, rtol=0, atol=2e-5)
