"""``megatron-lpreg plot``: figures and comparison.md from run directories' metrics.jsonl."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import yaml

from megatron_lpreg.commands import plot
from megatron_lpreg.commands.plot import plot_runs
from megatron_lpreg.runs import RunError, load_run, loss_method
from tests.tables import table_row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 6


def _write_run(run_dir: Path, val, entropy, *, lpreg: bool, sources: bool = True, config: dict | None = None):
    """metrics.jsonl as the trainer writes it: validation on its own line at step 0 and every 2 steps,
    training metrics at steps 1..STEPS (a validation step's two lines share the step)."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(STEPS + 1):
        if step > 0:
            rec = {"step": step, "time": 1.0e9 + step, "entropy/mean": entropy[step - 1],
                   "response/length_mean": 100.0 + 10 * step, "reward/mean": 0.1 * step,
                   "pg/clipfrac": 0.01, "time/step": 2.5, "loss": "NaN", "note": "text"}
            if lpreg:
                rec.update({"lpreg/delta_rho": 1e-5 * 10 ** (step / 2), "lpreg/pass_share": 0.3,
                            "lpreg/selected": 0.002})
            lines.append(rec)
        if step % 2 == 0:
            v = val[step // 2]
            rec = {"step": step, "time": 1.0e9 + step + 0.5, "val/mean": v}
            if sources:
                rec.update({"val/aime24/avg@4": v - 0.05, "val/math500/avg@1": v + 0.05})
            lines.append(rec)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, (path, len(data))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    lp = _write_run(root / "lp_reg", val=[0.20, 0.30, 0.45, 0.40], entropy=[0.9, 0.95, 1.0, 1.05, 1.1, 1.2],
                    lpreg=True, config={"loss": {"preset": "lp_reg", "enabled": True, "rho": 0.01}})
    grpo = _write_run(root / "grpo", val=[0.20, 0.25, 0.22, 0.21], entropy=[0.9, 0.6, 0.4, 0.3, 0.2, 0.1],
                      lpreg=False, config={"loss": {"preset": "grpo", "enabled": False, "eps_low": 0.2,
                                                    "eps_high": 0.2}})
    out = root / "plots"
    written = plot_runs([lp, grpo], out, smooth=2)
    return lp, grpo, out, written


def test_figures_are_pngs(two_runs):
    _, _, out, written = two_runs
    names = {p.name for p in written}
    assert {"val_accuracy.png", "entropy.png", "response_length.png", "reward.png", "delta_rho.png",
            "pass_share.png", "lpreg_selected.png", "clipfrac.png", "step_time.png", "summary.png",
            "comparison.md"} == names
    assert "grad_norm.png" not in names  # no run logged optim/grad_norm: skipped, no error
    for path in written:
        assert path.parent == out and path.exists()
        if path.suffix == ".png":
            _assert_png(path)


def test_comparison_first_last_best(two_runs):
    _, _, out, _ = two_runs
    text = (out / "comparison.md").read_text()
    header = ["run", "loss", "val first", "val last", "val best", "best step", "val Δ",
              "entropy first", "entropy last", "entropy Δ", "last step"]
    assert "| " + " | ".join(header) + " |" in text
    assert table_row(text, "lp_reg") == ["lp_reg", "lp_reg", "0.2000", "0.4000", "0.4500", "4", "+0.2000",
                                          "0.9000", "1.2000", "+0.3000", "6"]
    assert table_row(text, "grpo") == ["grpo", "grpo", "0.2000", "0.2100", "0.2500", "2", "+0.0100",
                                        "0.9000", "0.1000", "-0.8000", "6"]
    # per data source: aime24 = val - 0.05
    rows = [line for line in text.splitlines() if line.startswith("| aime24 (avg@4) | lp_reg |")]
    assert rows == ["| aime24 (avg@4) | lp_reg | 0.1500 | 0.3500 | 0.4000 | 4 |"]
    assert "math500 (avg@1)" in text


def test_lines_of_one_step_are_merged(two_runs):
    lp, *_ = two_runs
    run = load_run(lp)
    steps, values = run.series["val/mean"]
    assert steps == [0, 2, 4, 6] and values == [0.20, 0.30, 0.45, 0.40]
    assert run.series["entropy/mean"][0] == [1, 2, 3, 4, 5, 6]
    assert math.isnan(run.series["loss"][1][0])  # "NaN" comes back as a float
    assert "note" not in run.series and "time" not in run.series


def test_missing_metrics_are_skipped(tmp_path):
    run_dir = tmp_path / "bare"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "entropy/mean": 1.0}) + "\n"
                                           + json.dumps({"step": 2, "entropy/mean": 0.8}) + "\n")
    written = plot_runs([run_dir])  # default out dir: <run>/plots
    assert [p.name for p in written] == ["entropy.png", "summary.png", "comparison.md"]
    assert all(p.parent == run_dir / "plots" for p in written)
    _assert_png(run_dir / "plots" / "summary.png")
    row = table_row((run_dir / "plots" / "comparison.md").read_text(), "bare")
    assert row[2:5] == ["n/a", "n/a", "n/a"] and row[7:10] == ["1.0000", "0.8000", "-0.2000"]


