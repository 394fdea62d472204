"""`megatron-lpreg plan`: parameter counts, the per-GPU estimate, and the command as a user runs it."""

import argparse
import json

import pytest
import torch

from megatron_lpreg import memory_plan
from megatron_lpreg.commands import plan
from megatron_lpreg.config import ConfigError
from megatron_lpreg.model import ModelConfigError

GIB = 1024**3
PAPER = dict(dtype_bytes=2, kv_cache_dtype_bytes=2, micro_batch_tokens=16384, max_prompt_len=2048,
             max_response_len=8192, rollout_n=8, prompts_per_step=256, gpu_memory_gib=80.0,
             gpu_memory_utilization=0.5, recompute="full", distributed_optimizer=False)


def spec(name):
    return plan.load_model(name)[1]


def run_plan(capsys, *argv):
    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    rc = plan.run(parser.parse_args(list(argv)))
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("name, published", [
    ("qwen2.5-32b", 32.76e9), ("qwen3-14b", 14.77e9), ("qwen2.5-7b", 7.62e9), ("qwen3-8b", 8.19e9),
    ("smollm2-135m", 134.5e6),
])
def test_parameter_counts_match_published_totals(name, published):
    assert memory_plan.count_parameters(spec(name)).total == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("name", list(memory_plan.BUILTIN_MODELS))
def test_parameter_count_is_exactly_what_transformers_builds(name):
    transformers = pytest.importorskip("transformers")
    raw = dict(memory_plan.BUILTIN_MODELS[name])
    cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert memory_plan.count_parameters(spec(name)).total == sum(p.numel() for p in model.parameters())


def test_builtin_configs_parse_as_the_real_architectures():
    q32, q14, smol = spec("qwen2.5-32b"), spec("qwen3-14b"), spec("smollm2-135m")
    assert (q32.qkv_bias, q32.qk_norm, q32.tie_word_embeddings, q32.head_dim) == (True, False, False, 128)
    assert (q14.qkv_bias, q14.qk_norm, q14.head_dim) == (False, True, 128)
    assert (smol.family, smol.tie_word_embeddings, smol.head_dim) == ("llama", True, 64)
    assert plan.load_model("Qwen/Qwen2.5-32B")[1] == q32  # hub-style names resolve too


def test_model_from_a_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(memory_plan.BUILTIN_MODELS["qwen3-8b"]))
    assert plan.load_model(str(tmp_path))[1] == spec("qwen3-8b")
    with pytest.raises(ConfigError, match="not a built-in"):
        plan.load_model("qwen9-1t")


@pytest.mark.parametrize("name", ["qwen2.5-32b", "qwen3-14b"])
def test_tensor_parallel_shards_the_weights(name):
    s = spec(name)
    one = memory_plan.estimate(s, tp=1, dp=64, **PAPER)
    eight = memory_plan.estimate(s, tp=8, dp=8, **PAPER)
    assert eight.weights_gib == pytest.approx(one.weights_gib / 8, rel=0.01)
    assert eight.adam_gib == pytest.approx(one.adam_gib / 8, rel=0.01)
    count = memory_plan.count_parameters(s, 8)
    # every GPU holds 1/tp of the (vocab-padded) shards and all the norm weights
    assert count.sharded * 8 + count.replicated == pytest.approx(count.total, rel=0.001)
    assert 0 < count.replicated < 1e-4 * count.total


