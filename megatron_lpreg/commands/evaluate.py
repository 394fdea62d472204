"""Score a checkpoint with the validation protocol: avg@k per ``data_source``.

    megatron-lpreg evaluate --ckpt DIR --data aime24.jsonl math500.parquet [--samples aime=16,amc=16]

``--ckpt`` is a HF model directory or a megatron-lpreg checkpoint (a training step or a converted
model; its weights reach the engine through the same refit as in training). Sources named in
``--samples`` are sampled k times at ``--temperature``; the rest are decoded greedily once.

The run's own settings score it: ``--config`` (a run's ``config.yaml``; by default the one beside
a training checkpoint, ``run_dir/config.yaml`` for ``run_dir/checkpoints/step_N``) gives the prompt
template and length, the prompt file's field names, the reward (``reward.function`` and the
grader's limits) and the validation samples, temperature and length; a flag given overrides it.
Every response lands in ``--responses`` (JSONL rows as in ``samples.jsonl``; default: beside
``--out``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_lpreg.config import ConfigError, load_config


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="HF model directory or megatron-lpreg checkpoint")
    p.add_argument("--data", required=True, nargs="+", help="prompt files (JSONL / Parquet, verl schema)")
    p.add_argument("--config", default=None,
                   help="the run's config.yaml (template, reward, validation settings); default: "
                        "run_dir/config.yaml of a checkpoint under run_dir/checkpoints/")
    p.add_argument("--samples", default=None,
                   help="data_source=k pairs sampled k times (others: greedy once); '' for all greedy "
                        "(default: the config's validation.samples)")
    p.add_argument("--temperature", type=float, default=None, help="temperature of the sampled sources")
    p.add_argument("--max-tokens", type=int, default=None, help="response length")
    p.add_argument("--template", default=None, choices=("r1_zero", "chat", "raw"))
    p.add_argument("--max-prompt-len", type=int, default=None)
    p.add_argument("--max-samples", type=int, default=None, help="prompts per file")
    p.add_argument("--reward-workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the scores as JSON here")
    p.add_argument("--responses", default=None,
                   help="write every response as JSONL here (default: OUT with .responses.jsonl)")


def run_config(args):
    """The run configuration that scores the checkpoint: ``--config``, the one beside a training
    checkpoint, or the defaults; the flags given override it."""
    path = args.config
    if path is None:
        beside = Path(args.ckpt).resolve().parent.parent / "config.yaml"
        if Path(args.ckpt).resolve().parent.name == "checkpoints" and beside.exists():
            path = beside
            print(f"evaluate: the run's settings from {path}")
    cfg = load_config(path, [])
    if args.samples is not None:
        cfg.validation.samples = _samples(args.samples)
    for flag, section, key in (("temperature", cfg.validation, "sampled_temperature"),
                               ("max_tokens", cfg.validation, "max_tokens"), ("template", cfg.data, "template"),
                               ("max_prompt_len", cfg.data, "max_prompt_len"),
                               ("reward_workers", cfg.reward, "num_workers")):
        if getattr(args, flag) is not None:
            setattr(section, key, getattr(args, flag))
    return cfg


def _samples(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        source, sep, k = item.partition("=")
        if not sep or not k.strip().isdigit() or int(k) < 1:
            raise ConfigError(f"--samples: {item!r} is not data_source=k with k >= 1")
        out[source.strip()] = int(k)
    return out


def load_engine(ckpt: Path):
    """(engine, tokenizer directory) for a HF directory or a megatron-lpreg checkpoint."""
    from megatron_lpreg import checkpointing

    if not checkpointing.is_complete(ckpt):
        if not (ckpt / "config.json").exists():
            raise ConfigError(f"--ckpt {ckpt}: neither a HF model directory nor a complete megatron-lpreg checkpoint")
        from megatron_lpreg.rollout.hf_engine import HFEngine

        return HFEngine.from_pretrained(ckpt), ckpt
    from megatron_lpreg.model import parse_hf_config
    from megatron_lpreg.parallel import init_distributed
    from megatron_lpreg.policy.setup import load_policy
    from megatron_lpreg.rollout.build import build_rollout_engine
    from megatron_lpreg.weights.refit import EngineRefit

    # The checkpoint's weights reach a weightless engine as in training: a TP=1 policy, one refit.
    hf = ckpt / checkpointing.HF_DIR
    cfg = load_config(None, [f"model.path={hf}", f"model.load={ckpt}", "model.dtype=float32", "model.use_te=false",
                             "rollout.engine=hf"])
    ctx = init_distributed(1)
    spec = parse_hf_config(hf)
    model = load_policy(cfg.model, spec, tp_rank=0, tp_size=1)
    engine = build_rollout_engine(cfg, hf, spec.max_position_embeddings, None, seed=0)
    EngineRefit(cfg, engine, ctx.tp, ctx.device)(model, spec)
    return engine, hf


def run(args) -> int:
    from transformers import AutoTokenizer

    from megatron_lpreg.data import DataFields, encode_prompts, load_prompt_dataset
    from megatron_lpreg.grpo.validation import validate
    from megatron_lpreg.parallel import destroy_distributed
    from megatron_lpreg.rewards import RewardPool
    from megatron_lpreg.rollout.engine import stop_token_ids
    from megatron_lpreg.samples import sample_rows, write_rows

    cfg = run_config(args)
    d, r, v = cfg.data, cfg.reward, cfg.validation
    responses_path = args.responses or (str(Path(args.out).with_suffix(".responses.jsonl")) if args.out else None)
    graded = []
    try:
        engine, tok_dir = load_engine(Path(args.ckpt))
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            records = load_prompt_dataset(args.data, DataFields(d.prompt_key, d.data_source_key, d.ground_truth_key),
                                          max_samples=args.max_samples)
            prompt_ids, _ = encode_prompts(list(records), tokenizer, d.template, d.max_prompt_len)
            with RewardPool(r.num_workers, timeout_s=r.timeout_s, memory_mb=r.memory_mb,
                            function=r.function or None) as pool:
                scores = validate(engine, pool, tokenizer, records, prompt_ids, v,
                                  max_tokens=v.max_tokens or cfg.rollout.max_tokens,
                                  stop_ids=stop_token_ids(tokenizer, Path(tok_dir)), seed=args.seed, slot=0,
                                  slots=1, group=None, has_engine=True, responses=graded)
        finally:
            engine.close()
    finally:
        destroy_distributed()
    if responses_path:
        Path(responses_path).unlink(missing_ok=True)
        for g in graded:
            write_rows(responses_path, sample_rows(g, tokenizer, step=0, kind="eval"))
        print(f"responses: {responses_path}")
    width = max(len(k) for k in scores)
    for key, value in scores.items():
        print(f"{key:<{width}}  {value:.4f}")
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump({"ckpt": str(args.ckpt), "data": args.data, **scores}, f, indent=2)
        os.replace(tmp, args.out)
    return 0
