"""benchmarks/peer_bench.py: the smoke comparison against TRL runs end to end (bench venv:
``pip install -e '.[bench,test]'``), and without TRL it says so and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "peer_bench.py"


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_without_trl_exits_zero_with_one_line(tmp_path):
    block = (
        "import sys, runpy\n"
        "class NoTRL:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'trl' or name.startswith('trl.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, NoTRL())\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--smoke', '--cache-dir', {str(tmp_path)!r}]\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    out = _run(["-c", block], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines() == [
        "peer_bench: TRL is not installed, nothing to compare against: pip install -e '.[bench]' (trl==1.16.0)"]
    assert not any(tmp_path.iterdir())  # nothing was built


def test_smoke_runs_both_systems(tmp_path):
    pytest.importorskip("trl")
    out = _run([str(SCRIPT), "--smoke", "--cache-dir", str(tmp_path)], timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    text = out.stdout
    assert "same ids on both sides: yes" in text
    for name in ("GRPO-ours", "LpReg-ours", "TRL"):
        assert f"iteration 1/1 {name}:" in text
    for label in ("GRPO", "Lp-Reg"):
        line = next(l for l in text.splitlines() if l.startswith(f"{label}: ours/trl = "))
        assert float(line.rsplit("=", 1)[1]) > 0
