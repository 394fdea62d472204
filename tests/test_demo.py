"""The embedded demo's pieces at toy size: preparation builds a loadable model and prompt files,
and the demo config trains on them at TP=2 through the command line (ranks started for us)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megatron_lpreg.config import load_config
from megatron_lpreg.metrics_file import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny_cpu" / "config.yaml"


def test_demo_config_is_tp2_with_validation():
    cfg = load_config(CONFIG)
    assert cfg.parallel.tp == 2 and cfg.loss.enabled and cfg.validation.files
    assert Path(cfg.model.path).parent == Path(cfg.data.train_files[0]).parent


def test_prepare_then_train_two_steps(tmp_path):
    sys.path.insert(0, str(ROOT))
    from examples.tiny_cpu.prepare import DATA_FILES, is_complete, prepare

    data = tmp_path / "data"
    # The prompts alone first (no model): then the full build takes the directory over, same prompts.
    proc = subprocess.run([sys.executable, "-m", "examples.tiny_cpu.prepare", "--out", str(data), "--data-only",
                           "--train-size", "64", "--val-size", "8"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(data)) == sorted(DATA_FILES) and not is_complete(data)
    prompts = {name: (data / name).read_bytes() for name in DATA_FILES}
    prepare(data, train_size=64, val_size=8, warmup_steps=3, log=lambda *a: None)
    assert is_complete(data) and (data / "model" / "config.json").exists()
    assert {name: (data / name).read_bytes() for name in DATA_FILES} == prompts
    prepare(data, log=lambda *a: None)  # complete: nothing to do, nothing changes
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lpreg.cli", "train", "--config", str(CONFIG), f"run_dir={run}",
         f"model.path={data / 'model'}", f"data.train_files=[{data / 'train.jsonl'}]",
         f"validation.files=[{data / 'val.jsonl'}]", "grpo.steps=2", "validation.every=2",
         "validation.max_samples=4", "rollout.max_tokens=16", "validation.max_tokens=16", "checkpoint.every=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "val/arith_easy/avg@4" in rows[0] and rows[2]["optim/steps"] == 1
    assert (run / "checkpoints" / "step_000002" / "lpreg_checkpoint.json").exists()


def test_the_demo_config_with_another_model_makes_the_demo_prompts(tmp_path):
    """`train` with the demo config and a model of one's own: the prompts are generated (no model
    warm-up); a missing demo prompt file otherwise says how to make it."""
    from megatron_lpreg.config import ConfigError
    from megatron_lpreg.inputs import check_inputs
    from tests.grpo.tiny_run import make_policy_dir

    policy = make_policy_dir(tmp_path / "policy")
    cfg = load_config(CONFIG, [f"model.path={policy}", f"data.train_files=[{tmp_path / 'tiny_cpu_data' / 'train.jsonl'}]"])
    try:
        check_inputs(cfg)
        raise AssertionError("a missing prompt file passed")
    except ConfigError as e:
        assert str(e) == (f"data.train_files: {tmp_path / 'tiny_cpu_data' / 'train.jsonl'} does not exist (the CPU "
                          f"demo's generated prompts: make them with `python -m examples.tiny_cpu.prepare --out "
                          f"{tmp_path / 'tiny_cpu_data'} --data-only`)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="disabled", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_lpreg.cli", "train", "--config", str(CONFIG),
                           f"model.path={policy}", "--dry-run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    demo_data = tmp_path / "runs" / "tiny_cpu_data"
    assert sorted(os.listdir(demo_data)) == ["train.jsonl", "val.jsonl"]  # prompts only, no model
    assert "dry run: rank 1/2" in proc.stdout