def test_missing_run_dir_is_a_clear_error(tmp_path, two_runs):
    lp, *_ = two_runs
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(RunError, match="not_a_run.*metrics.jsonl"):
        plot_runs([lp, empty], tmp_path / "out")
    with pytest.raises(RunError, match="nowhere.*does not exist"):
        plot_runs([tmp_path / "nowhere"], tmp_path / "out")
    with pytest.raises(RunError, match="2 labels for 1"):
        plot_runs([lp], tmp_path / "out", labels=["a", "b"])


def test_cli_arguments_labels_and_errors(tmp_path, two_runs, capsys):
    lp, grpo, *_ = two_runs
    parser = argparse.ArgumentParser()
    plot.add_arguments(parser)
    out = tmp_path / "cli_out"
    args = parser.parse_args([str(lp), str(grpo), "--out", str(out), "--labels", "Lp-Reg,GRPO", "--smooth", "3"])
    assert plot.run(args) == 0
    assert str(out / "summary.png") in capsys.readouterr().out
    text = (out / "comparison.md").read_text()
    assert table_row(text, "Lp-Reg")[2:5] == ["0.2000", "0.4000", "0.4500"]
    assert table_row(text, "GRPO")[7:9] == ["0.9000", "0.1000"]

    from megatron_lpreg.commands import USER_ERRORS  # what the CLI reports with exit status 2

    args = parser.parse_args([str(tmp_path / "missing_run")])
    with pytest.raises(USER_ERRORS, match="missing_run"):
        plot.run(args)


def test_equal_directory_names_are_told_apart(tmp_path):
    a = _write_run(tmp_path / "a" / "run", val=[0.1, 0.2, 0.3, 0.4], entropy=[1.0] * STEPS, lpreg=True,
                   sources=False, config={"loss": {"preset": "lp_reg", "enabled": True}})
    b = _write_run(tmp_path / "b" / "run", val=[0.1, 0.1, 0.1, 0.1], entropy=[1.0] * STEPS, lpreg=False,
                   sources=False)
    runs = [load_run(a), load_run(b)]
    plot._default_labels(runs)
    assert [r.label for r in runs] == ["run (lp_reg)", "run"]


def test_loss_method_is_the_saved_preset():
    from megatron_lpreg.config import config_to_dict, load_config

    def method(*overrides: str) -> str | None:
        return loss_method(config_to_dict(load_config(None, list(overrides))))

    assert method() == "lp_reg"
    assert method("loss.preset=gspo") == "gspo"
    assert method("loss.preset=grpo", "loss.eps_high=0.3") == "grpo"
    assert method("loss.enabled=false") == "grpo (clip 1.0/9.0)"  # compare's plain GRPO
    assert loss_method({}) is None
    assert loss_method({"loss": {"enabled": True}}) is None  # a config.yaml from before the preset was saved


