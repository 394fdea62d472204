"""Typed run configuration: dataclasses, a YAML file, and dotted ``key=value`` overrides.

    cfg = load_config("examples/tiny_cpu/config.yaml", ["grpo.steps=3", "loss.preset=grpo"])

Defaults are the published Lp-Reg settings (docs/lp_reg.md section 6); a YAML file only states what
differs. Every value is checked against its field's type when loaded, and a bad key or value is an
error naming the file, the line and the dotted key. ``loss`` is :class:`LossConfig`:
:class:`~megatron_lpreg.loss.LpRegConfig` plus ``loss.preset`` (``grpo``, ``clip_higher``, ``gspo``,
...: the baseline's fields, then the file's own ``loss`` fields on top). The preset's name is kept,
so the resolved config.yaml of a run says which loss it trained with.

The sections, their allowed values and limits live here; reading YAML with line numbers and the
per-type checks are :mod:`megatron_lpreg.typed_yaml`, which knows nothing of the sections.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_lpreg.loss.config import PRESETS, LpRegConfig
from megatron_lpreg.policy.lr_schedule import LRSchedule
from megatron_lpreg.model.build import RECOMPUTE
from megatron_lpreg.typed_yaml import ConfigError, Source, coerce, parse_override, read_yaml

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "GRPOConfig", "LoggingConfig", "LossConfig",
    "MismatchConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "RewardConfig", "RolloutConfig",
    "ValidationConfig", "config_to_dict", "load_config", "save_config",
]


@dataclass
class ModelConfig:
    path: str = ""  # HF model directory: config.json, tokenizer, *.safetensors
    tokenizer: str | None = None  # default: ``path``
    load: str | None = None  # start from this megatron-lpreg checkpoint instead of the HF weights
    dtype: str = "bfloat16"  # parameters and compute; fp32 master weights live in the optimiser
    use_te: bool | None = None  # null: Transformer Engine layers when it imports and CUDA is present
    recompute: str = "none"  # full: re-run each layer in the backward (saves activations for long responses)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size; data-parallel size = world size / tp
    backend: str | None = None  # null: nccl with CUDA, else gloo
    timeout_s: float = 1800.0  # a hung collective fails after this long
    # Processes `megatron-lpreg train` starts on this machine when not launched by torchrun
    # (default: tp, i.e. one model replica); under torchrun the launcher decides.
    nproc: int | None = None


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # verl-schema prompt files (.jsonl, .parquet)
    prompt_key: str = "prompt"  # a chat message list or a string
    data_source_key: str = "data_source"  # groups validation scores (val/<source>/avg@k)
    ground_truth_key: str = "reward_model.ground_truth"  # dotted path into the row
    template: str = "r1_zero"  # r1_zero: the paper's prompt; chat: the tokenizer's chat template; raw: as is
    max_prompt_len: int = 2048  # longer prompts keep their last tokens (counted)
    on_error: str = "raise"  # what a malformed row does (skip: count it and go on)
    shuffle: bool = True  # reshuffled every epoch from grpo.seed (resumable)
    max_samples: int | None = None  # use only the first N prompts


@dataclass
class RolloutConfig:
    engine: str = "auto"  # auto: vllm with CUDA when vllm is installed, else hf (transformers)
    n: int = 8  # responses per prompt
    temperature: float = 1.0  # sampling temperature of the training rollouts
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # 0 = off
    max_tokens: int = 8192  # response length
    max_batch_size: int = 64  # sequences per generate call (hf engine)
    refit_bucket_mb: int = 512  # weights stream into the engine in buckets of at most this size
    refit_shared_memory: bool = True  # hf engine on CPU: each TP rank writes its shards straight into the engine's weights in /dev/shm (no buckets); falls back to buckets where a rank cannot map it
    gpu_memory_utilization: float = 0.5  # vllm, colocated with the trainer
    tp: int | None = None  # vllm engine tensor-parallel size; null: parallel.tp; must divide parallel.tp


@dataclass
class RewardConfig:
    num_workers: int = 4  # grader processes (math-verify)
    timeout_s: float = 5.0  # per answer
    memory_mb: int | None = 1024  # per worker
    # "module:function" instead of the math grader, in the reward workers with their limits: verl's
    # compute_score(data_source, solution_str, ground_truth, extra_info=None) or fn(response, ground_truth).
    function: str | None = None
    # DAPO soft overlong punishment, for a response of L tokens: reward += min(0, -(L - (max_tokens - B)) / B * penalty)
    overlong_buffer: int = 0  # B: DAPO's soft overlong punishment over the last B tokens of rollout.max_tokens; 0 = off
    overlong_penalty: float = 1.0  # the penalty at rollout.max_tokens (DAPO: 1.0)
    mask_truncated: bool = False  # DAPO overlong filtering: responses cut at rollout.max_tokens get no loss


@dataclass
class GRPOConfig:
    steps: int = 500  # rollout steps
    prompts_per_step: int = 256  # prompts per rollout step (global batch = prompts_per_step * rollout.n)
    mini_batch_prompts: int = 256  # == prompts_per_step: on-policy (one optimiser step per rollout)
    epochs: int = 1  # passes over each rollout
    micro_batch_tokens: int = 16384  # token budget per micro-batch (padded tokens)
    pad_to_multiple: int = 1  # pad micro-batch lengths to a multiple (8 helps tensor cores)
    pack_sequences: bool = False  # short sequences share rows (block-diagonal mask; THD with Transformer Engine)
    adv_eps: float = 1e-6  # advantage = (r - mean) / (std + adv_eps) within a prompt's group
    normalize_adv_std: bool = True  # false: Dr. GRPO style, r - mean only
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards, sample more prompts until prompts_per_step are kept
    max_sampling_rounds: int = 10  # cap on generation rounds per step; then train on the groups kept
    seed: int = 1234  # data order, sampling and model init streams
    max_consecutive_skips: int = 10  # skipped (non-finite) optimiser steps in a row that stop the run; 0 = never


@dataclass
class MismatchConfig:
    """Rollout/training mismatch corrections (grpo/mismatch.py); its metrics are always logged."""

    # Truncated importance sampling: each token's policy-gradient term is multiplied by
    # min(exp(l_old - l_engine), tis_cap); null = off.
    tis_cap: float | None = None
    # Sequences whose mean |l_old - l_engine| exceeds this get loss mask 0; null = off.
    mask_seq_abs_diff: float | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-6  # the peak rate (constant unless a warm-up or decay is set)
    # Schedule in GRPO steps, megatron-core's OptimizerParamScheduler (policy/lr_schedule.py).
    lr_warmup_steps: int = 0  # linear from lr_warmup_init to lr over these steps; 0 = none
    lr_warmup_init: float = 0.0  # the rate of step 1 under a warm-up
    lr_decay_style: str = "constant"  # after warm-up: constant, linear or cosine down to min_lr
    lr_decay_steps: int = 0  # the step at which a decay reaches min_lr; 0 = grpo.steps
    min_lr: float = 0.0  # where a decay ends
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    eps: float = 1e-8  # AdamW
    weight_decay: float = 0.0  # AdamW, decoupled
    clip_grad: float = 1.0  # global gradient-norm clip (over TP and DP); 0 = off
    # ZeRO-1: fp32 masters and AdamW moments sharded over data-parallel ranks (used when DP > 1).
    distributed_optimizer: bool = True


@dataclass
class ValidationConfig:
    files: list[str] = field(default_factory=list)  # held-out prompt files; empty = no validation
    every: int = 8  # steps; 0 = never
    at_start: bool = True  # score the initial policy too
    # data_source -> samples per prompt (avg@k) at ``sampled_temperature``; other sources: greedy, 1.
    samples: dict[str, int] = field(default_factory=lambda: {"aime": 16, "aime25": 16, "amc": 16})
    sampled_temperature: float = 0.6  # temperature of the avg@k sources
    max_tokens: int | None = None  # default: rollout.max_tokens
    max_samples: int | None = None  # prompts per file


@dataclass
class LossConfig(LpRegConfig):
    # Shadows LpRegConfig.preset (the classmethod) on this class: build one with load_config.
    preset: str = "lp_reg"  # the baseline whose fields the section starts from (table below)


@dataclass
class CheckpointConfig:
    every: int = 64  # steps; 0 = only at the end
    resume: str = "auto"  # auto: latest complete checkpoint in run_dir/checkpoints | never | a path
    keep_last: int | None = None  # delete older step checkpoints (None: keep all)
    save_at_end: bool = True  # a checkpoint of the final step
    hf_every: int = 0  # steps: a plain HF directory run_dir/hf/step_N (and one at the end); 0 = never
    save_best: bool = False  # also a checkpoint at each validation that improves val/mean (kept by keep_last)


@dataclass
class LoggingConfig:
    backends: list[str] = field(default_factory=lambda: ["wandb"])  # besides metrics.jsonl: wandb, tensorboard
    wandb_project: str | None = None  # None: wandb offline in run_dir
    wandb_mode: str | None = None  # online | offline | disabled (default: offline without a project)
    wandb_name: str | None = None  # run name (also the legend in `megatron-lpreg plot`)
    wandb_entity: str | None = None  # wandb team or user
    console: bool = True  # progress bar and a line per step on rank 0
    peak_tflops: float | None = None  # this device's peak for perf/mfu (e.g. a GPU's datasheet); null: measured at start
    # sampled_p/*: histogram of pi_old(sampled token), low-probability tokens inside/outside the min-p
    # support (loss.kappa). With Lp-Reg off this adds one vocabulary partition sum per scoring pass.
    sampled_token_metrics: bool = True
    samples_per_step: int = 8  # responses per step and per validation source written to samples.jsonl; 0 = none
    samples_max_mb: float = 64.0  # samples.jsonl past this size moves to samples.jsonl.1 (the one older file kept)


@dataclass
class Config:
    run_dir: str = "runs/default"  # config.yaml, metrics.jsonl, checkpoints/, wandb/, plots/
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mismatch: MismatchConfig = field(default_factory=MismatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.recompute": RECOMPUTE,
    "data.template": ("r1_zero", "chat", "raw"),
    "data.on_error": ("raise", "skip"),
    "rollout.engine": ("auto", "hf", "vllm"),
    "parallel.backend": (None, "gloo", "nccl"),
    "logging.wandb_mode": (None, "online", "offline", "disabled"),
    "optim.lr_decay_style": ("constant", "linear", "cosine"),
}
_POSITIVE = (
    "parallel.tp", "rollout.n", "rollout.max_tokens", "rollout.max_batch_size", "rollout.refit_bucket_mb",
    "reward.num_workers", "grpo.prompts_per_step", "grpo.mini_batch_prompts", "grpo.epochs",
    "grpo.micro_batch_tokens", "grpo.pad_to_multiple", "data.max_prompt_len", "grpo.max_sampling_rounds",
)
_NON_NEGATIVE = ("grpo.steps", "grpo.max_consecutive_skips", "validation.every", "checkpoint.every", "optim.lr",
                 "optim.weight_decay", "reward.timeout_s", "reward.overlong_buffer", "reward.overlong_penalty",
                 "checkpoint.hf_every", "optim.lr_warmup_steps", "optim.lr_decay_steps", "optim.min_lr",
                 "optim.lr_warmup_init", "logging.samples_per_step")


# ------------------------------------------------------------------------------------- loading
def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _merge(raw: dict, values: dict[str, dict], sources: dict[str, Source], source: Source) -> None:
    """Fold one file's (or the overrides') nested mapping into ``values[section][field]``."""
    top = _fields(Config)
    for section, body in raw.items():
        if section not in top:
            raise ConfigError(f"{source.where(section)}: unknown key; known: {sorted(top)}")
        if section == "run_dir":
            values.setdefault("", {})["run_dir"] = body
            sources["run_dir"] = source
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source.where(section)}: expected a mapping of {section} settings, got {body!r}")
        cls = _hints(Config)[section]
        known = set(_fields(cls))
        for key, value in body.items():
            dotted = f"{section}.{key}"
            if key not in known:
                raise ConfigError(f"{source.where(dotted)}: unknown key; {section} has {sorted(known)}")
            values.setdefault(section, {})[key] = value
            sources[dotted] = source


def _build_section(section: str, cls, given: dict, sources: dict[str, Source]):
    hints = _hints(cls)
    kwargs = {}
    for key, value in given.items():
        dotted = f"{section}.{key}"
        kwargs[key] = coerce(value, hints[key], sources[dotted].where(dotted))
    try:
        if cls is LossConfig:
            return _loss_section(kwargs, sources)
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        keys = [k for k in given if k != "preset"]
        # The dataclass names the bad field in its message: point at that key's line when it was given.
        named = [k for k in keys if f".{k}=" in str(e) or f" {k} " in str(e)]
        if named:
            dotted = f"{section}.{named[0]}"
            raise ConfigError(f"{sources[dotted].where(dotted)}: {e}") from None
        where = sources[f"{section}.{keys[0]}"].name if keys else "config"
        raise ConfigError(f"{where}: {section}: {e}") from None


def _loss_section(kwargs: dict, sources: dict[str, Source]) -> LossConfig:
    """The preset's fields under the given ones, applied by LpRegConfig.preset (the one place)."""
    preset = kwargs.pop("preset", LossConfig.preset)
    if preset not in PRESETS:
        raise ConfigError(f"{sources['loss.preset'].where('loss.preset')}: unknown preset {preset!r}; "
                          f"known: {sorted(PRESETS)}")
    resolved = LpRegConfig.preset(preset, **kwargs)
    return LossConfig(**{f.name: getattr(resolved, f.name) for f in dataclasses.fields(resolved)}, preset=preset)


