"""Run configuration: published defaults, YAML + dotted overrides, and errors that say where."""

from __future__ import annotations

import math

import pytest
import yaml

from megatron_lpreg.config import ConfigError, load_config, parse_override, save_config


def test_defaults_are_the_published_settings():
    cfg = load_config()
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (8, 1.0, 1.0, 0)
    assert (cfg.grpo.prompts_per_step, cfg.grpo.mini_batch_prompts, cfg.grpo.epochs) == (256, 256, 1)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.clip_grad) == (1e-6, (0.9, 0.999), 0.0, 1.0)
    assert (cfg.data.max_prompt_len, cfg.rollout.max_tokens, cfg.data.template) == (2048, 8192, "r1_zero")
    assert (cfg.loss.kappa, cfg.loss.rho, cfg.loss.threshold, cfg.loss.kl, cfg.loss.enabled) == (0.02, 0.01, "minp", "k3", True)
    assert (cfg.validation.every, cfg.validation.sampled_temperature, cfg.checkpoint.every) == (8, 0.6, 64)
    assert cfg.validation.samples == {"aime": 16, "aime25": 16, "amc": 16}


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/a\ngrpo:\n  steps: 5\n  mini_batch_prompts: 32\noptim:\n  lr: 1e-5\n"
                    "loss:\n  preset: clip_higher\n  rho: 0.02\n")
    cfg = load_config(path, ["grpo.steps=7", "data.train_files=a.jsonl", "optim.betas=[0.9, 0.95]",
                             "loss.eps_high=inf"])
    assert cfg.run_dir == "runs/a" and cfg.grpo.steps == 7 and cfg.grpo.mini_batch_prompts == 32
    assert cfg.optim.lr == 1e-5 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.data.train_files == ["a.jsonl"]
    # the preset's fields, then the file's and the command line's on top
    assert (cfg.loss.enabled, cfg.loss.eps_low, cfg.loss.rho) == (False, 0.2, 0.02)
    assert math.isinf(cfg.loss.eps_high)
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("text, overrides, message", [
    ("grpo:\n  steps: 3\n  bogus: 1\n", [], "run.yaml:3: grpo.bogus: unknown key"),
    ("modle:\n  path: x\n", [], "run.yaml:1: modle: unknown key"),
    ("grpo:\n  steps: three\n", [], "run.yaml:2: grpo.steps: expected an integer, got 'three'"),
    ("grpo: [1, 2]\n", [], "run.yaml:1: grpo: expected a mapping"),
    ("grpo:\n  steps: 3\n   x: 1\n", [], "run.yaml:3: not valid YAML"),
    ("", ["model.dtype=fp8"], "command line: model.dtype: 'fp8' is not one of"),
    ("", ["grpo.mini_batch_prompts=100"], "grpo.mini_batch_prompts: 100 does not divide grpo.prompts_per_step=256"),
    ("", ["rollout.n=0"], "command line: rollout.n: must be positive"),
    ("logging:\n  peak_tflops: -1\n", [], "run.yaml:2: logging.peak_tflops: must be positive"),
    ("", ["loss.preset=ppo"], "unknown preset 'ppo'"),
    ("", ["loss.rho=2"], "LpRegConfig.rho=2.0"),
    ("", ["grpo.steps"], "is not key=value"),
])
def test_errors_name_the_place(tmp_path, text, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path, overrides)
    assert message in str(info.value)


def test_override_values_are_yaml():
    assert load_config(None, ["optim.lr=1e-6"]).optim.lr == 1e-6  # YAML 1.1 reads "1e-6" as text
    assert parse_override("a=[x, y]") == {"a": ["x", "y"]}
    assert parse_override("a.b={aime: 4}") == {"a": {"b": {"aime": 4}}}
    assert parse_override("a=") == {"a": None}


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config file"):
        load_config("nope.yaml")


def test_resolved_config_keeps_the_loss_preset(tmp_path):
    cfg = load_config(None, ["loss.preset=gspo", "loss.eps_high=0.001"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["loss"]["preset"] == "gspo" and saved["loss"]["eps_high"] == 0.001
    again = load_config(tmp_path / "config.yaml")  # a run's config.yaml loads back as it was
    assert again.loss == cfg.loss
