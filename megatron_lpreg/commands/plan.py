"""Per-GPU memory of a run, before it is launched: does it fit, and if not, what to change; and
how long a step should take (``megatron_lpreg/step_time_plan.py``).

    megatron-lpreg plan --model qwen3-14b --nodes 8 --tp 8
    megatron-lpreg plan --model /models/Qwen2.5-32B --config run.yaml --tp 8 --json

The job is --nodes x --gpus-per-node GPUs of --gpu-memory-gib each; without --nodes or
--gpus-per-node it assumes 1 node x 8 GPUs and its "world:" line says so.

Exit status 0: every phase fits in --gpu-memory-gib; 3: one does not (a WARNING line names it and
what to change); 2: a bad model, configuration or layout. The numbers are estimates from the
model's shape (``megatron_lpreg/memory_plan.py`` says how each is made), not measurements.
"""

from __future__ import annotations

import argparse
import json
import os

from megatron_lpreg.config import ConfigError, load_config
from megatron_lpreg.memory_plan import BUILTIN_MODELS, DTYPE_BYTES, Plan, estimate, fitting_tps
from megatron_lpreg.model import ModelConfigError, ModelSpec, parse_hf_config
from megatron_lpreg.model.build import RECOMPUTE
from megatron_lpreg.step_time_plan import (
    DEFAULT_DECODE_EFFICIENCY, DEFAULT_MFU, DEFAULT_PREFILL_MFU, H100_HBM_TBPS, H100_PEAK_TFLOPS, estimate_step_time,
    format_step_time,
)


# The job plan assumes when not told, printed with the plan so the verdict is never read for another job.
ASSUMED = {"nodes": 1, "gpus_per_node": 8}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"built-in ({', '.join(BUILTIN_MODELS)}) or a HF config.json / model directory "
                        "(default: model.path of --config)")
    p.add_argument("--config", default=None, help="run YAML: lengths, rollout.n, batch sizes, dtype, TP, utilisation")
    p.add_argument("--nodes", type=int, default=None, help=f"nodes in the job (default {ASSUMED['nodes']}, "
                   "said in the output)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help=f"GPUs per node (default {ASSUMED['gpus_per_node']}, said in the output)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: parallel.tp)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="memory of one GPU (default 80: H100 / A100 80GB; the output says 'GPUs of N GiB')")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="default: grpo.micro_batch_tokens")
    p.add_argument("--max-prompt-len", type=int, default=None, help="default: data.max_prompt_len")
    p.add_argument("--max-response-len", type=int, default=None, help="default: rollout.max_tokens")
    p.add_argument("--recompute", choices=RECOMPUTE, default=None,
                   help="activation recomputation (default: the config's model.recompute)")
    p.add_argument("--attention", choices=("flash", "unfused"), default="flash",
                   help="flash: Transformer Engine's fused attention; unfused: the local spec (stores s^2 scores)")
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="master weights and AdamW moments sharded over DP (ZeRO-1)")
    t = p.add_argument_group("step time (estimates at these assumptions; defaults: one H100 SXM)")
    t.add_argument("--mean-prompt-len", type=int, default=None, help="default: data.max_prompt_len / 2")
    t.add_argument("--mean-response-len", type=int, default=None, help="default: rollout.max_tokens / 2")
    t.add_argument("--peak-tflops", type=float, default=H100_PEAK_TFLOPS, help="dense bf16 peak per GPU")
    t.add_argument("--hbm-tbps", type=float, default=H100_HBM_TBPS, help="HBM bandwidth per GPU, TB/s")
    t.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="share of the peak the training and log-prob passes reach")
    t.add_argument("--prefill-mfu", type=float, default=DEFAULT_PREFILL_MFU, help="share of the peak prefill reaches")
    t.add_argument("--decode-efficiency", type=float, default=DEFAULT_DECODE_EFFICIENCY,
                   help="share of the HBM roofline a decode iteration (and the refit copy) reaches")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. rollout.n=16")


def _assume_defaults(args) -> list[str]:
    """Fill the job-shape flags not given; returns them as flags, e.g. ['--gpus-per-node 8']."""
    assumed = []
    for key, value in ASSUMED.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            assumed.append(f"--{key.replace('_', '-')} {value}")
    return assumed


