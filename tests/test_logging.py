"""MetricsLogger: metrics.jsonl, resume truncation, summary, console, and real (offline) wandb."""

import json
import logging
import math

import numpy as np
import pytest
import torch

from megatron_lpreg.logging import RUN_ID_FILE, SUMMARY_FILE, MetricsLogger
from megatron_lpreg.metrics_file import METRICS_FILE, read_metrics


@pytest.fixture(autouse=True)
def _wandb_env(monkeypatch, tmp_path_factory):
    """wandb offline, quiet, and with every directory it might touch inside a temp dir."""
    home = tmp_path_factory.mktemp("wandb_home")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _lines(run_dir):
    return (run_dir / METRICS_FILE).read_text().splitlines()


def _offline_runs(run_dir):
    return sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))


def test_jsonl_written_and_readable(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, config={"lr": 1e-6}, total_steps=3, wandb_mode="disabled") as ml:
        ml.log(1, {"reward/mean": 0.25, "entropy/mean": 1.5, "lpreg/selected": 12,
                   "time/step": 2.0})
        ml.log(2, {"reward/mean": np.float32(0.5), "count": np.int64(7),
                   "loss": torch.tensor(0.125)})
        ml.log(2, {"val/acc": 0.75, "ok": True, "tag": "x"})  # same step twice is allowed
        # flushed per call: readable while the logger is open
        assert [r["step"] for r in read_metrics(run_dir / METRICS_FILE)] == [1, 2, 2]

    records = read_metrics(run_dir / METRICS_FILE)
    assert len(_lines(run_dir)) == 3
    first, second, third = records
    assert list(first)[:2] == ["step", "time"]
    assert first["reward/mean"] == 0.25 and first["lpreg/selected"] == 12
    assert isinstance(first["time"], float) and abs(first["time"] - second["time"]) < 60
    assert isinstance(second["reward/mean"], float) and second["reward/mean"] == 0.5
    assert second["count"] == 7 and isinstance(second["count"], int)
    assert second["loss"] == 0.125
    assert third == {"step": 2, "time": third["time"], "val/acc": 0.75, "ok": True, "tag": "x"}
    # floats stay floats in the file itself
    assert json.loads(_lines(run_dir)[0])["time/step"] == 2.0
    assert "2.0" in _lines(run_dir)[0]

    out = capsys.readouterr().out
    assert "step 1/3 reward 0.250 entropy 1.500 lpreg_sel 12 time 2.00s" in out
    assert "step 2/3 reward 0.500" in out


def test_non_finite_values(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, config={}, console=False, wandb_mode="disabled") as ml:
        ml.log(1, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": np.float32("nan"), "e": 1.0})
    line = _lines(run_dir)[0]
    # strict JSON: no bare NaN / Infinity tokens
    raw = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert (raw["a"], raw["b"], raw["c"], raw["d"]) == ("NaN", "Infinity", "-Infinity", "NaN")
    (rec,) = read_metrics(run_dir / METRICS_FILE)
    assert math.isnan(rec["a"]) and math.isnan(rec["d"])
    assert rec["b"] == math.inf and rec["c"] == -math.inf and rec["e"] == 1.0


def test_invalid_metrics_rejected(tmp_path):
    with MetricsLogger(tmp_path, config={}, console=False, wandb_mode="disabled") as ml:
        with pytest.raises(ValueError, match="reserved"):
            ml.log(1, {"time": 1.0})
        with pytest.raises(TypeError, match="'x'"):
            ml.log(1, {"x": object()})
        with pytest.raises(TypeError, match="not a scalar"):
            ml.log(1, {"x": torch.zeros(2)})
    assert not (tmp_path / METRICS_FILE).read_text()


def test_resume_truncates_and_appends(tmp_path, caplog):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, config={}, console=False, wandb_mode="disabled") as ml:
        for step in range(1, 6):
            ml.log(step, {"x": float(step)})
    # a crash mid-write leaves a torn last line
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "x"')

    with caplog.at_level(logging.WARNING, logger="megatron_lpreg.logging"):
        ml = MetricsLogger(run_dir, config={}, console=False, wandb_mode="disabled", start_step=3)
    assert "dropped 2 line(s)" in caplog.text and "1 malformed" in caplog.text
    assert [r["step"] for r in read_metrics(run_dir / METRICS_FILE)] == [1, 2, 3]
    assert not list(run_dir.glob(".*tmp*"))  # the temp file was renamed into place
    with ml:
        for step in range(4, 7):
            ml.log(step, {"x": 10.0 * step})
    records = read_metrics(run_dir / METRICS_FILE)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["x"] for r in records] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]

    # resuming at the last logged step changes nothing
    before = (run_dir / METRICS_FILE).read_text()
    MetricsLogger(run_dir, config={}, console=False, wandb_mode="disabled", start_step=6).close()
    assert (run_dir / METRICS_FILE).read_text() == before

    # a fresh run (start_step=0) in the same directory replaces the earlier attempt
    MetricsLogger(run_dir, config={}, console=False, wandb_mode="disabled").close()
    assert (run_dir / METRICS_FILE).read_text() == ""


