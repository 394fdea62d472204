"""Nothing megatron-lpreg starts outlives the process that started it, SIGKILL included.

Every process of a run carries a tag in its environment (``lifetime.TAG_ENV``), so the test finds
them all, whoever adopted them after their parent died.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from megatron_lpreg.lifetime import PARENT_ENV, TAG_ENV, tagged_processes, wait_for_no_tagged
from tests.grpo.tiny_run import make_data, make_policy_dir

ROOT = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 60.0  # they notice within a second; generous for a loaded machine


def _start(argv: list[str], **popen) -> tuple[subprocess.Popen, str]:
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", PARENT_ENV)}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT),
               **{TAG_ENV: tag})
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, **popen), tag


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


HOLDER = """
import sys, time
from megatron_lpreg.rewards import RewardPool
pool = RewardPool(2, timeout_s=30)
pool.grade_batch(["\\\\boxed{\\\\sqrt{2}/2}"], ["\\\\frac{\\\\sqrt{2}}{2}"])  # a worker answers: both started
print(" ".join(map(str, pool.worker_pids())), flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(300)
def test_reward_workers_exit_when_the_process_holding_the_pool_is_killed():
    proc, tag = _start(["-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2, proc.communicate(timeout=5)
        assert {pid for pid, _ in tagged_processes(tag)} >= set(workers)
    finally:
        _kill9(proc)
    assert wait_for_no_tagged(tag, GONE_WITHIN_S) == []


@pytest.mark.timeout(900)
def test_a_training_run_whose_launcher_is_killed_leaves_nothing(tmp_path):
    """The launcher alone gets SIGKILL mid-run: its 2 ranks, the reward worker, megatron's
    checkpoint-writer managers and wandb's service all exit by themselves."""
    policy, data = make_policy_dir(tmp_path / "policy"), make_data(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text("".join(line + "\n" for line in (
        f"model: {{path: {policy}, dtype: float32}}",
        "parallel: {tp: 2, backend: gloo}",
        f"data: {{train_files: [{data['train']}], template: chat}}",
        "rollout: {n: 2, max_tokens: 8}",
        "reward: {num_workers: 1}",  # the math grader's worker pool (not a plain function)
        "grpo: {steps: 200, prompts_per_step: 2, mini_batch_prompts: 2, micro_batch_tokens: 512}",
        "validation: {every: 0}",
        "checkpoint: {every: 1}",
        "logging: {console: false, wandb_mode: offline}")))
    run_dir = tmp_path / "run"
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115
    proc, tag = _start(["-m", "megatron_lpreg.cli", "train", "--config", str(config), f"run_dir={run_dir}"],
                       stdout=log, stderr=subprocess.STDOUT)
    try:
        marker = run_dir / "checkpoints" / "step_000001" / "lpreg_checkpoint.json"
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.exists(), (tmp_path / "run.log").read_text()[-3000:]
        running = tagged_processes(tag)
        # launcher, 2 ranks, the reward worker, a writer manager per rank (wandb's service besides)
        assert len(running) >= 6, running
    finally:
        _kill9(proc)
        log.close()
    left = wait_for_no_tagged(tag, GONE_WITHIN_S)
    assert left == [], (left, (tmp_path / "run.log").read_text()[-3000:])
