"""examples/explore_cpu: the exploration study's generated task (deterministic, the two routes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from examples.explore_cpu import prepare as ex
from megatron_lpreg.config import load_config
from megatron_lpreg.rewards import grade


def test_problems_are_deterministic_and_split_by_carry():
    a, b = ex.problems(200, 5), ex.problems(200, 5)
    assert a == b and a != ex.problems(200, 6)
    for row in a:
        x, y = map(int, row["extra_info"]["expression"].split(" + "))
        assert 10 <= x <= 99 and 10 <= y <= 99 and row["reward_model"]["ground_truth"] == str(x + y)
        assert row["data_source"] == ("explore_carry" if (x % 10 + y % 10) >= 10 else "explore_plain")
    share = sum(r["data_source"] == "explore_carry" for r in a) / len(a)
    assert 0.3 < share < 0.6  # 45% in expectation


def test_routes_carry_is_always_right_quick_only_without_a_carry():
    for x in range(10, 100, 7):
        for y in range(10, 100, 3):
            for wording in zip(ex.OPENERS, ex.SEPARATORS * 2, ex.ENDINGS * 2):
                carry = ex.response_text(x, y, True, wording)
                quick = ex.response_text(x, y, False, wording)
                assert carry.startswith(f"{wording[0]}Carry:") and quick.startswith(f"{wording[0]}Quick:")
                assert grade(carry, str(x + y)) == 1.0
                assert grade(quick, str(x + y)) == (0.0 if ex.carries(x, y) else 1.0)
    assert ex.response_text(57, 68, False) == "Quick: 7 + 8 = 5, 5 + 6 = 11\n\\boxed{115}"
    assert ex.response_text(57, 68, True, ("So ", " then ", " so ")) == \
        "So Carry: 7 + 8 = 15 then 5 + 6 + 1 = 12 so \\boxed{125}"


def test_wording_draws_are_seeded():
    import random

    a, b = random.Random(3), random.Random(3)
    draws = [ex.draw_wording(a) for _ in range(50)]
    assert draws == [ex.draw_wording(b) for _ in range(50)]
    assert {d[0] for d in draws} == set(ex.OPENERS)


def test_data_only_files(tmp_path):
    assert ex.main(["--out", str(tmp_path / "d"), "--data-only"]) == 0
    first = {n: (tmp_path / "d" / n).read_text() for n in ex.DATA_FILES}
    ex.main(["--out", str(tmp_path / "d"), "--data-only"])
    assert first == {n: (tmp_path / "d" / n).read_text() for n in ex.DATA_FILES}
    val = [json.loads(line) for line in first["val.jsonl"].splitlines()]
    assert {r["data_source"] for r in val} == {"explore_carry", "explore_plain"}
    assert not ex.is_complete(tmp_path / "d")


def test_config_validates_both_problem_kinds():
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "explore_cpu" / "config.yaml")
    assert set(cfg.validation.samples) == {"explore_carry", "explore_plain"}
    assert cfg.grpo.prompts_per_step == cfg.grpo.mini_batch_prompts  # on-policy
    assert re.search(r"explore_cpu_data", cfg.model.path)


def test_route_shares_from_samples(tmp_path, capsys):
    from examples.explore_cpu import routes

    run = tmp_path / "cmp" / "grpo" / "seed0"
    run.mkdir(parents=True)
    rows = [{"step": s, "kind": "train", "response": "Carry: 1 + 2 = 3" if i < s else "Quick: 1 + 2 = 3"}
            for s in (1, 2) for i in range(4)] + [{"step": 2, "kind": "val", "response": "Carry:"}]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert routes.route_shares(run / "samples.jsonl") == {1: 0.25, 2: 0.5}
    assert routes.main([str(tmp_path / "cmp")]) == 0
    assert "| grpo | 1 | 0.250" in capsys.readouterr().out


def test_soften_divides_the_logits(assets, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    policy = tmp_path / "policy"
    shutil.copytree(assets[0], policy)
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    before = AutoModelForCausalLM.from_pretrained(policy)(ids).logits
    ex.soften_model(policy, 1.5)
    after = AutoModelForCausalLM.from_pretrained(policy)(ids).logits
    torch.testing.assert_close(after, before / 1.5, rtol=1e-4, atol=1e-5)
