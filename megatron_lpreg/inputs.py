"""The files a run reads, checked to exist before any rank starts or any model is built.

Both the launching process (commands/preflight.py, before it starts the ranks) and the trainer (a
run started by torchrun, where no launcher checked) call :func:`check_inputs`.
"""

from __future__ import annotations

from pathlib import Path

from megatron_lpreg.config import Config, ConfigError


def check_inputs(cfg: Config) -> None:
    """The model directory and prompt files a run reads exist; ConfigError naming the key otherwise."""
    model = Path(cfg.model.path)
    if not cfg.model.path or not model.is_dir():
        raise ConfigError(f"model.path: {cfg.model.path or '(not set)'} is not a directory (a HF model directory is expected)")
    if not (model / "config.json").is_file():
        raise ConfigError(f"model.path: {model} has no config.json (a HF model directory is expected)")
    if not cfg.data.train_files:
        raise ConfigError("data.train_files: no training prompt files given")
    for key, files in (("data.train_files", cfg.data.train_files), ("validation.files", cfg.validation.files)):
        for name in files:
            if not Path(name).is_file():
                raise ConfigError(f"{key}: {name} does not exist{_how_to_make(Path(name))}")


def _how_to_make(path: Path) -> str:
    # The CPU demo's generated prompts (examples/tiny_cpu/config.yaml), the one file set we know how to make.
    if path.parent.name == "tiny_cpu_data" and path.name in ("train.jsonl", "val.jsonl"):
        return (f" (the CPU demo's generated prompts: make them with `python -m examples.tiny_cpu.prepare "
                f"--out {path.parent} --data-only`)")
    return ""
