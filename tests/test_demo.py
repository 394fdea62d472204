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
    from examples.tiny_cpu.prepare import is_complete, prepare

    data = tmp_path / "data"
    prepare(data, train_size=64, val_size=8, warmup_steps=3, log=lambda *a: None)
    assert is_complete(data) and (data / "model" / "config.json").exists()
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
