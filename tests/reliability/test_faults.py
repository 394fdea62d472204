"""Faults: a rank killed or hung mid-step, non-finite gradients, a full disk during a checkpoint.

The kill tests run the CLI as a user does (its launcher starts the two gloo ranks) with
``MEGATRON_LPREG_FAULT`` set, as ``benchmarks/fault_matrix.py`` does for every kill point.
"""

from __future__ import annotations

import errno
import math
import os
import time
from pathlib import Path

import pytest
import torch

from benchmarks import fault_matrix as fm
from megatron_lpreg.faults import Fault, parse_faults
from megatron_lpreg.policy.training_checkpoint import complete_checkpoints
from megatron_lpreg.metrics_file import read_metrics
from tests.distributed import run_distributed
from tests.grpo.tiny_run import tiny_config


def test_fault_spec_parses_and_matches():
    kill, nan = parse_faults("train:3:1, optimizer:2+:nan")
    assert kill == Fault("train", 3, False, 1, "kill") and nan == Fault("optimizer", 2, True, None, "nan")
    assert kill.matches("train", 3, rank=1) and not kill.matches("train", 3, rank=0)
    assert not kill.matches("train", 4, rank=1) and not kill.matches("optimizer", 3, rank=1)
    assert nan.matches("optimizer", 5, rank=0) and not nan.matches("optimizer", 1, rank=0)
    for bad in ("trian:3", "train", "train:x", "train:3:explode", "train:3:1:kill:9"):
        with pytest.raises(ValueError, match="MEGATRON_LPREG_FAULT: bad entry"):
            parse_faults(bad)


@pytest.fixture(scope="module")
def cli_config(tmp_path_factory):
    return fm.write_config(tmp_path_factory.mktemp("faults"), 2, 1)


def _run(config, run_dir, fault=None):
    log = Path(f"{run_dir}.log")
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = fm.start(config, run_dir, fault, f)
        code = fm.wait(proc)
    # Nothing the run started outlives it, killed or not (megatron's checkpoint-writer manager did).
    assert fm.leftovers(proc) == [], log.read_text()[-3000:]
    return code, log.read_text(), time.perf_counter() - start


# Four CLI runs of two steps: about 90 s on an idle 2-core machine, several times that under load.
@pytest.mark.timeout(1500)
def test_killed_rank_then_resume_ends_as_the_uninterrupted_run(cli_config, tmp_path):
    reference = tmp_path / "reference"
    code, out, _ = _run(cli_config, reference)
    assert code == 0, out[-3000:]
    run = tmp_path / "run"
    # Rank 1 dies in the backward of step 2: the launcher stops rank 0 and says who died where.
    code, out, _ = _run(cli_config, run, "train:2:1:kill")
    assert code == 128 + 9, out[-3000:]
    assert "megatron-lpreg: rank 1 killed by SIGKILL during train step 2" in out
    assert [s for s, _ in complete_checkpoints(run)] == [1] and not fm.falsely_complete(run)
    # Resumed from step 1, everything dies at once before step 2's completion marker.
    code, out, _ = _run(cli_config, run, "checkpoint_commit:2:killall")
    assert code == -9, out[-3000:]
    assert [s for s, _ in complete_checkpoints(run)] == [1] and not fm.falsely_complete(run)
    assert (run / "checkpoints" / ".step_000002.partial").is_dir()  # written, never marked complete
    code, out, _ = _run(cli_config, run)
    assert code == 0, out[-3000:]
    assert fm.comparable_metrics(run) == fm.comparable_metrics(reference)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert fm.tensors_equal(fm.final_checkpoint(run), fm.final_checkpoint(reference))


def test_hung_rank_fails_the_run_within_the_collective_timeout(tmp_path):
    config = fm.write_config(tmp_path, 2, 1, timeout_s=5)
    code, out, _ = _run(config, tmp_path / "run", "train:1:1:hang")
    assert code == 1, out[-3000:]
    # Rank 0 waits for rank 1's gradient-norm all-reduce after the backward, in the TP group
    # (megatron's groups once rounded timeout_s up to a minute): its own line says where.
    assert "megatron-lpreg: rank 0 failed during optimizer step 1: RuntimeError: " in out
    assert "Timed out waiting 5000ms" in out
    assert ("megatron-lpreg: rank 0 exited with status 1 during optimizer step 1; rank 1 was at train step 1; "
            "stopped the other ranks") in out


