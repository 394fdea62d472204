"""Per-GPU memory of a GRPO run from the model's shape: estimates, not measurements.

Notation: per GPU, t = TP size, a = bytes of the model dtype, P =
parameters held on this GPU, T = tokens of one micro-batch, L layers, h hidden, f FFN, q = heads *
head_dim, kv = kv_heads * head_dim, V' = vocabulary padded as megatron pads it (multiple of 128 t).

Parameters (exact): embedding V h; per layer q/k/v/o h (q + 2 kv) + q h, q/k/v biases q + 2 kv
(Qwen2), q/k RMSNorms 2 head_dim (Qwen3), MLP 3 h f, two RMSNorms 2 h; final norm h; output layer
V h unless tied. On one GPU: the TP-sharded tensors (linears, biases, embedding/output over V') / t
plus the replicated ones (RMSNorm weights).

Training state (policy/optimizer.py: torch AdamW over fp32 masters): weights a P + gradients 4 P
(fp32 in any model dtype: a bf16 model accumulates its micro-batches in fp32 main grads) + fp32
master 4 P (none for an fp32 model) + exp_avg and exp_avg_sq 8 P = 18 B/param in bf16. During the
step foreach AdamW allocates sqrt(exp_avg_sq) for all parameters at once (+4 P): 22 B/param while it
runs (no activations then). zero_grad drops the gradients afterwards, so 14 B/param stay resident
through the rollout. --distributed-optimizer (the default; PolicyOptimizer(shard_over_dp=True),
ZeRO-1) keeps master (also for an fp32 model) and moments for 1/DP of the parameters: 12/DP B/param,
and sqrt(v) is 4/DP; in bf16 the main grads are the flat fp32 buffer that is reduce-scattered, an
fp32 model copies its grads into one during the step (+4 P). The formulas below are
written for the unsharded optimizer; with it, read 12/DP for the 12 B of master and moments.

Activations of one micro-batch, T = max(micro_batch_tokens, prompt + response) (a longer sequence
is a micro-batch by itself); no sequence parallelism (model/build.py does not enable it), dropout 0.
Per layer and token, Korthikanti et al. 2022 (sbh (10 + 24/t + 5as/ht)) adapted to RMSNorm, SwiGLU,
GQA and no dropout masks:
    replicated   4 h a             inputs of the two norms, of linear_qkv and of linear_fc1
    sharded / t  (q + 2 kv) a      q, k, v  [+ (q + kv) a: inputs of the q/k norms, Qwen3]
                 + q a             attention output = linear_proj input
                 + 3 f a           fc1 output (gate | up) and the SwiGLU output
    none         + 4 heads / t     flash attention's log-sum-exp (unfused: + a heads s / t softmax
                                   probabilities and 2 (q - kv) a / t of K/V expanded to every head)
    full         only each layer's input h a is kept, plus one layer's "none" set while recomputed
Plus the final-norm and output-layer inputs 2 h a, and the logits shard T V'/t a three times (kept
for the loss backward, its gradient, the copy of GPTModel's transpose) + the loss's fp32 chunks.

vLLM engine, colocated as the trainer runs it (rollout/layout.py): every GPU holds its shard of an
engine of e = rollout.tp GPUs (default e = t; e divides t), so a DP replica hosts t/e engines. Each
reserves util * memory per GPU, holding its weight shard (a P_e, P_e the parameters on one GPU at TP
e), ~2 GiB of runtime (profiling peak, sampler, CUDA graphs) and the KV cache at 2 L kv_heads/e
head_dim kv_bytes per token. One engine generates prompts_per_step/(dp t/e) * n sequences of prompt +
response tokens; fewer KV tokens than that means waves (slower, not an OOM); fewer than one sequence
means vLLM refuses to start. Asleep from the end of the rollout to the refit (level 2: KV cache and
weights freed, the refit rewrites every weight) it keeps ~0.5 GiB.

Peaks, each + 3 GiB of CUDA context, NCCL buffers and allocator slack:
    training micro-batch = 18 B/param state + activations + asleep engine
    optimizer step       = 18 B/param state + 4 B/param step temporaries + asleep engine
    rollout              = 14 B/param (weights, master, moments) + the engine's reservation
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from megatron_lpreg.model import ModelConfigError, ModelSpec, check_tp, padded_vocab_size
from megatron_lpreg.model.build import RECOMPUTE

GIB = 1024**3
CUDA_OVERHEAD_GIB = 3.0  # CUDA context, NCCL buffers, caching-allocator fragmentation
ENGINE_RUNTIME_GIB = 2.0  # vLLM's profiled activation peak, sampler and CUDA graphs
ENGINE_ASLEEP_GIB = 0.5  # what an asleep engine keeps on the GPU (its runtime's leftovers)
LOSS_CHUNK_BYTES = 3 * (4 << 20)  # the loss's fp32 chunk workspaces (loss/shards.DEFAULT_CHUNK_BYTES)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

_QWEN = {"hidden_act": "silu", "rope_theta": 1000000.0, "torch_dtype": "bfloat16",
         "tie_word_embeddings": False, "use_sliding_window": False}
# HF config.json values of the base checkpoints the paper trains (and smaller relatives).
BUILTIN_MODELS = {
    "qwen2.5-32b": {**_QWEN, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                    "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
                    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05},
    "qwen3-14b": {**_QWEN, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                  "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                  "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
                  "attention_bias": False},
    "qwen2.5-7b": {**_QWEN, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                   "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-06},
    "qwen3-8b": {**_QWEN, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                 "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
                 "attention_bias": False},
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                     "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
                     "tie_word_embeddings": True, "torch_dtype": "bfloat16", "attention_bias": False},
}


# ------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ParamCount:
    total: int  # the HF model's parameter count (unpadded vocabulary)
    sharded: int  # on one GPU: the TP shards (padded vocabulary)
    replicated: int  # on every GPU of a TP group: the RMSNorm weights

    @property
    def per_gpu(self) -> int:
        return self.sharded + self.replicated


def count_parameters(spec: ModelSpec, tp: int = 1) -> ParamCount:
    h, L = spec.hidden_size, spec.num_layers
    linear = h * (spec.q_size + 2 * spec.kv_size) + spec.q_size * h + 3 * h * spec.ffn_hidden_size
    bias = (spec.q_size + 2 * spec.kv_size) if spec.qkv_bias else 0
    norms = L * (2 * h + (2 * spec.head_dim if spec.qk_norm else 0)) + h
    vocab_tensors = 1 if spec.tie_word_embeddings else 2
    total = L * (linear + bias) + norms + vocab_tensors * spec.vocab_size * h
    padded = padded_vocab_size(spec.vocab_size, tp)
    sharded = (L * (linear + bias) + vocab_tensors * padded * h) // tp
    return ParamCount(total=total, sharded=sharded, replicated=norms)


# ------------------------------------------------------------------------------------ activations
def _layer_bytes_per_token(spec: ModelSpec, tp: int, a: int, seq: int, mode: str, flash: bool) -> float:
    """Bytes one transformer layer keeps per token for the backward (see the module docstring)."""
    h, q, kv, f = spec.hidden_size, spec.q_size, spec.kv_size, spec.ffn_hidden_size
    if mode == "full":
        return h * a
    sharded = (q + 2 * kv) * a + q * a + 3 * f * a + ((q + kv) * a if spec.qk_norm else 0)
    if flash:
        sharded += 4 * spec.num_attention_heads
    else:
        sharded += a * spec.num_attention_heads * seq + 2 * (q - kv) * a
    return 4 * h * a + sharded / tp


# ------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """Per-GPU memory of one run; sizes in GiB unless the name says otherwise."""

    tp: int
    dp: int
    gpu_memory_gib: float
    recompute: str
    distributed_optimizer: bool  # master and moments sharded over DP
    params_total: int
    params_per_gpu: int
    # training state
    weights_gib: float
    grads_gib: float
    master_gib: float
    adam_gib: float
    step_temporaries_gib: float  # AdamW's sqrt(exp_avg_sq) (+ fp32 flat grads for fp32 ZeRO-1), during the step
    distributed_optimizer_state_gib: float  # the state with master and moments sharded over dp
    # activations of one micro-batch
    activation_tokens: int
    layer_activations_gib: float
    recompute_working_gib: float  # full recompute: one layer's activations while it is recomputed
    logits_gib: float
    activations_gib: float
    # rollout engine
    gpu_memory_utilization: float
    engine_tp: int  # rollout.tp: GPUs per engine
    engines: int  # engines in the world (dp x tp / engine_tp)
    engine_params_per_gpu: int
    engine_reserved_gib: float
    engine_weights_gib: float
    engine_runtime_gib: float
    kv_cache_gib: float
    kv_bytes_per_token: int
    kv_cache_tokens: int
    sequence_tokens: int  # prompt + response
    rollout_tokens_per_engine: int  # what one engine must hold to run its whole batch at once
    rollout_waves: int
    engine_asleep_gib: float
    overhead_gib: float
    tokens_per_step: int
    # peaks
    training_peak_gib: float
    step_peak_gib: float
    rollout_peak_gib: float
    max_gpu_memory_utilization: float  # the largest utilisation the rollout phase leaves room for
    fits: bool
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return max(self.training_peak_gib, self.step_peak_gib, self.rollout_peak_gib)

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_gib": self.peak_gib}


def estimate(spec: ModelSpec, *, tp: int, dp: int, dtype_bytes: int, micro_batch_tokens: int,
             max_prompt_len: int, max_response_len: int, rollout_n: int, prompts_per_step: int,
             kv_cache_dtype_bytes: int, gpu_memory_gib: float, gpu_memory_utilization: float,
             recompute: str = "full", flash_attention: bool = True, distributed_optimizer: bool = True,
             engine_tp: int | None = None) -> Plan:
    """The per-GPU memory of a run (pure; formulas in the module docstring). ``engine_tp``:
    rollout.tp, the vLLM engine's TP (default ``tp``).

    Raises ModelConfigError if ``tp`` or ``engine_tp`` does not split the model, ValueError on a bad
    argument (an ``engine_tp`` that does not divide ``tp`` among them: the trainer refuses it).
    """
    check_tp(spec, tp)
    engine_tp = tp if engine_tp is None else engine_tp
    if engine_tp < 1 or tp % engine_tp:
        raise ValueError(f"rollout.tp={engine_tp} must divide tp={tp} (every engine lives inside one "
                         f"trainer replica's TP group)")
    check_tp(spec, engine_tp)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: expected one of {list(RECOMPUTE)}")
    if dp < 1 or min(micro_batch_tokens, max_prompt_len, max_response_len, rollout_n, prompts_per_step) < 1:
        raise ValueError("dp, token lengths, rollout_n and prompts_per_step must be positive")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    a = dtype_bytes
    mem = float(gpu_memory_gib)
    params = count_parameters(spec, tp)
    P = params.per_gpu

    weights, grads = a * P / GIB, 4 * P / GIB  # fp32 main grads
    dist_state = weights + grads + 12 * P / dp / GIB
    if distributed_optimizer:  # a master slice even for fp32; sqrt(v) of the slice (+ fp32's flat grad copy)
        master, adam, step_tmp = 4 * P / dp / GIB, 8 * P / dp / GIB, ((4 if a == 4 else 0) + 4 / dp) * P / GIB
    else:  # sqrt(v); the step reads the fp32 grads in place
        master, adam, step_tmp = (0 if a == 4 else 4) * P / GIB, 8 * P / GIB, 4 * P / GIB
    state = weights + grads + master + adam

    seq = max_prompt_len + max_response_len
    T = max(micro_batch_tokens, seq)
    per_layer = _layer_bytes_per_token(spec, tp, a, seq, recompute, flash_attention)
    layers = T * (spec.num_layers * per_layer + 2 * spec.hidden_size * a) / GIB
    working = T * _layer_bytes_per_token(spec, tp, a, seq, "none", flash_attention) / GIB if recompute == "full" else 0.0
    vocab_shard = padded_vocab_size(spec.vocab_size, tp) // tp
    logits = (3 * T * vocab_shard * a + LOSS_CHUNK_BYTES) / GIB
    activations = layers + working + logits

    reserved = gpu_memory_utilization * mem
    engine_params = P if engine_tp == tp else count_parameters(spec, engine_tp).per_gpu
    engine_weights = a * engine_params / GIB
    kv_per_token = 2 * spec.num_layers * max(1, spec.num_kv_heads // engine_tp) * spec.head_dim * kv_cache_dtype_bytes
    kv_gib = max(0.0, reserved - engine_weights - ENGINE_RUNTIME_GIB)
    kv_tokens = int(kv_gib * GIB // kv_per_token)
    engines = dp * (tp // engine_tp)
    engine_prompts = math.ceil(prompts_per_step / engines)
    per_engine = engine_prompts * rollout_n * seq
    waves = math.ceil(per_engine / kv_tokens) if kv_tokens else 0

    training_peak = state + activations + ENGINE_ASLEEP_GIB + CUDA_OVERHEAD_GIB
    step_peak = state + step_tmp + ENGINE_ASLEEP_GIB + CUDA_OVERHEAD_GIB
    resident = weights + master + adam
    rollout_peak = resident + reserved + CUDA_OVERHEAD_GIB
    max_util = max(0.0, (mem - resident - CUDA_OVERHEAD_GIB) / mem)
    min_util = (engine_weights + ENGINE_RUNTIME_GIB + seq * kv_per_token / GIB) / mem

    warnings, errors = [], []
    dist_note = (f"master and moments are already sharded over dp={dp} (distributed optimizer)"
                 if distributed_optimizer else
                 f"the optimizer state is not sharded over DP; a distributed optimizer would bring the "
                 f"{state:.1f} GiB of weights, grads, master and moments down to {dist_state:.1f} GiB")
    if training_peak > mem:
        act_share = activations / max(training_peak - CUDA_OVERHEAD_GIB, 1e-9)
        fixes = ["larger TP"]
        if recompute != "full":
            fixes.append("--recompute full")
        if act_share > 0.2 and T == micro_batch_tokens:
            fixes.append("smaller grpo.micro_batch_tokens")
        errors.append(f"training micro-batch needs {training_peak:.1f} GiB > {mem:g} GiB (state {state:.1f}, "
                      f"activations {activations:.1f}): {', '.join(fixes)}; {dist_note}")
    if step_peak > mem:
        errors.append(f"optimizer step needs {step_peak:.1f} GiB > {mem:g} GiB (state {state:.1f} + AdamW "
                      f"temporaries {step_tmp:.1f}): larger TP; {dist_note}")
    if rollout_peak > mem:
        offload = "optimizer offload" if distributed_optimizer else "a distributed optimizer / optimizer offload"
        fix = (f"lower rollout.gpu_memory_utilization to <= {max_util:.2f}" if max_util >= min_util else
               f"no gpu_memory_utilization both fits ({max_util:.2f} max) and holds one sequence "
               f"({min_util:.2f} min): larger TP or {offload}")
        errors.append(f"rollout needs {rollout_peak:.1f} GiB > {mem:g} GiB (trainer keeps {resident:.1f} GiB, the "
                      f"engine reserves {reserved:.1f}): {fix}")
    if kv_tokens < seq:
        errors.append(f"the vLLM KV cache holds {kv_tokens:,} tokens, less than one sequence ({seq:,} = prompt + "
                      f"response): vLLM will not start; raise rollout.gpu_memory_utilization to >= "
                      f"{min_util:.2f}, larger TP, or shorter lengths")
    elif waves > 1:
        warnings.append(f"the vLLM KV cache holds {kv_tokens:,} tokens, one rollout batch needs {per_engine:,} "
                        f"({engine_prompts} prompts x {rollout_n} x {seq:,}): generation runs in "
                        f"~{waves} waves (slower, not an OOM)")
    if prompts_per_step % dp:
        errors.append(f"grpo.prompts_per_step={prompts_per_step} is not divisible by dp={dp}: the trainer refuses")
    fits = training_peak <= mem and step_peak <= mem and rollout_peak <= mem and kv_tokens >= seq

    return Plan(
        tp=tp, dp=dp, gpu_memory_gib=mem, recompute=recompute, distributed_optimizer=distributed_optimizer,
        params_total=params.total, params_per_gpu=P,
        weights_gib=weights, grads_gib=grads, master_gib=master, adam_gib=adam, step_temporaries_gib=step_tmp,
        distributed_optimizer_state_gib=dist_state, activation_tokens=T, layer_activations_gib=layers,
        recompute_working_gib=working, logits_gib=logits, activations_gib=activations,
        gpu_memory_utilization=gpu_memory_utilization, engine_tp=engine_tp, engines=engines,
        engine_params_per_gpu=engine_params, engine_reserved_gib=reserved,
        engine_weights_gib=engine_weights, engine_runtime_gib=ENGINE_RUNTIME_GIB, kv_cache_gib=kv_gib,
        kv_bytes_per_token=kv_per_token, kv_cache_tokens=kv_tokens, sequence_tokens=seq,
        rollout_tokens_per_engine=per_engine, rollout_waves=waves, engine_asleep_gib=ENGINE_ASLEEP_GIB,
        overhead_gib=CUDA_OVERHEAD_GIB, tokens_per_step=prompts_per_step * rollout_n * seq,
        training_peak_gib=training_peak, step_peak_gib=step_peak, rollout_peak_gib=rollout_peak,
        max_gpu_memory_utilization=max_util, fits=fits, warnings=warnings, errors=errors,
    )


def fitting_tps(spec: ModelSpec, tp: int, world: int, inputs: dict) -> list[int]:
    """The TP sizes above ``tp`` that split the model and the ``world`` and fit (``inputs``: estimate's)."""
    out = []
    for other in range(tp + 1, world + 1):
        if world % other:
            continue
        try:
            if estimate(spec, tp=other, **{**inputs, "dp": world // other}).fits:
                out.append(other)
        except (ModelConfigError, ValueError):  # e.g. a rollout.tp that does not divide it
            continue
    return out
