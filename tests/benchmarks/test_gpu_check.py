"""benchmarks/gpu_check.py in its --cpu form: the same code as on a GPU at tiny shapes, so the one
GPU command cannot rot between the GPU sessions that run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _table(stdout: str) -> dict[str, tuple[str, str, str]]:
    """check -> (result, target, status), from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "check":
            rows[cells[0]] = tuple(cells[1:])
    return rows


def test_cpu_form_prints_every_row_and_passes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _table(proc.stdout)
    checked = ["parity qwen2 (tiny)", "parity qwen3 (tiny)", "parity llama (tiny)", "parity small qwen2.5 shape",
               "grpo+lpreg bf16, 3 steps"]
    for name in checked:
        assert rows[name][2] == "PASS", (name, rows[name])
    informational = {"train step mfu", "memory train", "memory step", "loss cost"}
    for prefix in informational:  # timed rows: measured, not judged on a shared CPU
        match = [r for name, r in rows.items() if name.startswith(prefix)]
        assert len(match) == 1 and match[0][2] == "info", (prefix, rows)
    assert len(rows) == len(checked) + len(informational)
    assert "gpu_check on CPU (--cpu: tiny shapes)" in proc.stdout
    assert not list(tmp_path.glob("gpu_check_*")), "the run's temporary directory was left behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_the_gpu_form_says_so():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no CUDA device; run with --cpu" in proc.stderr
