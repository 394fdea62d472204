"""The ``megatron-lpreg`` command line, run as a user runs it (a separate process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_lpreg.metrics_file import read_metrics
from tests.grpo.tiny_run import make_data, make_policy_dir
from tests.tables import table_row

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=300):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_lpreg.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _tiny_run_config(tmp_path, steps: int, *more_lines: str) -> Path:
    """A run YAML for the tiny policy and arithmetic prompts (parity reward, 2 x 2 responses)."""
    policy = make_policy_dir(tmp_path / "policy")
    data = make_data(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text("".join(line + "\n" for line in (
        f"model: {{path: {policy}, dtype: float32}}",
        f"data: {{train_files: [{data['train']}], template: chat}}",
        "rollout: {n: 2, max_tokens: 8}",
        "reward: {function: 'tests.grpo.tiny_run:parity_reward'}",
        f"grpo: {{steps: {steps}, prompts_per_step: 2, mini_batch_prompts: 2, micro_batch_tokens: 512}}",
        *(line.format(**data) for line in more_lines))))
    return config


def test_train_writes_metrics_and_a_checkpoint(tmp_path):
    config = _tiny_run_config(tmp_path, 2, "validation: {{every: 0}}")
    run_dir = tmp_path / "run"
    proc = _cli("train", "--config", str(config), f"run_dir={run_dir}", "logging.console=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    assert "step 2/2" in proc.stdout
    assert f"run summary: {run_dir}" in proc.stdout and "training reward (reward/mean)" in proc.stdout
    assert (run_dir / "checkpoints" / "step_000002" / "lpreg_checkpoint.json").exists()
    assert (run_dir / "config.yaml").exists()
    # A training checkpoint is a model checkpoint: the converter turns it back into HF weights.
    hf_out = tmp_path / "hf_out"
    conv = subprocess.run([sys.executable, "-m", "checkpoint_tools.megatron_to_hf", "--ckpt",
                           str(run_dir / "checkpoints" / "step_000002"), "--out", str(hf_out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]
    assert list(hf_out.glob("*.safetensors")) and (hf_out / "config.json").exists()


def test_bad_settings_exit_2_naming_the_place(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("grpo:\n  steps: 3\n  prompts_per_stepp: 8\n")
    proc = _cli("train", "--config", str(config))
    assert proc.returncode == 2
    assert f"{config}:3: grpo.prompts_per_stepp: unknown key" in proc.stderr
    proc = _cli("train", "grpo.steps=many")
    assert proc.returncode == 2 and "command line: grpo.steps: expected an integer" in proc.stderr
    proc = _cli("train", f"model.path={tmp_path}")
    assert proc.returncode == 2 and "has no config.json" in proc.stderr


def test_train_starts_its_own_ranks_without_torchrun(tmp_path):
    config = _tiny_run_config(tmp_path, 1, "parallel: {{tp: 2, backend: gloo}}")
    env_free = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "megatron_lpreg.cli", "train", "--config", str(config),
                           "--dry-run"], cwd=ROOT, env=env_free, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        assert f"dry run: rank {rank}/2 tp_rank {rank}/2 dp_rank 0/1 backend gloo" in proc.stdout
    assert proc.stdout.count("# resolved configuration") == 1  # printed by rank 0 only


def test_dry_run_makes_the_checks_train_makes(tmp_path):
    """Before any rank starts, as train does: a TP that does not split the model, a model that is not there."""
    config = _tiny_run_config(tmp_path, 1)
    for override, expected in (("parallel.tp=3", "parallel.tp: tp=3 does not divide num_attention_heads=4"),
                               (f"model.path={tmp_path / 'nowhere'}", "is not a directory")):
        proc = _cli("train", "--config", str(config), override, "--dry-run", timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith("megatron-lpreg: error: ") and expected in lines[0], lines[0]
        assert "dry run:" not in proc.stdout


def test_train_warns_once_when_lp_reg_stays_inactive(tmp_path):
    # 2 prompts x 2 responses of <= 8 tokens: rho 0.01 x ~16 negative-advantage tokens gives k = 0.
    config = _tiny_run_config(tmp_path, 6, "validation: {{every: 0}}", "checkpoint: {{every: 0, save_at_end: false}}")
    proc = _cli("train", "--config", str(config), f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Lp-Reg regularised no token in the last 5 steps: k = int(rho x negative-advantage "
                             "tokens) < loss.min_selected=2 in every micro-batch (rho=0.01;") == 1, proc.stderr[-3000:]
    assert all(r["lpreg/selected"] == 0 for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_compare_trains_each_method_and_seed_and_plots_them(tmp_path):
    config = _tiny_run_config(tmp_path, 1, "validation: {{files: [{val_arith}], every: 1, max_tokens: 6}}",
                              "checkpoint: {{every: 0, save_at_end: false}}")
    out = tmp_path / "cmp"
    proc = _cli("compare", "--config", str(config), "--out", str(out), "--methods", "grpo,lpreg", "--seeds", "2",
                "grpo.seed=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method, preset, enabled in (("grpo", "grpo", False), ("lpreg", "lp_reg", True)):
        for seed in (3, 4):
            run_dir = out / method / f"seed{seed}"
            resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert resolved["loss"]["preset"] == preset and resolved["loss"]["enabled"] is enabled
            assert resolved["grpo"]["seed"] == seed
            rows = read_metrics(run_dir / "metrics.jsonl")
            assert [r["step"] for r in rows] == [0, 1]
            assert "sampled_p/hist_19" in rows[1] and "sampled_p/low_share" in rows[1]
    table = (out / "plots" / "comparison.md").read_text()
    assert "## Per method" in table and table in proc.stdout
    per_method = table.split("## Per method")[1]
    assert table_row(per_method, "GRPO")[1] == "2" and table_row(per_method, "Lp-Reg")[1] == "2"
    for name in ("val_accuracy.png", "entropy.png", "token_probability.png"):
        assert (out / "plots" / name).exists(), name
    proc = _cli("compare", "--methods", "grpo,ppo")
    assert proc.returncode == 2 and "unknown ['ppo']" in proc.stdout


def test_megatron_import_notices_are_silenced_in_every_process_that_imports_us():
    """megatron-core's ~8 "Apex / Transformer Engine are not installed" notices: none in a process that
    imports megatron_lpreg first (commands, ranks, the checkpoint tools); all with the opt-out."""
    code = ("import megatron_lpreg, megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs, "
            "megatron.core.models.backends")
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_LPREG_ALL_WARNINGS"}
    quiet = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    loud = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "MEGATRON_LPREG_ALL_WARNINGS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    assert "not installed" not in quiet.stderr, quiet.stderr
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("transformer_engine", "apex")):  # the notices exist here
        assert loud.stderr.count("not installed") >= 3, loud.stderr
