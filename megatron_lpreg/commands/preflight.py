"""Everything a run reads, checked in the launching process before any rank starts.

A bad model directory, a TP size that does not split the model, prompt files with a bad row, or a
checkpoint that does not fit would otherwise fail inside every rank at once, each with its own
traceback under torchrun's. Here each fails in one line naming the setting and the file. Only
files are read (configs, indexes, prompt rows); no model is built and no process group started.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_lpreg import checkpointing as ckpt
from megatron_lpreg.config import Config, ConfigError
from megatron_lpreg.inputs import check_inputs

# Fields that must agree between the model and a checkpoint loaded into it (ModelSpec names).
_SHAPE_FIELDS = ("architecture", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_kv_heads", "head_dim", "vocab_size")


def check_run(cfg: Config, world_size: int) -> None:
    """Raise ConfigError, DataError or CheckpointError for the first problem found."""
    check_inputs(cfg)
    spec = check_model(cfg, world_size)
    resume = _resume_path(cfg)
    if resume is not None:
        _check_checkpoint("checkpoint.resume", resume, spec, training=True)
    if cfg.reward.function:
        from megatron_lpreg.rewards.custom import import_function

        try:
            import_function(cfg.reward.function)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check_data(cfg)


def check_model(cfg: Config, world_size: int):
    """The model a run builds (``model.path``, ``model.load``) splits over ``world_size`` processes at
    ``parallel.tp`` and its weights are all there; returns its ModelSpec. Commands that build the model
    without training (verify-refit) check this much."""
    spec = _model_spec(cfg)
    _check_layout(cfg, spec, world_size)
    if not cfg.model.load:
        _check_hf_weights(cfg.model.path)
    else:
        _check_checkpoint("model.load", Path(cfg.model.load), spec, training=False)
    return spec


def _model_spec(cfg: Config):
    from megatron_lpreg.model import ModelConfigError, parse_hf_config

    try:
        return parse_hf_config(cfg.model.path)
    except ModelConfigError as e:
        raise ConfigError(f"model.path: {e}") from None


def _check_layout(cfg: Config, spec, world_size: int) -> None:
    from megatron_lpreg.model import ModelConfigError, check_tp

    tp = cfg.parallel.tp
    if world_size % tp:
        raise ConfigError(f"parallel.tp={tp}: {world_size} processes (parallel.nproc or the launcher's world "
                          f"size) do not form whole tensor-parallel groups")
    try:
        check_tp(spec, tp)
    except ModelConfigError as e:
        raise ConfigError(f"parallel.tp: {e} ({Path(cfg.model.path) / 'config.json'})") from None
    dp = world_size // tp
    for key in ("prompts_per_step", "mini_batch_prompts"):
        value = getattr(cfg.grpo, key)
        if value % dp:
            raise ConfigError(f"grpo.{key}={value} is not divisible by the data-parallel size {dp} "
                              f"({world_size} processes / tp={tp})")


def _check_hf_weights(path: str) -> None:
    from megatron_lpreg.weights.hf_files import HFCheckpoint, HFCheckpointError

    try:
        HFCheckpoint(path)
    except HFCheckpointError as e:
        raise ConfigError(f"model.path: {e}") from None


def _resume_path(cfg: Config) -> Path | None:
    choice = cfg.checkpoint.resume
    if choice == "never":
        return None
    if choice == "auto":
        from megatron_lpreg.policy.training_checkpoint import complete_checkpoints

        found = complete_checkpoints(cfg.run_dir)
        return found[-1][1] if found else None
    return Path(choice)


def _check_checkpoint(key: str, path: Path, spec, *, training: bool) -> None:
    """Complete, of this model's shape (any TP size loads), every shard file present and whole."""
    from megatron_lpreg.model import ModelConfigError, parse_hf_config

    if not path.is_dir():
        raise ConfigError(f"{key}: {path} does not exist")
    try:
        ckpt.describe(path)  # not a checkpoint at all: say so before anything else
    except ckpt.CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None
    hf_config = path / ckpt.HF_DIR / "config.json"
    if hf_config.is_file():
        try:
            held = parse_hf_config(hf_config)
        except ModelConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
        for field in _SHAPE_FIELDS:
            if getattr(held, field) != getattr(spec, field):
                raise ConfigError(f"{key}: {path} holds a model with {field}={getattr(held, field)!r}, model.path "
                                  f"has {field}={getattr(spec, field)!r} (a checkpoint of another model)")
    if training and not (path / "optim").is_dir():
        raise ConfigError(f"{key}: {path} has no optimiser state (optim/): a model checkpoint, not a training "
                          f"checkpoint (start from it with model.load)")
    try:
        ckpt.check_files(path, spec.num_layers)
        if training:
            ckpt.check_dcp_files(path / "optim")
    except ckpt.CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None
    if training:
        from megatron_lpreg.policy.training_checkpoint import STATE_FILE

        state = path / STATE_FILE
        try:
            json.loads(state.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: {state}: cannot read the trainer state ({ckpt.first_line(e)})") from None


def _check_data(cfg: Config) -> None:
    from megatron_lpreg.data import DataFields, load_prompt_dataset

    d = cfg.data
    fields = DataFields(d.prompt_key, d.data_source_key, d.ground_truth_key)
    load_prompt_dataset(d.train_files, fields, d.on_error, max_samples=d.max_samples)
    if cfg.validation.files:
        load_prompt_dataset(cfg.validation.files, fields, d.on_error, max_samples=cfg.validation.max_samples)
