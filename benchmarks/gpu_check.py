"""Where the GPU path stands, in one command and one table.

    python benchmarks/gpu_check.py           # one CUDA GPU (H100/H200): about 3-5 minutes
    python benchmarks/gpu_check.py --cpu     # the same code on CPU at tiny shapes (the test suite runs it)

Rows (each: what was measured, the target, PASS / FAIL / info):
  parity <family>   megatron-core logits vs transformers, both bf16 on the same weights, 2 x 64 random
                    ids: mean |log-prob difference| of the next tokens, and each one's mean error
                    against transformers in fp32 on those weights; target: ours within 1.5x of
                    transformers' own bf16 error, and top-1 equal to fp32's on >= 95% of positions.
                    Tiny random Qwen2 / Qwen3 / Llama, and a Qwen2.5-0.5B-shaped random model.
  grpo+lpreg bf16   3 GRPO + Lp-Reg steps of a tiny policy in bf16 through GRPOTrainer, world of one
                    (NCCL on CUDA, gloo on CPU), engine "auto" (vLLM if importable, else transformers):
                    every metric finite, ``mismatch/logprob_abs_diff`` < 5e-2.
  train step mfu    forward + backward + AdamW of a Qwen2.5-1.5B-shaped random model (local spec,
                    SDPA attention; TE when it imports) on 4 x 2048 tokens: tokens/s, model TFLOP/s
                    (policy/throughput.forward_flops, backward = 2 forwards) and MFU against the
                    datasheet bf16 peak (H100/H200: 989 TFLOP/s) else the measured matmul peak;
                    target >= 40% on a GPU.
  loss cost         fused Lp-Reg token statistics + loss vs megatron-core cross entropy, forward +
                    backward on [4096, 151936] logits (loss_bench's variants b and a): time ratio,
                    target <= 1.3 on a GPU.
  memory <phase>    CUDA allocator peak of the training micro-batch and of the optimizer step of the
                    MFU run, against ``megatron-lpreg plan``'s estimate for the same shape (state +
                    activations, state + step temporaries): target measured <= plan.
On CPU the time and memory rows are "info" (a shared CPU's numbers judge nothing); the parity and
GRPO rows are checked there too. Exit status 1 when any row FAILs.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

BF16_LOGPROB_BOUND = 5e-2  # README, "Rollout/training mismatch"
DATASHEET_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12}  # dense, SXM
PARITY_ERROR_RATIO = 1.5
MFU_TARGET = 0.40
LOSS_TIME_TARGET = 1.3

_QWEN25 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936,
               max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
QWEN25_05B = dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2)
QWEN25_15B = dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2)
# --cpu stand-ins: the same families and code paths at a size a CPU test runs in seconds.
SMALL_QWEN = dict(_QWEN25, vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


@dataclass
class Row:
    check: str
    result: str
    target: str
    status: str  # PASS, FAIL or info


@dataclass
class Shapes:
    """What each row runs at: the GPU sizes, or tiny ones for --cpu."""

    parity_big: tuple[str, dict]
    mfu_model: tuple[str, dict]
    mfu_rows: int
    mfu_seq: int
    loss_tokens: int
    judge_speed: bool  # time and memory rows pass or fail (a GPU), or are info (a shared CPU)


GPU_SHAPES = Shapes(("qwen2.5-0.5b shape", QWEN25_05B), ("qwen2.5-1.5b shape", QWEN25_15B), 4, 2048, 4096, True)
CPU_SHAPES = Shapes(("small qwen2.5 shape", SMALL_QWEN), ("small qwen2.5 shape", SMALL_QWEN), 2, 64, 64, False)


def _status(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def random_hf_model(config: dict, device: torch.device, seed: int = 0):
    """A bf16 ``*ForCausalLM`` of ``config`` on ``device`` with unit-scale random weights, so logits
    are O(1) (HF's 0.02 init gives near-uniform next-token distributions: a weak comparison)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(config)
    hf_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    for name, p in model.named_parameters():  # a tied head is the embedding: visited once
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn_like(p))
        elif "embed_tokens" in name:
            p.copy_(0.25 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model.eval()


@torch.no_grad()
def parity_row(name: str, config: dict, device: torch.device) -> Row:
    """Ours and transformers in bf16 on the same (bf16) weights, each against transformers in fp32
    on those weights: bf16 rounding is the same size in both, or ours has a defect."""
    import copy

    from megatron_lpreg.model import build_gpt_model, model_logits, parse_hf_config
    from megatron_lpreg.weights import hf_to_megatron_shard

    hf = random_hf_model(config, device)
    spec = parse_hf_config({**config, "torch_dtype": "bfloat16"})
    te = _te()
    model = build_gpt_model(spec, torch.bfloat16, use_te=te).to(device).eval()
    params = dict(model.named_parameters())
    for pname, shard in hf_to_megatron_shard(spec, hf.state_dict(), 0, 1, te=te):
        params[pname].copy_(shard)
    ids = torch.randint(0, spec.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    target = ids[:, 1:, None]

    def next_logprobs(logits):
        return logits[:, :-1, :spec.vocab_size].float().log_softmax(-1).gather(-1, target)

    ours = model_logits(model, ids)
    ours_lp, ours_top = next_logprobs(ours), ours[..., :spec.vocab_size].argmax(-1)
    del model, ours
    theirs_lp = next_logprobs(hf(input_ids=ids).logits)
    fp32 = copy.deepcopy(hf).float()
    del hf
    ref = fp32(input_ids=ids).logits
    ref_lp, ref_top = next_logprobs(ref), ref[..., :spec.vocab_size].argmax(-1)
    del fp32, ref
    diff = (ours_lp - theirs_lp).abs().mean().item()
    ours_err, theirs_err = (ours_lp - ref_lp).abs().mean().item(), (theirs_lp - ref_lp).abs().mean().item()
    ratio = ours_err / max(theirs_err, 1e-12)
    agree = (ours_top == ref_top).float().mean().item()
    ok = ratio <= PARITY_ERROR_RATIO and agree >= 0.95
    return Row(f"parity {name}", f"|dlogp| vs transformers bf16 {diff:.1e}; vs fp32: ours {ours_err:.1e}, "
               f"transformers {theirs_err:.1e} ({ratio:.2f}x); top-1 = fp32's {agree:.1%}",
               f"<= {PARITY_ERROR_RATIO}x transformers' error, top-1 >= 95%", _status(ok))


def grpo_row(device: torch.device, workdir: Path) -> Row:
    from megatron_lpreg.grpo.trainer import GRPOTrainer
    from megatron_lpreg.metrics_file import read_metrics
    from tests.grpo.tiny_run import make_data, make_policy_dir, tiny_config

    policy, data = make_policy_dir(workdir / "policy"), make_data(workdir / "data")
    run = workdir / "run"
    cfg = tiny_config(run, policy, data, 1, "model.dtype=bfloat16", "grpo.mini_batch_prompts=4",
                      "validation.files=[]", "checkpoint.every=0", "checkpoint.save_at_end=false",
                      "rollout.engine=auto", f"parallel.backend={'nccl' if device.type == 'cuda' else 'gloo'}")
    with GRPOTrainer(cfg) as trainer:
        trainer.fit()
        engine = type(trainer.engine).__name__ if getattr(trainer, "engine", None) is not None else "?"
    rows = read_metrics(run / "metrics.jsonl")
    finite = all(v is None or math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    mismatch = max(r["mismatch/logprob_abs_diff"] for r in rows)
    ok = finite and len(rows) == 3 and mismatch < BF16_LOGPROB_BOUND
    return Row("grpo+lpreg bf16, 3 steps", f"{len(rows)} steps ({engine}), finite={finite}, "
               f"mismatch/logprob_abs_diff max {mismatch:.1e}", f"finite, < {BF16_LOGPROB_BOUND:g}", _status(ok))


def _peak_flops(device: torch.device) -> tuple[float, str]:
    from megatron_lpreg.policy.throughput import measure_peak_flops

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in DATASHEET_BF16_PEAK.items():
            if key in name:
                return peak, f"{key} datasheet"
        return measure_peak_flops(device, torch.bfloat16, size=8192), "measured matmul"
    return measure_peak_flops(device, torch.bfloat16, size=512), "measured matmul"


def mfu_and_memory_rows(shapes: Shapes, device: torch.device) -> list[Row]:
    from megatron_lpreg.loss import vocab_parallel_token_stats
    from megatron_lpreg.memory import PhasePeaks
    from megatron_lpreg.memory_plan import estimate
    from megatron_lpreg.model import build_gpt_model, model_logits, parse_hf_config
    from megatron_lpreg.policy.optimizer import PolicyOptimizer
    from megatron_lpreg.policy.throughput import forward_flops

    name, config = shapes.mfu_model
    spec = parse_hf_config({**config, "torch_dtype": "bfloat16"})
    model = build_gpt_model(spec, torch.bfloat16, use_te=_te()).to(device)
    optimizer = PolicyOptimizer(model, lr=1e-6)
    rows, seq = shapes.mfu_rows, shapes.mfu_seq
    ids = torch.randint(0, spec.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(2)).to(device)
    targets = ids.roll(-1, dims=1)
    peaks = PhasePeaks(device)
    times = []
    for i in range(4):  # the first step allocates the AdamW state and picks kernels: not timed
        _sync(device)
        start = time.perf_counter()
        with peaks.phase("train"):
            logits = model_logits(model, ids)
            stats = vocab_parallel_token_stats(logits.reshape(rows * seq, -1), targets.reshape(-1),
                                               vocab_size=spec.vocab_size, entropy=False, proxy=False,
                                               inplace=True)
            (-stats.logprobs.mean()).backward()
            del logits, stats
        with peaks.phase("step"):
            optimizer.step()
            optimizer.zero_grad()
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
        if i == 0:
            peaks.metrics()  # the warm-up step's peaks are not the steady state's
    measured = peaks.metrics()
    seconds = statistics.median(times)
    flops = 3 * forward_flops(spec, [seq] * rows)
    peak, peak_kind = _peak_flops(device)
    mfu = flops / seconds / peak
    judge = shapes.judge_speed
    out = [Row(f"train step mfu ({name}, {rows}x{seq}, {'SDPA' if not _te() else 'TE'})",
               f"{rows * seq / seconds:,.0f} tok/s, {flops / seconds / 1e12:.3g} TFLOP/s, MFU {mfu:.2%} "
               f"of {peak / 1e12:.3g} TFLOP/s ({peak_kind})", f">= {MFU_TARGET:.0%}",
               _status(mfu >= MFU_TARGET) if judge else "info")]
    del optimizer, model
    plan = estimate(spec, tp=1, dp=1, dtype_bytes=2, micro_batch_tokens=rows * seq, max_prompt_len=seq // 2,
                    max_response_len=seq - seq // 2, rollout_n=1, prompts_per_step=rows, kv_cache_dtype_bytes=2,
                    gpu_memory_gib=_device_gib(device), gpu_memory_utilization=0.5, recompute="none",
                    flash_attention=True, distributed_optimizer=False)
    state = plan.weights_gib + plan.grads_gib + plan.master_gib + plan.adam_gib
    for phase, planned in (("train", state + plan.activations_gib), ("step", state + plan.step_temporaries_gib)):
        got = measured.get(f"memory/peak_{phase}_mb", float("nan")) / 1024  # MB -> GiB
        what = "CUDA allocator peak" if device.type == "cuda" else "process RSS peak"
        out.append(Row(f"memory {phase} ({name})", f"{what} {got:.2f} GiB vs plan {planned:.2f} GiB "
                       f"({got / planned:.2f}x)", "measured <= plan", _status(got <= planned) if judge else "info"))
    return out


def _te() -> bool:
    from megatron_lpreg.model.build import transformer_engine_available

    return transformer_engine_available()


def _device_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1024**3
    return 80.0  # a nominal GPU: the plan's engine share does not enter the rows compared


def loss_row(shapes: Shapes, device: torch.device, ctx) -> Row:
    from loss_bench import _variant_a, _variant_b

    vocab = 151936
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(shapes.loss_tokens, vocab, generator=g) * 2.0).to(device)
    target = torch.randint(0, vocab, (shapes.loss_tokens,), generator=g).to(device)
    medians = {}
    for name, fn in (("ce", _variant_a), ("lpreg", _variant_b)):
        times = []
        for i in range(4):
            z = logits.clone().requires_grad_(True)  # both variants consume their input in place
            _sync(device)
            start = time.perf_counter()
            fn(z, target, ctx, None)
            _sync(device)
            if i:
                times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
    ratio = medians["lpreg"] / medians["ce"]
    return Row(f"loss cost ([{shapes.loss_tokens}, {vocab}] fp32 logits)",
               f"Lp-Reg stats+loss {medians['lpreg'] * 1e3:.1f} ms vs megatron CE {medians['ce'] * 1e3:.1f} ms "
               f"({ratio:.2f}x)", f"<= {LOSS_TIME_TARGET}x",
               _status(ratio <= LOSS_TIME_TARGET) if shapes.judge_speed else "info")


def format_table(rows: list[Row]) -> str:
    header = Row("check", "result", "target", "status")
    widths = [max(len(getattr(r, f)) for r in [header, *rows]) for f in ("check", "result", "target", "status")]
    lines = []
    for i, r in enumerate([header, *rows]):
        cells = [getattr(r, f).ljust(w) for f, w in zip(("check", "result", "target", "status"), widths)]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (gloo): the test suite's form")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu for the CPU form", file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    from megatron_lpreg.parallel import destroy_distributed, init_distributed
    from tests.model.tiny_models import TINY_CONFIGS

    shapes = CPU_SHAPES if args.cpu else GPU_SHAPES
    ctx = init_distributed(tp_size=1, backend="gloo" if args.cpu else None)
    device = ctx.device
    started = time.perf_counter()
    rows = [parity_row(f"{family} (tiny)", config, device) for family, config in TINY_CONFIGS.items()]
    rows.append(parity_row(*shapes.parity_big, device))
    rows += mfu_and_memory_rows(shapes, device)
    rows.append(loss_row(shapes, device, ctx))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        rows.append(grpo_row(device, Path(tmp)))  # last: the trainer sets up the process groups anew
    destroy_distributed()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--cpu: tiny shapes)"
    print(f"gpu_check on {where}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s")
    print(format_table(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