# ------------------------------------------------------------------------- in-process (2 gloo ranks)


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _nan_gradients(ctx, root, policy, data):
    from megatron_lpreg.grpo.skips import TrainingDiverged
    from megatron_lpreg.grpo.trainer import GRPOTrainer

    out = {}
    # One poisoned step: both of its optimiser steps are skipped, logged, and training goes on.
    os.environ["MEGATRON_LPREG_FAULT"] = "optimizer:2:nan"
    with GRPOTrainer(tiny_config(Path(root) / "once", policy, data, ctx.tp_size)) as trainer:
        trainer.fit(max_steps=1)
        after_1 = _weights(trainer)
        trainer.fit(max_steps=1)
        out["unchanged_by_2"] = all(torch.equal(p, after_1[n]) for n, p in _weights(trainer).items())
        trainer.fit()
        out["changed_by_3"] = any(not torch.equal(p, after_1[n]) for n, p in _weights(trainer).items())
        out["step"] = trainer.step
    # Poisoned from step 2 on: 4 skips in a row by step 3 >= 3 stops the run with the good weights saved.
    os.environ["MEGATRON_LPREG_FAULT"] = "optimizer:2+:nan"
    run = Path(root) / "always"
    with GRPOTrainer(tiny_config(run, policy, data, ctx.tp_size, "grpo.max_consecutive_skips=3",
                                 "grpo.steps=5")) as trainer:
        trainer.fit(max_steps=1)
        after_1 = _weights(trainer)
        try:
            trainer.fit()
        except TrainingDiverged as e:
            out["error"] = str(e)
        out["final_equal_step_1"] = all(torch.equal(p, after_1[n]) for n, p in _weights(trainer).items())
    del os.environ["MEGATRON_LPREG_FAULT"]
    with GRPOTrainer(tiny_config(run, policy, data, ctx.tp_size, "grpo.steps=5")) as trainer:
        out["resumed_at"] = trainer.step
        out["resumed_equal_step_1"] = all(torch.equal(p, after_1[n]) for n, p in _weights(trainer).items())
    return out


def test_non_finite_gradients_are_skipped_then_stop_the_run(tmp_path, assets):
    policy, data = assets
    results = run_distributed(_nan_gradients, world_size=2, tp_size=2, args=(str(tmp_path), policy, data),
                              timeout_s=400)
    for r in results:
        assert r["unchanged_by_2"] and r["changed_by_3"] and r["step"] == 3
        assert r["error"] == ("4 optimiser steps in a row had a non-finite gradient norm "
                              f"(grpo.max_consecutive_skips=3), the last at step 3; stopped: last good weights "
                              f"in {tmp_path / 'always' / 'checkpoints' / 'step_000003'}")
        assert r["final_equal_step_1"] and r["resumed_at"] == 3 and r["resumed_equal_step_1"]
    once = read_metrics(tmp_path / "once" / "metrics.jsonl")
    assert [(r["step"], r["optim/skipped_steps"]) for r in once if r["step"]] == [(1, 0), (2, 2), (3, 0)]
    norm = next(r["optim/grad_norm"] for r in once if r["step"] == 2)
    assert norm is None or not math.isfinite(norm)
    always = read_metrics(tmp_path / "always" / "metrics.jsonl")
    assert [(r["step"], r["optim/skipped_steps"]) for r in always if r["step"]] == [(1, 0), (2, 2), (3, 2)]
    assert [s for s, _ in complete_checkpoints(tmp_path / "always")] == [2, 3]


def _disk_full(ctx, root, policy, data, where):
    from megatron_lpreg.checkpointing import CheckpointError
    from megatron_lpreg.grpo.trainer import GRPOTrainer

    cfg = tiny_config(root, policy, data, ctx.tp_size, "checkpoint.every=1", "grpo.steps=2")
    with GRPOTrainer(cfg) as trainer:
        trainer.fit(max_steps=1)
        real_save = torch.save

        def full_disk(obj, f, *args, **kwargs):
            # Every rank writes its RNG file after all model and optimiser shards: the disk fills there.
            # (megatron's own torch.save of common.pt is rank 0's alone; failing it leaves rank 1
            # waiting in the next collective until the timeout, which the CLI's launcher cuts short.)
            if "/rng/" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)

        from megatron.core.dist_checkpointing.strategies import filesystem_async

        real_item = filesystem_async._write_item

        def full_disk_in_shard(*args, **kwargs):  # inside megatron's shard writer, on every rank
            raise OSError(errno.ENOSPC, "No space left on device")

        if where == "rng":
            torch.save = full_disk
        else:
            filesystem_async._write_item = full_disk_in_shard
        try:
            trainer.fit()
        except CheckpointError as e:
            error = str(e)
        finally:
            torch.save = real_save
            filesystem_async._write_item = real_item
    with GRPOTrainer(cfg) as trainer:
        return {"error": error, "resumed_at": trainer.step}


@pytest.mark.parametrize("where", ["rng", "shard"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, assets, where):
    policy, data = assets
    results = run_distributed(_disk_full, world_size=2, tp_size=2, args=(str(tmp_path), policy, data, where),
                              timeout_s=300)
    ckpts = tmp_path / "checkpoints"
    for rank, r in enumerate(results):
        # megatron reports a failed shard write in words on its coordinator (rank 0) only.
        cause = {"rng": "No space left on device", "shard": "a shard write failed on another rank" if rank else
                 "a shard write failed: Worker failure: [Errno 28] No space left on device"}[where]
        assert r["error"] == (f"{ckpts / 'step_000002'}: checkpoint not saved ({cause}); "
                              f"the newest complete one is still {ckpts / 'step_000001'}")
        assert r["resumed_at"] == 1
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001"]  # the partial one was removed
    assert not fm.falsely_complete(tmp_path)
