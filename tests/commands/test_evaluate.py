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


def test_a_training_checkpoint_is_scored_with_its_runs_template_and_reward(tmp_path):
    """No --config: run_dir/config.yaml beside run_dir/checkpoints/step_N gives the template (raw)
    and the reward function (verl's signature); every response is written."""
    from checkpoint_tools.hf_to_megatron import convert
    from megatron_lpreg.config import load_config, save_config

    policy = make_policy_dir(tmp_path / "policy")
    files = make_data(tmp_path / "data")
    run = tmp_path / "run"
    convert(policy, run / "checkpoints" / "step_000001", tp=1, show_progress=False)
    save_config(load_config(None, ["data.template=raw", "reward.function=tests.rewards.hooks:length_score",
                                   "reward.num_workers=1", "validation.samples={aime: 2}",
                                   "validation.max_tokens=8"]), run / "config.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lpreg.cli", "evaluate", "--ckpt", str(run / "checkpoints" / "step_000001"),
         "--data", files["val_aime"], files["val_arith"], "--out", str(tmp_path / "scores.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "scores.responses.jsonl").read_text().splitlines()]
    by_source = {s: [r for r in rows if r["data_source"] == s] for s in ("aime", "arith")}
    assert [len(v) for v in by_source.values()] == [2 * 2, 2]  # 2 prompts each; aime sampled twice
    for source, offset in (("aime", 10.0), ("arith", 0.0)):
        want = [len(r["response"]) / 100 + offset for r in by_source[source]]
        assert [r["reward"] for r in by_source[source]] == want
    avg = "val/aime/avg@2"
    assert scores[avg] == sum(r["reward"] for r in by_source["aime"]) / 4
    records = [json.loads(x) for x in Path(files["val_arith"]).read_text().splitlines()]
    raw = ["\n".join(m["content"] for m in r["prompt"]) if isinstance(r["prompt"], list) else r["prompt"]
           for r in records]
    assert [r["prompt"] for r in by_source["arith"]] == raw  # the raw template, not the default r1_zero
