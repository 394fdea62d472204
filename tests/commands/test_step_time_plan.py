"""`plan`'s step-time estimate (step_time_plan.py): the formulas by hand, their scaling, the command."""

import argparse
import json

import pytest

from megatron_lpreg import memory_plan
from megatron_lpreg.commands import plan
from megatron_lpreg.config import ConfigError
from megatron_lpreg.policy.throughput import forward_flops, linear_flops_per_token
from megatron_lpreg.step_time_plan import NEMO_RL_QWEN3_32B, estimate_step_time

PAPER = dict(dtype_bytes=2, kv_cache_dtype_bytes=2, micro_batch_tokens=16384, max_prompt_len=2048,
             max_response_len=8192, rollout_n=8, prompts_per_step=256, gpu_memory_gib=80.0,
             gpu_memory_utilization=0.5, recompute="full", distributed_optimizer=True)


def _setup(recompute="full"):
    spec = plan.load_model("qwen2.5-7b")[1]
    memory = memory_plan.estimate(spec, tp=4, dp=4, **{**PAPER, "recompute": recompute})
    return spec, memory


def test_phases_follow_their_formulas():
    spec, memory = _setup()
    t = estimate_step_time(spec, memory, prompts_per_step=256, rollout_n=8, mean_prompt_len=500,
                           mean_response_len=3000, dtype_bytes=2, on_policy=False, peak_tflops=1000.0,
                           hbm_tbps=2.0, mfu=0.5, prefill_mfu=0.5, decode_efficiency=0.5)
    gpus, seqs = 16, 2048
    peak, bandwidth = 1000e12, 1e12  # 2 TB/s at 50 %
    assert t.rollout_prefill_s == pytest.approx(forward_flops(spec, [500] * seqs, head_positions=seqs)
                                                / (gpus * peak * 0.5))
    scoring = forward_flops(spec, [3500] * seqs, head_positions=seqs * 3000) / (gpus * peak * 0.5)
    assert t.logprob_s == pytest.approx(scoring)
    assert t.train_s == pytest.approx(4 * scoring)  # full recomputation: forward, recompute, backward (2)
    in_flight = min(seqs // 4, memory.kv_cache_tokens // 3500)
    waves = -(-(seqs // 4) // in_flight)
    weights = 2 * memory.params_per_gpu
    memory_bound = (weights + in_flight * (500 + 1500) * memory.kv_bytes_per_token) / bandwidth
    compute_bound = in_flight * (linear_flops_per_token(spec) + 2 * spec.hidden_size * spec.vocab_size) / 4 / (peak * 0.5)
    assert t.rollout_decode_s == pytest.approx(waves * 3000 * max(memory_bound, compute_bound))
    assert t.refit_s == pytest.approx(2 * weights / bandwidth)
    assert t.tokens_per_s_per_gpu == pytest.approx(seqs * 3500 / (t.step_s * gpus))


def test_scaling_and_on_policy():
    spec, memory = _setup(recompute="none")
    base = dict(prompts_per_step=256, rollout_n=8, mean_prompt_len=500, mean_response_len=3000, dtype_bytes=2)
    off = estimate_step_time(spec, memory, **base, on_policy=False)
    on = estimate_step_time(spec, memory, **base, on_policy=True)
    assert on.logprob_s == 0 and off.logprob_s > 0 and on.train_s == pytest.approx(off.train_s)
    assert off.train_s == pytest.approx(3 * off.logprob_s)  # no recomputation: forward + backward
    fast = estimate_step_time(spec, memory, **base, on_policy=True, peak_tflops=2 * 989.0)
    assert fast.train_s == pytest.approx(on.train_s / 2)
    wide = estimate_step_time(spec, memory, **base, on_policy=True, hbm_tbps=2 * 3.35)
    assert wide.refit_s == pytest.approx(on.refit_s / 2)
    with pytest.raises(ValueError, match="mfu is a share of the peak"):
        estimate_step_time(spec, memory, **base, mfu=1.5)


def _run(capsys, *argv):
    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    rc = plan.run(parser.parse_args(list(argv)))
    return rc, capsys.readouterr().out


def test_plan_prints_the_step_time_for_the_32b_example(capsys):
    rc, out = _run(capsys, "--config", "examples/qwen2.5_32b/onpolicy.yaml", "--nodes", "8")
    assert rc == 0
    assert "step time (an ESTIMATE" in out and "tokens/s/GPU" in out and "on-policy" in out
    assert f"{NEMO_RL_QWEN3_32B[1]:g} tokens/s/GPU" in out
    rc, out = _run(capsys, "--config", "examples/qwen2.5_32b/onpolicy.yaml", "--nodes", "8", "--json",
                   "--mean-response-len", "2048")
    timing = json.loads(out)["step_time"]
    assert timing["mean_response_len"] == 2048 and timing["gpus"] == 64 and timing["step_s"] > 0
    with pytest.raises(ConfigError, match="step time: --decode-efficiency"):
        _run(capsys, "--config", "examples/qwen2.5_32b/onpolicy.yaml", "--decode-efficiency", "0")
