"""The learning-rate schedule (policy/lr_schedule.py) against its formulas, and in a resumed run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_lpreg.metrics_file import read_metrics, run_metrics
from megatron_lpreg.policy.lr_schedule import LRSchedule
from megatron_lpreg.policy.optimizer import PolicyOptimizer
from tests.distributed import run_distributed
from tests.grpo.tiny_run import tiny_config


def _rates(schedule: LRSchedule, steps: int, weight_decay: float = 0.0) -> list[float]:
    opt = PolicyOptimizer(torch.nn.Linear(3, 2), lr=schedule.lr, weight_decay=weight_decay, lr_schedule=schedule)
    out = []
    for step in range(1, steps + 1):
        opt.set_schedule_step(step - 1)
        out.append(opt.lr)
        assert opt.optimizer.param_groups[0]["weight_decay"] == weight_decay
    return out


def test_warmup_then_cosine_and_linear_decay_follow_the_formulas():
    lr, low, init, warm, decay = 1e-3, 1e-4, 1e-5, 3, 7
    for style, coeff in (("cosine", lambda x: 0.5 * (math.cos(math.pi * x) + 1)), ("linear", lambda x: 1 - x)):
        got = _rates(LRSchedule(lr=lr, warmup_steps=warm, warmup_init=init, decay_style=style,
                                decay_steps=decay, min_lr=low), 10)
        for step, rate in enumerate(got, start=1):
            n = step - 1  # completed steps
            if n <= warm:
                want = init + (lr - init) * n / warm
            elif n > decay:
                want = low
            else:
                want = low + coeff((n - warm) / (decay - warm)) * (lr - low)
            assert rate == pytest.approx(want, rel=1e-12), (style, step)
        assert got[0] == init and got[warm] == lr and got[-1] == low


def test_without_a_schedule_the_rate_is_constant():
    assert _rates(LRSchedule(lr=2e-6), 4, weight_decay=0.1) == [2e-6] * 4
    assert _rates(LRSchedule(lr=2e-6, warmup_steps=2), 4) == [0.0, 1e-6, 2e-6, 2e-6]


def _resume(ctx, root, policy, data, overrides):
    from megatron_lpreg.grpo.trainer import GRPOTrainer

    cfg = lambda name: tiny_config(Path(root) / name, policy, data, ctx.tp_size, *overrides)  # noqa: E731
    with GRPOTrainer(cfg("whole")) as trainer:
        trainer.fit()
        whole = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with GRPOTrainer(cfg("split")) as trainer:
        trainer.fit(max_steps=2)
    with GRPOTrainer(cfg("split")) as trainer:
        assert trainer.step == 2
        trainer.fit()
        return all(torch.equal(p, whole[n]) for n, p in trainer.model.named_parameters())


def test_a_resumed_run_continues_the_schedule_bitwise(tmp_path, assets):
    policy, data = assets
    overrides = ("grpo.steps=4", "grpo.mini_batch_prompts=4", "validation.files=[]", "optim.lr_warmup_steps=1",
                 "optim.lr_warmup_init=1e-4", "optim.lr_decay_style=cosine", "optim.min_lr=1e-5")
    assert run_distributed(_resume, world_size=1, tp_size=1, args=(str(tmp_path), policy, data, overrides),
                           timeout_s=400) == [True]
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(whole, split):
        assert run_metrics(a) == run_metrics(b)
    cosine = [1e-5 + 0.5 * (1 + math.cos(math.pi * k / 3)) * (1e-3 - 1e-5) for k in (1, 2)]
    assert [r["optim/lr"] for r in split] == pytest.approx([1e-4, 1e-3, *cosine], rel=1e-12)
