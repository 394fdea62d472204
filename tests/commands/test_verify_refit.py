"""``megatron-lpreg verify-refit``: engine log-probs against the Megatron forward after a refit.

At TP=2 with the transformers engine the check passes (float32: ~1e-6); an engine weight changed
after the refit makes it fail; the command line reports one line and exits 1 above --threshold.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.distributed import run_distributed
from tests.grpo.tiny_run import make_policy_dir
from tests.test_cli import _cli


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return str(make_policy_dir(tmp_path_factory.mktemp("verify_refit") / "policy"))


def _perturb_embedding(directory):
    """An engine weight that differs from the trainer's after the refit (sent through the protocol)."""
    from pathlib import Path

    from safetensors.torch import load_file

    name = "model.embed_tokens.weight"
    weight = next(load_file(f)[name] for f in Path(directory).glob("*.safetensors") if name in load_file(f))
    noisy = weight + 0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    return lambda engine: engine.update_weights([(name, noisy)])


def _body(ctx, directory):
    from megatron_lpreg.config import load_config
    from megatron_lpreg.commands.verify_refit import check

    cfg = load_config(None, [f"model.path={directory}", f"parallel.tp={ctx.tp_size}", "rollout.engine=hf",
                             "model.dtype=float32"])
    clean = check(cfg, max_tokens=16)
    broken = check(cfg, max_tokens=16, after_refit=_perturb_embedding(directory))
    return clean, broken


def test_tp2_refit_into_hf_engine_passes_and_a_changed_weight_fails(policy):
    from megatron_lpreg.commands.verify_refit import DEFAULT_THRESHOLD

    results = run_distributed(_body, 2, 2, args=(policy,), timeout_s=300)
    assert results[1] == (None, None)  # rank 0 reports
    clean, broken = results[0]
    print(f"\nverify-refit hf tp=2 float32: {clean}\nafter perturbing the engine: {broken}")
    assert clean["tp"] == 2 and clean["engine"] == "hf" and clean["sequences"] == 8
    assert clean["tokens"] > 8 * 16  # prompts + sampled continuations
    assert clean["mismatch/seq_max_abs_diff"] < 1e-5
    assert clean["mismatch/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-5)
    assert broken["mismatch/seq_max_abs_diff"] > 10 * DEFAULT_THRESHOLD
    assert broken["mismatch/token_mult_prob_error"] > 1.001


def test_command_line_prints_one_line_and_exits_1_above_the_threshold(policy):
    proc = _cli("verify-refit", "--model", policy, "--engine", "hf", "--max-tokens", "8", "--threshold", "1e-9")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("verify-refit:")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    fields = dict(re.findall(r"(\w+)=(\S+)", lines[0]))
    # float32 rounding (~1e-6) is above a threshold of 1e-9, and far below the default 1e-3.
    assert proc.returncode == 1 and lines[0].startswith("verify-refit: FAIL"), lines[0]
    assert 0 < float(fields["seq_max_abs_diff"]) < 1e-5
    assert float(fields["logprob_abs_diff"]) <= float(fields["seq_max_abs_diff"])
    assert fields["engine"] == "hf" and fields["tp"] == "1" and fields["dtype"] == "float32"


def test_without_a_model_exits_2_in_one_line(tmp_path):
    proc = _cli("verify-refit", "--model", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("megatron-lpreg: error: model.path:")


def test_a_tp_that_does_not_split_the_model_fails_once_before_the_ranks_start(policy):
    proc = _cli("verify-refit", "--model", policy, "--tp", "3")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("megatron-lpreg: error: parallel.tp: tp=3 does not divide"), lines[0]
