"""benchmarks/lpreg_cost_bench.py runs end to end on a tiny policy and reports both passes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_paired_cost_on_a_tiny_policy(assets, tmp_path):
    policy, data = assets
    spec = importlib.util.spec_from_file_location("lpreg_cost_bench", ROOT / "benchmarks" / "lpreg_cost_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cost.json"
    assert bench.main([
        "--config", str(ROOT / "examples" / "explore_cpu" / "config.yaml"), "--pairs", "2", "--steps", "1",
        "--json", str(out), f"model.path={policy}", f"data.train_files=[{data['train']}]",
        "rollout.max_tokens=12", "rollout.n=4", "grpo.prompts_per_step=4", "grpo.mini_batch_prompts=4",
        "reward.function=tests.grpo.rewards:parity_reward", "loss.rho=0.2",
    ]) == 0
    res = json.loads(out.read_text())
    assert res["sequences"] == 16 and res["step_s"] > 0
    for kind in ("update", "scoring"):
        assert res[kind]["lpreg_ms"] > 0 and res[kind]["grpo_ms"] > 0 and res[kind]["ratio"] > 0