def _check(cfg: Config, sources: dict[str, Source]) -> None:
    def where(key):
        src = sources.get(key)
        return src.where(key) if src else f"default {key}"

    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{where(key)}: {value!r} is not one of {[a for a in allowed]}")
    for key in _POSITIVE + _NON_NEGATIVE:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < 0 or (key in _POSITIVE and value == 0):
            kind = "positive" if key in _POSITIVE else "non-negative"
            raise ConfigError(f"{where(key)}: must be {kind}, got {value!r}")
    unknown = [b for b in cfg.logging.backends if b not in ("wandb", "tensorboard")]
    if unknown:
        raise ConfigError(f"{where('logging.backends')}: {unknown[0]!r} is not one of ['wandb', 'tensorboard']")
    if cfg.logging.peak_tflops is not None and cfg.logging.peak_tflops <= 0:
        raise ConfigError(f"{where('logging.peak_tflops')}: must be positive, got {cfg.logging.peak_tflops!r}")
    if cfg.rollout.n < 2:
        raise ConfigError(f"{where('rollout.n')}: {cfg.rollout.n} responses per prompt; group advantages need at least 2")
    g = cfg.grpo
    if g.prompts_per_step % g.mini_batch_prompts:
        raise ConfigError(
            f"{where('grpo.mini_batch_prompts')}: {g.mini_batch_prompts} does not divide "
            f"grpo.prompts_per_step={g.prompts_per_step}")
    if cfg.reward.overlong_buffer > cfg.rollout.max_tokens:
        raise ConfigError(f"{where('reward.overlong_buffer')}: {cfg.reward.overlong_buffer} exceeds "
                          f"rollout.max_tokens={cfg.rollout.max_tokens}")
    if not 0.0 < cfg.rollout.top_p <= 1.0 or cfg.rollout.temperature < 0:
        raise ConfigError(f"{where('rollout.top_p')}: need 0 < top_p <= 1 and temperature >= 0")
    for key in ("mismatch.tis_cap", "mismatch.mask_seq_abs_diff"):
        value = getattr(cfg.mismatch, key.split(".")[1])
        if value is not None and not value > 0:
            raise ConfigError(f"{where(key)}: must be positive (or null: off), got {value!r}")
    try:
        LRSchedule.from_config(cfg.optim, cfg.grpo.steps)
    except ValueError as e:
        raise ConfigError(f"{where('optim.' + str(e).split('=')[0])}: optim.{e}") from None
    if cfg.rollout.tp is not None and (cfg.rollout.tp < 1 or cfg.parallel.tp % cfg.rollout.tp):
        raise ConfigError(f"{where('rollout.tp')}: {cfg.rollout.tp} must divide parallel.tp={cfg.parallel.tp} "
                          f"(every engine lives inside one trainer replica's TP group)")
    if cfg.checkpoint.resume not in ("auto", "never") and not cfg.checkpoint.resume:
        raise ConfigError(f"{where('checkpoint.resume')}: auto, never, or a checkpoint path")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The run configuration: defaults < the YAML file (if any) < ``key=value`` overrides."""
    values: dict[str, dict] = {}
    sources: dict[str, Source] = {}
    if path is not None:
        raw, source = read_yaml(Path(path))
        _merge(raw, values, sources, source)
    cli = Source("command line")
    for item in overrides:
        _merge(parse_override(item), values, sources, cli)
    kwargs: dict[str, Any] = {}
    if "run_dir" in values.get("", {}):
        kwargs["run_dir"] = coerce(values[""]["run_dir"], str, sources["run_dir"].where("run_dir"))
    for section, cls in _hints(Config).items():
        if section != "run_dir":
            kwargs[section] = _build_section(section, cls, values.get(section, {}), sources)
    cfg = Config(**kwargs)
    _check(cfg, sources)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and wandb."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, float) and v == float("inf"):
            return "inf"
        return v

    out = plain(dataclasses.asdict(cfg))
    out["loss"] = {"preset": out["loss"].pop("preset"), **out["loss"]}  # first: the fields below refine it
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved configuration (atomically) so a run directory says how it was made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
