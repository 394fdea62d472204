"""logging.backends: TensorBoard event files beside metrics.jsonl, and wandb left out on request."""

from __future__ import annotations

import struct

import pytest

from megatron_lpreg.logging import MetricsLogger
from megatron_lpreg.metrics_file import read_metrics


def _scalars(log_dir) -> dict[tuple[str, int], float]:
    """(tag, step) -> value from the event files, read as TFRecords (length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out[value.tag, event.step] = value.simple_value
    return out


def test_tensorboard_gets_every_numeric_metric_and_wandb_is_not_started(tmp_path):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    with MetricsLogger(run, config={}, console=False, backends=("tensorboard",)) as ml:
        ml.log(1, {"reward/mean": 0.25, "optim/lr": 1e-6, "note": "text", "flag": True})
        ml.log(2, {"reward/mean": 0.5, "val/mean": 0.75})
    assert not (run / "wandb").exists()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    got = _scalars(run / "tensorboard")
    assert got == pytest.approx({("reward/mean", 1): 0.25, ("optim/lr", 1): 1e-6, ("reward/mean", 2): 0.5,
                                 ("val/mean", 2): 0.75})


def test_an_unknown_backend_is_a_config_error():
    from megatron_lpreg.config import ConfigError, load_config

    assert load_config(None, ["logging.backends=[tensorboard]"]).logging.backends == ["tensorboard"]
    with pytest.raises(ConfigError, match="logging.backends.*'mlflow'"):
        load_config(None, ["logging.backends=[wandb, mlflow]"])