def _write_seeded_run(run_dir: Path, val: list[float], entropy: list[float], shift: float) -> Path:
    """A run with the sampled-token summaries: histogram mass moving to the top bin over the steps."""
    from megatron_lpreg.grpo.sampled_tokens import LOW_DECADES, P_BINS, hist_key, low_key

    _write_run(run_dir, val, entropy, lpreg=False)
    lines = []
    for step in range(1, STEPS + 1):
        top = min(0.5 + shift * step, 1.0)
        rec = {"step": step, **{hist_key(i): (1 - top) / (P_BINS - 1) for i in range(P_BINS - 1)},
               hist_key(P_BINS - 1): top, "sampled_p/low_share": 0.1, "sampled_p/low_in_support": 0.6}
        rec.update({low_key(inside, d): 0.1 / (2 * LOW_DECADES) for inside in (True, False)
                    for d in range(LOW_DECADES)})
        lines.append(rec)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


def test_seeds_of_a_method_are_drawn_and_tabled_as_mean_and_spread(tmp_path):
    runs = [
        _write_seeded_run(tmp_path / "grpo_1", [0.2, 0.3, 0.4, 0.3], [0.9, 0.5, 0.3, 0.2, 0.1, 0.05], 0.08),
        _write_seeded_run(tmp_path / "grpo_2", [0.2, 0.5, 0.6, 0.5], [0.9, 0.6, 0.4, 0.3, 0.2, 0.15], 0.07),
        _write_seeded_run(tmp_path / "lpreg_1", [0.2, 0.4, 0.5, 0.6], [0.9, 0.9, 0.8, 0.85, 0.8, 0.8], 0.01),
    ]
    written = plot_runs(runs, tmp_path / "plots", labels=["GRPO", "GRPO", "Lp-Reg"])
    names = {p.name for p in written}
    assert {"token_probability.png", "sparks.png", "low_p_share.png", "low_p_in_support.png"} <= names
    for path in written:
        if path.suffix == ".png":
            _assert_png(path)
    per_method = (tmp_path / "plots" / "comparison.md").read_text().split("## Per method")[1].split("\n## ")[0]
    # GRPO: best 0.4 and 0.6, last 0.3 and 0.5, entropy first 0.9/0.9, min 0.05/0.15, last 0.05/0.15.
    assert table_row(per_method, "GRPO") == ["GRPO", "2", "0.500 ± 0.141", "0.400 ± 0.141", "0.900 ± 0.000",
                                              "0.100 ± 0.071", "0.100 ± 0.071"]
    with pytest.raises(AssertionError):  # a label with one run gets no per-method row
        table_row(per_method, "Lp-Reg")
    # The per-run rows of a label with several runs name their directories; a lone label stays bare.
    text = (tmp_path / "plots" / "comparison.md").read_text()
    first = text.split("## Validation accuracy (val/mean)")[1].split("\n## ")[0]
    assert table_row(first, "GRPO (grpo_1)")[2:5] == ["0.2000", "0.3000", "0.4000"]
    assert table_row(first, "GRPO (grpo_2)")[2:5] == ["0.2000", "0.5000", "0.6000"]
    assert table_row(first, "Lp-Reg")[4] == "0.6000"
    loaded = [load_run(r, "GRPO") for r in runs[:2]]
    steps, mean, low, high = plot.mean_and_spread(loaded, "val/mean")
    assert steps == [0, 2, 4, 6] and mean == pytest.approx([0.2, 0.4, 0.5, 0.4])
    assert low == pytest.approx([0.2, 0.3, 0.4, 0.3]) and high == pytest.approx([0.2, 0.5, 0.6, 0.5])
