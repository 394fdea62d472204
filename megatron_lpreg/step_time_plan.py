"""How long a GRPO step takes, from the model's FLOPs and bytes at stated assumptions: estimates.

The layout is the colocated one the trainer runs (rollout/layout.py): every GPU holds its shard of an
engine of e = rollout.tp GPUs (default: the training TP), so each phase uses all G GPUs. With S =
prompts_per_step x n sequences
of mean prompt length p and mean response length r (``mean_response_len``, default half the maximum):

rollout   prefill: forward FLOPs of the S prompts / (G x peak x ``prefill_mfu``) (compute bound).
          decode: each of the dp t / e engines decodes its share of the S sequences in ``waves``
          (memory_plan's KV-cache capacity) of r iterations. An iteration reads the engine's weight
          shard and the KV cache of
          the sequences in flight (context p + r / 2 on average) from HBM, at ``hbm_tbps`` x
          ``decode_efficiency``, or is compute bound at ``prefill_mfu`` when that is slower.
log-prob  forward FLOPs of the S sequences (LM head at the r response positions) / (G x peak x ``mfu``);
          0 on-policy, where the training forward gives the old log-probs (policy/passes.py).
train     3 forwards (forward + backward), 4 with full recomputation, per epoch, at ``mfu``.
refit     e = t: each GPU copies its own weight shard into its engine shard (a x P / t bytes read
          and written) at ``hbm_tbps`` x ``decode_efficiency``; no gather. e < t: each GPU writes its
          larger engine shard (a x P_e) the same way; the gather over the TP group (NVLink) that
          feeds it is not counted.

tokens/s/GPU = S (p + r) / (step time x G), NeMo-RL's definition of its step throughput.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_lpreg.memory_plan import Plan
from megatron_lpreg.model import ModelSpec
from megatron_lpreg.policy.throughput import forward_flops, linear_flops_per_token

# Defaults: one H100 SXM (dense bf16 datasheet peak, HBM3), and efficiencies a tuned stack reaches.
H100_PEAK_TFLOPS = 989.0
H100_HBM_TBPS = 3.35
DEFAULT_MFU = 0.40  # training and log-prob passes (the GPU check's target)
DEFAULT_PREFILL_MFU = 0.50
DEFAULT_DECODE_EFFICIENCY = 0.50  # share of the HBM roofline a decode iteration reaches
# NeMo-RL's published GRPO throughput for Qwen3-32B on 32 H100 (docs: performance summary).
NEMO_RL_QWEN3_32B = ("NeMo-RL, Qwen3-32B GRPO on 32 H100 (published)", 571.0)


@dataclass
class StepTime:
    """Seconds per phase of one step and the throughput they give; estimates, not measurements."""

    gpus: int
    sequences: int
    mean_prompt_len: int
    mean_response_len: int
    on_policy: bool
    assumptions: dict
    rollout_prefill_s: float
    rollout_decode_s: float
    logprob_s: float
    train_s: float
    refit_s: float
    refit_path: str = "in place, shard to shard"

    @property
    def rollout_s(self) -> float:
        return self.rollout_prefill_s + self.rollout_decode_s

    @property
    def step_s(self) -> float:
        return self.rollout_s + self.logprob_s + self.train_s + self.refit_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.sequences * (self.mean_prompt_len + self.mean_response_len) / (self.step_s * self.gpus)

    def to_dict(self) -> dict:
        return {**asdict(self), "rollout_s": self.rollout_s, "step_s": self.step_s,
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu}


def estimate_step_time(spec: ModelSpec, plan: Plan, *, prompts_per_step: int, rollout_n: int, mean_prompt_len: int,
                       mean_response_len: int, dtype_bytes: int, epochs: int = 1, on_policy: bool = True,
                       peak_tflops: float = H100_PEAK_TFLOPS, hbm_tbps: float = H100_HBM_TBPS,
                       mfu: float = DEFAULT_MFU, prefill_mfu: float = DEFAULT_PREFILL_MFU,
                       decode_efficiency: float = DEFAULT_DECODE_EFFICIENCY) -> StepTime:
    """The per-phase seconds of one step of the run ``plan`` describes (formulas: module docstring)."""
    for name, value in (("peak_tflops", peak_tflops), ("hbm_tbps", hbm_tbps), ("mfu", mfu),
                        ("prefill_mfu", prefill_mfu), ("decode_efficiency", decode_efficiency)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    for name, value in (("mfu", mfu), ("prefill_mfu", prefill_mfu), ("decode_efficiency", decode_efficiency)):
        if value > 1:
            raise ValueError(f"{name} is a share of the peak: expected <= 1, got {value}")
    gpus = plan.tp * plan.dp
    peak = peak_tflops * 1e12
    bandwidth = hbm_tbps * 1e12 * decode_efficiency
    p, r = mean_prompt_len, mean_response_len
    sequences = prompts_per_step * rollout_n

    prefill = forward_flops(spec, [p] * sequences, head_positions=sequences) / (gpus * peak * prefill_mfu)
    # One decode iteration of one engine, per GPU of it: its weight shard, and the KV cache of the
    # sequences in flight at the mean context, read once; the FLOPs of one token per sequence.
    per_engine = -(-sequences // plan.engines)
    in_flight = min(per_engine, max(1, plan.kv_cache_tokens // max(p + r, 1)))
    waves = -(-per_engine // in_flight)
    weight_bytes = dtype_bytes * plan.engine_params_per_gpu
    kv_bytes = in_flight * (p + r / 2) * plan.kv_bytes_per_token
    flops = in_flight * (linear_flops_per_token(spec) + 2.0 * spec.hidden_size * spec.vocab_size) / plan.engine_tp
    iteration = max((weight_bytes + kv_bytes) / bandwidth, flops / (peak * prefill_mfu))
    decode = waves * r * iteration

    head = sequences * r
    scoring = forward_flops(spec, [p + r] * sequences, head_positions=head) / (gpus * peak * mfu)
    passes = 4 if plan.recompute == "full" else 3
    train = epochs * passes * scoring
    refit = 2 * weight_bytes / bandwidth
    return StepTime(
        gpus=gpus, sequences=sequences, mean_prompt_len=p, mean_response_len=r, on_policy=on_policy,
        assumptions=dict(peak_tflops=peak_tflops, hbm_tbps=hbm_tbps, mfu=mfu, prefill_mfu=prefill_mfu,
                         decode_efficiency=decode_efficiency, decode_waves=waves, sequences_in_flight=in_flight),
        rollout_prefill_s=prefill, rollout_decode_s=decode, logprob_s=0.0 if on_policy else scoring,
        train_s=train, refit_s=refit,
        refit_path="in place, shard to shard" if plan.engine_tp == plan.tp else
        f"gathered over TP {plan.tp}, written into engine TP {plan.engine_tp} (the gather is not counted)")


def format_step_time(t: StepTime) -> str:
    a = t.assumptions
    lines = [
        f"step time (an ESTIMATE from FLOPs and bytes, not a measurement): {t.sequences:,} sequences of "
        f"~{t.mean_prompt_len:,} prompt + ~{t.mean_response_len:,} response tokens on {t.gpus} GPUs",
        f"  assumptions: peak {a['peak_tflops']:g} TFLOP/s and HBM {a['hbm_tbps']:g} TB/s per GPU, "
        f"training/log-prob MFU {a['mfu']:.0%}, prefill MFU {a['prefill_mfu']:.0%}, decode at "
        f"{a['decode_efficiency']:.0%} of the HBM roofline ({a['sequences_in_flight']:,} sequences in flight, "
        f"{a['decode_waves']} wave{'s' if a['decode_waves'] > 1 else ''})",
        f"  rollout   {t.rollout_s:9.1f} s   (prefill {t.rollout_prefill_s:.1f} s, decode {t.rollout_decode_s:.1f} s)",
        f"  log-prob  {t.logprob_s:9.1f} s" + ("   (on-policy: from the training forward)" if t.on_policy else ""),
        f"  train     {t.train_s:9.1f} s",
        f"  refit     {t.refit_s:9.2f} s   ({t.refit_path})",
        f"  step      {t.step_s:9.1f} s   -> {t.tokens_per_s_per_gpu:,.0f} tokens/s/GPU",
        f"  for scale: {NEMO_RL_QWEN3_32B[0]}: {NEMO_RL_QWEN3_32B[1]:g} tokens/s/GPU (other settings)",
    ]
    return "\n".join(lines)
