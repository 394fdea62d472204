"""Which training checkpoints count (one process, no model): only whole ones, oldest first, and
pruning keeps the newest. Saving and resuming a real run: tests/grpo/test_trainer.py and
tests/reliability/test_faults.py."""

from __future__ import annotations

from megatron_lpreg import checkpointing as ckpt
from megatron_lpreg.policy.training_checkpoint import (
    STATE_FILE, best_checkpoint, complete_checkpoints, prune_checkpoints, record_best, step_dir,
)


def _fake(run_dir, step: int, *, marker: bool = True, state: bool = True):
    path = step_dir(run_dir, step)
    path.mkdir(parents=True)
    if marker:
        (path / ckpt.MARKER).write_text("{}")
    if state:
        (path / STATE_FILE).write_text("{}")
    return path


def test_only_complete_checkpoints_count_oldest_first(tmp_path):
    assert complete_checkpoints(tmp_path) == []
    assert step_dir(tmp_path, 12).name == "step_000012"
    whole = [_fake(tmp_path, s) for s in (10, 2)]
    _fake(tmp_path, 4, marker=False)  # interrupted before the marker
    _fake(tmp_path, 6, state=False)  # a model checkpoint, not a training one
    (tmp_path / "checkpoints" / ".step_000008.partial").mkdir()
    assert complete_checkpoints(tmp_path) == [(2, whole[1]), (10, whole[0])]


def test_prune_keeps_the_newest(tmp_path):
    paths = [_fake(tmp_path, s) for s in (1, 2, 3)]
    prune_checkpoints(tmp_path, None)
    assert [p for _, p in complete_checkpoints(tmp_path)] == paths
    prune_checkpoints(tmp_path, 2)
    assert [p for _, p in complete_checkpoints(tmp_path)] == paths[1:]


def test_prune_never_deletes_the_best(tmp_path):
    paths = [_fake(tmp_path, s) for s in (1, 2, 3, 4)]
    assert best_checkpoint(tmp_path) is None
    record_best(tmp_path, 2, 0.75)
    assert best_checkpoint(tmp_path) == paths[1]
    prune_checkpoints(tmp_path, 1)
    assert [p for _, p in complete_checkpoints(tmp_path)] == [paths[1], paths[3]]
    record_best(tmp_path, 4, 0.8)  # a newer best: the old one is an ordinary checkpoint again
    _fake(tmp_path, 5)
    prune_checkpoints(tmp_path, 1)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4, 5]
