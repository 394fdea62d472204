"""``megatron-lpreg evaluate``: the validation protocol on a HF directory and on a megatron-lpreg
checkpoint of the same weights, which must score identically (greedy decoding is deterministic)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.grpo.tiny_run import make_data, make_policy_dir

ROOT = Path(__file__).resolve().parents[2]


def _evaluate(ckpt, data, out):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lpreg.cli", "evaluate", "--ckpt", str(ckpt), "--data", *data,
         "--samples", "aime=2", "--max-tokens", "8", "--template", "chat", "--reward-workers", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(out).read_text())


def test_hf_directory_and_converted_checkpoint_score_the_same(tmp_path):
    from checkpoint_tools.hf_to_megatron import convert

    policy = make_policy_dir(tmp_path / "policy")
    files = make_data(tmp_path / "data")
    data = [files["val_aime"], files["val_arith"]]
    convert(policy, tmp_path / "ckpt", tp=1, show_progress=False)
    hf = _evaluate(policy, data, tmp_path / "hf.json")
    mg = _evaluate(tmp_path / "ckpt", data, tmp_path / "mg.json")
    assert {"val/aime/avg@2", "val/arith/avg@1", "val/mean"} <= set(hf)
    assert hf["val/arith/avg@1"] == mg["val/arith/avg@1"]  # greedy: same weights, same text
    assert hf["val/arith/response_len"] == mg["val/arith/response_len"]


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_lpreg.cli", "evaluate", "--ckpt", str(tmp_path),
                           "--data", "x.jsonl"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "neither a HF model directory nor a complete" in proc.stderr