def test_state_bytes_per_parameter_match_the_optimizer():
    """18 B/param in training (bf16 weights, fp32 main grads, master and moments), 14 resident after
    the step: checked against policy/optimizer.PolicyOptimizer's actual tensors."""
    from megatron_lpreg.policy.optimizer import PolicyOptimizer

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32, bias=False)).to(torch.bfloat16)
    opt = PolicyOptimizer(model, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    grads = sum(g.nbytes for g in opt.grads())
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    resident = sum(p.nbytes for p in model.parameters()) + sum(m.nbytes for m in opt.masters)
    resident += sum(t.nbytes for st in opt.optimizer.state.values() for k, t in st.items() if k != "step")
    assert (resident / n, grads / n) == (14, 4)
    est = memory_plan.estimate(spec("smollm2-135m"), tp=1, dp=1, **PAPER)
    per_param = GIB / est.params_per_gpu
    assert (est.weights_gib + est.master_gib + est.adam_gib) * per_param == pytest.approx(14)
    assert est.grads_gib * per_param == pytest.approx(4)
    assert est.step_temporaries_gib * per_param == pytest.approx(4)  # sqrt(v)


def test_peaks_add_up():
    p = memory_plan.estimate(spec("qwen3-14b"), tp=8, dp=8, **PAPER)
    state = p.weights_gib + p.grads_gib + p.master_gib + p.adam_gib
    assert p.training_peak_gib == pytest.approx(state + p.activations_gib + p.engine_asleep_gib + p.overhead_gib)
    assert p.step_peak_gib == pytest.approx(state + p.step_temporaries_gib + p.engine_asleep_gib + p.overhead_gib)
    assert p.rollout_peak_gib == pytest.approx(state - p.grads_gib + 40.0 + p.overhead_gib)
    assert p.engine_reserved_gib == pytest.approx(p.engine_weights_gib + p.engine_runtime_gib + p.kv_cache_gib)
    # qwen3-14b at tp=8: 2 (K, V) x 40 layers x 1 KV head x 128 x 2 B
    assert p.kv_bytes_per_token == 2 * 40 * 1 * 128 * 2
    assert p.tokens_per_step == 256 * 8 * (2048 + 8192)
    assert p.rollout_tokens_per_engine == 32 * 8 * 10240
    assert p.fits and not p.errors


def test_full_recompute_keeps_layer_inputs_only():
    s = spec("qwen2.5-32b")
    p = memory_plan.estimate(s, tp=8, dp=8, **PAPER)
    T, h = 16384, s.hidden_size
    assert p.layer_activations_gib == pytest.approx(T * (s.num_layers + 2) * h * 2 / GIB)
    none = memory_plan.estimate(s, tp=8, dp=8, **{**PAPER, "recompute": "none"})
    unfused = memory_plan.estimate(s, tp=8, dp=8, **{**PAPER, "recompute": "none"}, flash_attention=False)
    assert p.activations_gib < none.activations_gib < unfused.activations_gib
    assert not none.fits  # 64 layers of un-recomputed activations do not fit in 80 GiB
    # a sequence longer than the budget is a micro-batch by itself
    long = memory_plan.estimate(s, tp=8, dp=8, **{**PAPER, "micro_batch_tokens": 4096})
    assert long.activation_tokens == 10240


def test_kv_cache_too_small_for_one_sequence_is_an_error():
    p = memory_plan.estimate(spec("qwen2.5-32b"), tp=8, dp=8, **{**PAPER, "gpu_memory_utilization": 0.12})
    assert p.kv_cache_tokens < p.sequence_tokens and not p.fits
    assert any("vLLM will not start" in e for e in p.errors)


def test_heads_not_divisible_by_tp_is_a_clear_error(capsys):
    with pytest.raises(ModelConfigError, match="tp=2 does not divide num_attention_heads=9"):
        memory_plan.estimate(spec("smollm2-135m"), tp=2, dp=4, **PAPER)
    with pytest.raises(ConfigError, match=r"tp=16 does not divide .*valid tp for this model: \[1, 2, 4, 8\]"):
        run_plan(capsys, "--model", "qwen2.5-32b", "--nodes", "8", "--tp", "16")
    with pytest.raises(ConfigError, match="tp=3 does not divide the 8 GPUs"):
        run_plan(capsys, "--model", "smollm2-135m", "--tp", "3")


def test_paper_32b_is_reported_at_tp8_and_does_not_fit_at_tp1(capsys):
    rc, out = run_plan(capsys, "--model", "qwen2.5-32b", "--nodes", "8", "--tp", "8",
                       "--max-prompt-len", "2048", "--max-response-len", "8192")
    assert rc in (0, 3)
    assert "tp 8 x dp 8" in out and "32.76 B parameters" in out
    for part in ("training micro-batch", "optimizer step", "rollout", "KV cache", "fp32 master weights"):
        assert part in out
    rc, out = run_plan(capsys, "--model", "qwen2.5-32b", "--nodes", "8", "--tp", "1")
    assert rc == 3
    assert "fits: NO" in out
    warning = [line for line in out.splitlines() if line.startswith("WARNING: training micro-batch")]
    assert warning and "larger TP" in warning[0] and "distributed optimizer" in warning[0]


def test_14b_fits_at_tp8_and_tp4_says_what_to_change(capsys):
    rc, out = run_plan(capsys, "--model", "qwen3-14b", "--nodes", "8", "--tp", "8")
    assert rc == 0 and "fits: yes" in out
    rc, out = run_plan(capsys, "--model", "qwen3-14b", "--nodes", "8", "--tp", "4", "--no-distributed-optimizer")
    assert rc == 3
    assert "WARNING: rollout needs" in out and "lower rollout.gpu_memory_utilization to <=" in out
    assert "tp=8 fits" in out


def test_distributed_optimizer_shards_master_and_moments_and_fits_32b_on_64_gpus(capsys):
    s = spec("qwen2.5-32b")
    full = memory_plan.estimate(s, tp=8, dp=8, **PAPER)
    dist = memory_plan.estimate(s, tp=8, dp=8, **{**PAPER, "distributed_optimizer": True})
    assert (dist.master_gib, dist.adam_gib) == pytest.approx((full.master_gib / 8, full.adam_gib / 8))
    assert dist.weights_gib == full.weights_gib and dist.grads_gib == full.grads_gib
    assert dist.step_temporaries_gib == pytest.approx(full.step_temporaries_gib / 8)
    assert dist.distributed_optimizer_state_gib == pytest.approx(
        dist.weights_gib + dist.grads_gib + dist.master_gib + dist.adam_gib)
    assert not full.fits and dist.fits
    rc, out = run_plan(capsys, "--model", "qwen2.5-32b", "--nodes", "8", "--tp", "8", "--recompute", "full")
    assert rc == 0 and "fits: yes" in out and "sharded over dp 8" in out
    rc, out = run_plan(capsys, "--model", "qwen2.5-32b", "--nodes", "8", "--tp", "8", "--recompute", "full",
                       "--no-distributed-optimizer")
    assert rc == 3 and "fits: NO" in out and "not sharded over DP" in out


def test_json_output_parses(capsys):
    rc, out = run_plan(capsys, "--model", "qwen3-14b", "--nodes", "8", "--tp", "8", "--json")
    data = json.loads(out)
    assert rc == 0 and data["fits"] is True
    assert (data["tp"], data["dp"], data["world_size"], data["model"]) == (8, 8, 64, "qwen3-14b")
    assert data["peak_gib"] == max(data["training_peak_gib"], data["step_peak_gib"], data["rollout_peak_gib"])


def test_config_file_and_overrides_feed_the_estimate(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("parallel:\n  tp: 8\nrollout:\n  gpu_memory_utilization: 0.3\n  max_tokens: 4096\n"
                   "grpo:\n  micro_batch_tokens: 8192\n")
    rc, out = run_plan(capsys, "--model", "qwen2.5-7b", "--config", str(cfg), "--nodes", "2", "--tp", "4",
                       "--json", "rollout.n=16")
    data = json.loads(out)
    assert (data["tp"], data["gpu_memory_utilization"], data["activation_tokens"]) == (4, 0.3, 8192)
    assert data["tokens_per_step"] == 256 * 16 * (2048 + 4096)
    with pytest.raises(ConfigError, match="give --model"):
        run_plan(capsys, "--config", str(cfg))
    with pytest.raises(ConfigError, match="unknown key"):
        run_plan(capsys, "--model", "qwen2.5-7b", "rollout.nn=3")


def test_prompts_not_divisible_by_dp_is_reported(capsys):
    rc, out = run_plan(capsys, "--model", "smollm2-135m", "--nodes", "3", "--tp", "1", "grpo.prompts_per_step=256",
                       "grpo.mini_batch_prompts=256")
    assert rc == 3 and "not divisible by dp=24" in out


def test_recompute_is_what_the_model_builder_builds():
    with pytest.raises(ValueError, match=r"recompute='selective': expected one of \['none', 'full'\]"):
        memory_plan.estimate(spec("qwen3-14b"), tp=8, dp=8, **{**PAPER, "recompute": "selective"})


def test_the_gpu_count_assumed_is_said_in_the_output_and_the_help(capsys):
    _, out = run_plan(capsys, "--model", "qwen3-14b", "--tp", "8")
    assert "world: 1 nodes x 8 GPUs = 8 GPUs of 80 GiB; tp 8 x dp 1 (assumed, not given: --nodes 1, " \
           "--gpus-per-node 8)" in out
    _, out = run_plan(capsys, "--model", "qwen3-14b", "--tp", "8", "--nodes", "2")
    assert "(assumed, not given: --gpus-per-node 8)" in out
    _, out = run_plan(capsys, "--model", "qwen3-14b", "--tp", "8", "--nodes", "2", "--gpus-per-node", "4")
    assert "assumed" not in out and "world: 2 nodes x 4 GPUs = 8 GPUs of 80 GiB; tp 8 x dp 1\n" in out
    _, out = run_plan(capsys, "--model", "qwen3-14b", "--json")
    assert json.loads(out)["assumed"] == ["--nodes 1", "--gpus-per-node 8"]
    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert "nodes in the job (default 1" in help_text and "GPUs per node (default 8" in help_text


def test_engine_tp_is_the_layout_the_trainer_runs(capsys):
    """rollout.tp=e < tp: t/e engines per replica, each holding e GPUs' worth of weights per GPU and
    half the sequences; an e that does not divide tp is refused, as the trainer refuses it."""
    s = spec("qwen3-14b")
    same = memory_plan.estimate(s, tp=8, dp=8, **PAPER)
    half = memory_plan.estimate(s, tp=8, dp=8, engine_tp=4, **PAPER)
    assert (same.engine_tp, same.engines, half.engine_tp, half.engines) == (8, 8, 4, 16)
    assert half.engine_params_per_gpu == memory_plan.count_parameters(s, 4).per_gpu > same.engine_params_per_gpu
    assert half.engine_weights_gib == pytest.approx(2 * half.engine_params_per_gpu / memory_plan.GIB)
    assert half.kv_bytes_per_token == 2 * same.kv_bytes_per_token  # 2 KV heads per GPU instead of 1
    assert half.rollout_tokens_per_engine * 2 == same.rollout_tokens_per_engine
    with pytest.raises(ValueError, match="rollout.tp=3 must divide tp=8"):
        memory_plan.estimate(s, tp=8, dp=8, engine_tp=3, **PAPER)
    with pytest.raises(ConfigError, match="rollout.tp"):
        run_plan(capsys, "--model", "qwen3-14b", "--nodes", "8", "parallel.tp=8", "rollout.tp=3")
    rc, out = run_plan(capsys, "--model", "qwen3-14b", "--nodes", "8", "parallel.tp=8", "rollout.tp=4")
    assert "vLLM engine (tp 4, 16 in all" in out and "gathered over TP 8" in out


def test_plan_refuses_the_engine_it_does_not_model(capsys):
    with pytest.raises(ConfigError, match="rollout.engine=hf"):
        run_plan(capsys, "--model", "qwen3-14b", "--nodes", "8", "rollout.engine=hf")