def test_summary_merges_and_survives_resume(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, config={}, console=False, wandb_mode="disabled") as ml:
        ml.log_summary({"best/val_acc": 0.5, "best/step": 10})
        ml.log_summary({"best/val_acc": 0.625, "last/loss": math.nan})
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary == {"best/val_acc": 0.625, "best/step": 10, "last/loss": "NaN"}

    kwargs = dict(config={}, console=False, wandb_mode="disabled")
    with MetricsLogger(run_dir, **kwargs, start_step=10) as ml:
        assert ml.summary["best/step"] == 10 and math.isnan(ml.summary["last/loss"])
        ml.log_summary({"final": 1})
    assert json.loads((run_dir / SUMMARY_FILE).read_text())["best/step"] == 10

    MetricsLogger(run_dir, config={}, console=False, wandb_mode="disabled").close()
    assert not (run_dir / SUMMARY_FILE).exists()


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, config={"a": 1}, enabled=False, total_steps=5) as ml:
        ml.log(1, {"reward/mean": 1.0})
        ml.log_summary({"best": 1.0})
    assert not run_dir.exists()
    assert ml.wandb_run is None
    assert capsys.readouterr() == ("", "")


def test_wandb_offline_run_and_resume_reuses_id(tmp_path):
    run_dir = tmp_path / "run"
    cfg = {"lr": 1e-6, "model": {"name": "tiny"}}
    with MetricsLogger(run_dir, config=cfg, console=False, wandb_name="t") as ml:  # mode from env
        assert ml.wandb_mode == "offline" and ml.wandb_run is not None
        assert dict(ml.wandb_run.config)["lr"] == 1e-6
        run_id = ml.wandb_run_id
        assert ml.wandb_run.id == run_id
        ml.log(1, {"reward/mean": 0.5, "loss": math.nan})
        ml.log(2, {"reward/mean": 0.75})
        ml.log_summary({"best": 0.75})
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    (first,) = _offline_runs(run_dir)  # offline-run-<time>-<id>
    assert first.endswith(f"-{run_id}")
    assert (run_dir / "wandb" / first / f"run-{run_id}.wandb").is_file()

    with MetricsLogger(run_dir, config=cfg, console=False, start_step=1) as ml:
        assert ml.wandb_run.id == run_id
        ml.log(2, {"reward/mean": 0.8})
    # wandb appends "-1" to a second directory for the same id and second
    runs = _offline_runs(run_dir)
    assert len(runs) == 2 and all(f"-{run_id}" in r for r in runs)
    assert all((run_dir / "wandb" / r / f"run-{run_id}.wandb").is_file() for r in runs)
    assert [r["reward/mean"] for r in read_metrics(run_dir / METRICS_FILE)] == [0.5, 0.8]


def test_wandb_failure_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_lpreg.logging"):
        with MetricsLogger(tmp_path, config={}, console=False, wandb_mode="no-such-mode") as ml:
            assert ml.wandb_run is None
            ml.log(1, {"x": 1.0})
            ml.log_summary({"x": 1.0})
    assert caplog.text.count("continuing without wandb") == 1
    assert [r["x"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1.0]


def test_read_metrics_errors_name_the_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "x": 1.0}\n\n{"step": 2, "x": \n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{METRICS_FILE}:3: malformed"):
        read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=":2: .*JSON object"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"x": 1}\n')
    with pytest.raises(ValueError, match=":2: .*'step'"):
        read_metrics(path)
    # an unterminated, unparsable last line is a write in progress: skipped
    path.write_text('{"step": 1}\n{"step": 2, "x"')
    assert read_metrics(path) == [{"step": 1}]