def load_model(model: str) -> tuple[str, ModelSpec]:
    """(display name, spec) of a built-in name or a config.json / model directory."""
    # "Qwen/Qwen3-14B-Base" or a not-yet-downloaded "models/Qwen3-14B-Base" name a built-in too.
    key = os.path.basename(model.rstrip("/")).lower().removesuffix("-base").removesuffix("-instruct")
    try:
        if os.path.exists(model):
            return model, parse_hf_config(model)
        if key in BUILTIN_MODELS:
            return key, parse_hf_config(BUILTIN_MODELS[key])
    except ModelConfigError as e:
        raise ConfigError(f"--model: {e}") from None
    raise ConfigError(f"--model {model!r}: not a built-in ({', '.join(BUILTIN_MODELS)}) nor an existing path")


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be positive, got {value}")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    model = args.model or cfg.model.path
    if not model:
        raise ConfigError("give --model (a built-in name or a HF config) or a --config with model.path")
    name, spec = load_model(model)
    assumed = _assume_defaults(args)
    for flag in ("nodes", "gpus_per_node", "tp", "micro_batch_tokens", "max_prompt_len", "max_response_len"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory-gib must be positive, got {args.gpu_memory_gib}")
    if cfg.rollout.engine == "hf":
        raise ConfigError("rollout.engine=hf: plan budgets the colocated vLLM engine a GPU run uses (vllm, or auto "
                          "with CUDA); the transformers engine keeps a whole model per generating rank and never sleeps")
    tp = args.tp or cfg.parallel.tp
    world = args.nodes * args.gpus_per_node
    if world % tp:
        raise ConfigError(f"tp={tp} does not divide the {world} GPUs ({args.nodes} nodes x {args.gpus_per_node})")
    a = DTYPE_BYTES[cfg.model.dtype]
    inputs = dict(
        dp=world // tp, dtype_bytes=a, kv_cache_dtype_bytes=a,
        micro_batch_tokens=args.micro_batch_tokens or cfg.grpo.micro_batch_tokens,
        max_prompt_len=args.max_prompt_len or cfg.data.max_prompt_len,
        max_response_len=args.max_response_len or cfg.rollout.max_tokens,
        rollout_n=cfg.rollout.n, prompts_per_step=cfg.grpo.prompts_per_step,
        gpu_memory_gib=args.gpu_memory_gib, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        recompute=args.recompute or cfg.model.recompute, flash_attention=args.attention == "flash",
        distributed_optimizer=cfg.optim.distributed_optimizer if args.distributed_optimizer is None
        else args.distributed_optimizer, engine_tp=cfg.rollout.tp,
    )
    try:
        plan = estimate(spec, tp=tp, **inputs)
    except ModelConfigError as e:
        raise ConfigError(f"--tp: {e}") from None
    except ValueError as e:  # settings the trainer would refuse
        raise ConfigError(str(e)) from None
    if cfg.grpo.mini_batch_prompts % inputs["dp"]:
        plan.errors.append(f"grpo.mini_batch_prompts={cfg.grpo.mini_batch_prompts} is not divisible by "
                           f"dp={inputs['dp']}: the trainer refuses")
    if tp > args.gpus_per_node:
        plan.warnings.append(f"tp={tp} spans nodes ({args.gpus_per_node} GPUs each): TP all-reduces cross the network")
    if not plan.fits:
        better = fitting_tps(spec, tp, world, inputs)
        plan.errors.append(f"with these settings tp={better[0]} fits" if better else
                           "no TP size that splits the model and the world fits with these settings")
    timing = step_time(args, cfg, spec, plan, inputs)
    if args.json:
        print(json.dumps({"model": name, "architecture": spec.architecture, "nodes": args.nodes,
                          "gpus_per_node": args.gpus_per_node, "world_size": world, "dtype": cfg.model.dtype,
                          "assumed": assumed, **plan.to_dict(), "step_time": timing.to_dict()}, indent=2))
    else:
        print(format_plan(plan, name, spec, args.nodes, args.gpus_per_node, cfg.model.dtype, assumed))
        print()
        print(format_step_time(timing))
    return 0 if plan.fits and not plan.errors else 3


def step_time(args, cfg, spec: ModelSpec, plan: Plan, inputs: dict):
    from megatron_lpreg.policy.passes import on_policy_scores

    for flag in ("mean_prompt_len", "mean_response_len"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    on_policy = on_policy_scores(cfg.loss, num_minibatches=cfg.grpo.prompts_per_step // cfg.grpo.mini_batch_prompts,
                                 epochs=cfg.grpo.epochs, ref_model=cfg.loss.ref_kl_coef > 0 or None,
                                 mask_seq_abs_diff=cfg.mismatch.mask_seq_abs_diff)
    try:
        return estimate_step_time(
            spec, plan, prompts_per_step=cfg.grpo.prompts_per_step, rollout_n=cfg.rollout.n,
            mean_prompt_len=args.mean_prompt_len or max(1, inputs["max_prompt_len"] // 2),
            mean_response_len=args.mean_response_len or max(1, inputs["max_response_len"] // 2),
            dtype_bytes=inputs["dtype_bytes"], epochs=cfg.grpo.epochs, on_policy=on_policy,
            peak_tflops=args.peak_tflops, hbm_tbps=args.hbm_tbps, mfu=args.mfu, prefill_mfu=args.prefill_mfu,
            decode_efficiency=args.decode_efficiency)
    except ValueError as e:
        raise ConfigError(f"step time: --{str(e).replace('_', '-')}") from None


def format_plan(plan: Plan, name: str, spec: ModelSpec, nodes: int, gpus_per_node: int, dtype: str,
                assumed: list[str] = ()) -> str:
    mem = plan.gpu_memory_gib
    rows: list[tuple[str, str]] = []

    def row(label: str, gib: float | None = None, note: str = "") -> None:
        rows.append((label, "" if gib is None else f"{gib:8.2f}" + (f"   {note}" if note else "")))

    tok = plan.activation_tokens
    row(f"training state (AdamW, master and moments sharded over dp {plan.dp})" if plan.distributed_optimizer
        else "training state (AdamW, not sharded over DP)")
    row(f"  weights ({dtype})", plan.weights_gib)
    row("  gradients (fp32 main grads)", plan.grads_gib)
    row("  fp32 master weights", plan.master_gib)
    row("  AdamW exp_avg + exp_avg_sq (fp32)", plan.adam_gib)
    row("  optimizer step: sqrt(exp_avg_sq) temp", plan.step_temporaries_gib, "only during the step")
    row(f"activations (micro-batch of {tok:,} tokens, recompute {plan.recompute})")
    row(f"  {spec.num_layers} layers + final norm / output inputs", plan.layer_activations_gib)
    if plan.recompute == "full":
        row("  one layer recomputed", plan.recompute_working_gib)
    row("  logits shard, gradient, copy", plan.logits_gib)
    row(f"vLLM engine (tp {plan.engine_tp}, {plan.engines} in all, gpu_memory_utilization "
        f"{plan.gpu_memory_utilization:.2f})", plan.engine_reserved_gib, "reserved while awake")
    row("  weights", plan.engine_weights_gib)
    row("  runtime (profile peak, sampler, graphs)", plan.engine_runtime_gib)
    row("  KV cache", plan.kv_cache_gib,
        f"{plan.kv_cache_tokens:,} tokens at {plan.kv_bytes_per_token / 1024:g} KiB/token")
    row("  asleep (level 2) until the refit", plan.engine_asleep_gib)
    row("CUDA context, NCCL, allocator slack", plan.overhead_gib)

    def status(gib: float) -> str:
        return "ok" if gib <= mem else f"OVER by {gib - mem:.1f}"

    width = max(len(label) for label, _ in rows) + 2
    per_engine = plan.rollout_tokens_per_engine
    lines = [
        f"model: {name} ({spec.architecture}), {plan.params_total / 1e9:.2f} B parameters, "
        f"{plan.params_per_gpu / 1e9:.3f} B per GPU",
        f"world: {nodes} nodes x {gpus_per_node} GPUs = {plan.tp * plan.dp} GPUs of {mem:g} GiB; "
        f"tp {plan.tp} x dp {plan.dp}" + (f" (assumed, not given: {', '.join(assumed)})" if assumed else ""),
        f"tokens per step: up to {plan.tokens_per_step:,} ({per_engine:,} per engine, sequences of "
        f"up to {plan.sequence_tokens:,}); the KV cache holds {plan.kv_cache_tokens:,} per engine"
        + (f" (~{plan.rollout_waves} waves)" if plan.rollout_waves > 1 else ""),
        "",
        f"{'per GPU':<{width}}{'GiB':>8}",
    ]
    lines += [f"{label:<{width}}{value}".rstrip() for label, value in rows]
    lines += [
        "",
        f"{'peak':<{width}}{'GiB':>8}   of {mem:g}",
        f"{'  training micro-batch':<{width}}{plan.training_peak_gib:8.2f}   {status(plan.training_peak_gib)}",
        f"{'  optimizer step':<{width}}{plan.step_peak_gib:8.2f}   {status(plan.step_peak_gib)}",
        f"{'  rollout':<{width}}{plan.rollout_peak_gib:8.2f}   {status(plan.rollout_peak_gib)}",
        f"fits: {'yes' if plan.fits else 'NO'}",
    ]
    lines += [f"WARNING: {w}" for w in plan.warnings]
    lines += [f"WARNING: {e}" for e in plan.errors]
    return "\n".join(lines)
