"""Figures of one or more runs, overlaid as the paper draws them, and a table to compare them.

    megatron-lpreg plot runs/lp_reg runs/grpo --labels Lp-Reg,GRPO --smooth 5

Reads each run directory's ``metrics.jsonl`` (lines of the same step are merged) and
``config.yaml`` (optional: the legend name and the loss method), and writes to ``--out``
(default: ``<first run>/plots``):

    val_accuracy.png     validation accuracy: val/mean, then one panel per val/<source>/avg@k
    entropy.png          policy entropy (entropy/mean)
    response_length.png  mean response length (response/length_mean)
    reward.png           mean reward (reward/mean)
    delta_rho.png        Lp-Reg's percentile threshold delta_rho, a probability (log y over decades)
    pass_share.png       share of the lowest-rho tokens that pass the proxy filter
    lpreg_selected.png, clipfrac.png, grad_norm.png, step_time.png   diagnostics
    summary.png          accuracy, entropy, response length and reward in one grid
    comparison.md        per run: first / last / best validation accuracy, first / last entropy

A quantity that no run logged is skipped. ``--smooth N`` draws each training curve as a trailing
moving average over its last N logged steps, over the raw curve drawn faintly; validation curves
(sparse) and comparison.md use the values as logged. A run directory without ``metrics.jsonl`` is
an error (exit status 2) naming it.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_lpreg.logging import METRICS_FILE, read_metrics

__all__ = ["PlotError", "Run", "add_arguments", "load_run", "plot_runs", "run", "run_summary", "write_comparison"]

CONFIG_FILE = "config.yaml"
COMPARISON_FILE = "comparison.md"
SUMMARY_FIGURE = "summary.png"
VAL_MEAN = "val/mean"
_VAL_SOURCE = re.compile(r"^val/(?P<source>.+)/avg@(?P<k>\d+)$")

# (file stem, metric key, title, y label, log y when the values span decades)
QUANTITIES: tuple[tuple[str, str, str, str, bool], ...] = (
    ("entropy", "entropy/mean", "Policy entropy", "entropy (nats)", False),
    ("response_length", "response/length_mean", "Response length", "tokens", False),
    ("reward", "reward/mean", "Training reward", "mean reward", False),
    ("delta_rho", "lpreg/delta_rho", r"Lp-Reg threshold $\delta_\rho$", "probability", True),
    ("pass_share", "lpreg/pass_share", "Lowest-$\\rho$ tokens passing the proxy filter", "share", False),
    ("lpreg_selected", "lpreg/selected", "Lp-Reg regularised tokens", "tokens", False),
    ("kept_mass", "lpreg/kept_mass_mean", "Proxy kept mass $M$", "probability", False),
    ("clipfrac", "pg/clipfrac", "Policy-gradient clip fraction", "fraction", False),
    ("grad_norm", "optim/grad_norm", "Gradient norm", "norm", False),
    ("step_time", "time/step", "Step time", "seconds", False),
)
# The summary grid: (metric key, title, y label).
SUMMARY: tuple[tuple[str, str, str], ...] = (
    (VAL_MEAN, "Validation accuracy", "accuracy (mean over sources)"),
    ("entropy/mean", "Policy entropy", "entropy (nats)"),
    ("response/length_mean", "Response length", "tokens"),
    ("reward/mean", "Training reward", "mean reward"),
)

# A clean, paper-like look: light dashed grid, no top/right spines, tab10 colours per run.
STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "grid.linestyle": "--",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "legend.fontsize": 9,
    "lines.linewidth": 1.8,
}
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


class PlotError(ValueError):
    """A run directory that cannot be read, or a bad argument; the message names it."""


# --------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """One run: ``series[key] = (steps, values)`` sorted by step, for every numeric metric."""

    path: Path
    label: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    method: str | None = None

    def has(self, key: str) -> bool:
        return key in self.series and len(self.series[key][0]) > 0

    @property
    def last_step(self) -> int | None:
        return max((steps[-1] for steps, _ in self.series.values() if steps), default=None)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _merge(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Records -> per-metric series; lines of the same step are merged (a later line wins a key)."""
    by_step: dict[int, dict] = {}
    for record in records:
        by_step.setdefault(record["step"], {}).update(record)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key in ("step", "time"):
                continue
            number = _number(value)
            if number is None:
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(number)
    return series


def _load_config(path: Path) -> dict:
    if not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _loss_method(config: dict) -> str | None:
    """The loss preset a resolved ``config.yaml`` was made with: ``lp_reg``, ``grpo``, ...

    ``config.yaml`` holds the resolved loss fields, not the preset's name, so the fields are
    compared with each preset's; ``None`` without a loss section. Lp-Reg switched off with no
    baseline knob set is ``grpo (clip lo/hi)``; anything else ``custom``.
    """
    loss = config.get("loss")
    if not isinstance(loss, dict) or "enabled" not in loss:
        return None
    if loss["enabled"]:
        return "lp_reg"
    from megatron_lpreg.loss.config import PRESETS, LpRegConfig

    defaults = {f: getattr(LpRegConfig(), f) for f in LpRegConfig.__dataclass_fields__}
    keys = sorted({k for preset in PRESETS.values() for k in preset})

    def same(a, b) -> bool:
        a = math.inf if a == "inf" else a
        b = math.inf if b == "inf" else b
        return a == b

    for name, preset in PRESETS.items():
        if preset.get("enabled", True):
            continue
        resolved = {**defaults, **preset}
        if all(k in loss and same(loss[k], resolved[k]) for k in keys):
            return name
    knobs = ("ratio_level", "entropy_coef", "kl_cov_ratio", "high_entropy_fraction", "loss_agg")
    if all(same(loss.get(k, defaults[k]), defaults[k]) for k in knobs):
        return f"grpo (clip {loss.get('eps_low', defaults['eps_low'])}/{loss.get('eps_high', defaults['eps_high'])})"
    return "custom"


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Read ``<run_dir>/metrics.jsonl`` (and ``config.yaml`` when present); PlotError if unreadable."""
    path = Path(run_dir)
    metrics = path / METRICS_FILE
    if not path.is_dir():
        raise PlotError(f"run directory {str(path)!r} does not exist")
    if not metrics.is_file():
        raise PlotError(f"run directory {str(path)!r} has no {METRICS_FILE} (is it a run directory?)")
    try:
        records = read_metrics(metrics)
    except (OSError, ValueError) as e:
        raise PlotError(f"cannot read {metrics}: {e}") from e
    config = _load_config(path / CONFIG_FILE)
    if label is None:
        logging_cfg = config.get("logging")
        name = logging_cfg.get("wandb_name") if isinstance(logging_cfg, dict) else None
        label = str(name) if name else path.resolve().name
    return Run(path=path, label=label, series=_merge(records), config=config, method=_loss_method(config))


def _default_labels(runs: list[Run]) -> None:
    """Make equal default labels distinct: add the loss method, then the parent directory."""
    def dupes() -> set[str]:
        seen: dict[str, int] = {}
        for r in runs:
            seen[r.label] = seen.get(r.label, 0) + 1
        return {label for label, n in seen.items() if n > 1}

    clash = dupes()
    for r in runs:
        if r.label in clash and r.method:
            r.label = f"{r.label} ({r.method})"
    clash = dupes()
    for r in runs:
        if r.label in clash:
            r.label = f"{r.path.resolve().parent.name}/{r.label}"
    clash = dupes()
    for i, r in enumerate(runs):
        if r.label in clash:
            r.label = f"{r.label} #{i + 1}"


# --------------------------------------------------------------------------- drawing


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over the finite values of each window (NaN where none is)."""
    if window <= 1:
        return list(values)
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _draw(ax, runs: list[Run], key: str, smooth: int, *, log_y: bool = False, markers: bool = False) -> bool:
    """Overlay ``key`` of every run on ``ax``; False (ax untouched) when no run has it.

    ``markers``: a sparse curve (validation), drawn as logged with a marker per point, unsmoothed.
    """
    drawn = False
    positive = True
    lo, hi = math.inf, -math.inf
    for i, r in enumerate(runs):
        if not r.has(key):
            continue
        steps, values = r.series[key]
        color = COLORS[i % len(COLORS)]
        marker = "o" if markers or len(steps) == 1 else None
        if smooth > 1 and len(steps) > 1 and not markers:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1.0)
            ax.plot(steps, _smooth(values, smooth), color=color, label=r.label, marker=marker, markersize=3)
        else:
            ax.plot(steps, values, color=color, label=r.label, marker=marker, markersize=3)
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            lo, hi = min(lo, *finite), max(hi, *finite)
            positive = positive and min(finite) > 0
        drawn = True
    if drawn and log_y and positive and hi > 10 * lo:
        ax.set_yscale("log")
    return drawn


def _new_figure(nrows: int = 1, ncols: int = 1, panel=(5.0, 3.4)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _finish(fig, axes, used: int, out: Path) -> Path:
    for ax in axes[used:]:
        ax.set_visible(False)
    for ax in axes[:used]:
        ax.set_xlabel("training step")
    if used == 1:
        axes[0].legend(loc="best")
    else:  # one legend for the figure, above the panels
        handles, labels = [], []
        for ax in axes[:used]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="outside upper center", ncol=min(len(labels), 5))
    fig.savefig(out, format="png")
    return out


def _val_source_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.series if _VAL_SOURCE.match(k) and r.has(k)})
    return keys


def _source_title(key: str) -> str:
    m = _VAL_SOURCE.match(key)
    return f"{m['source']} (avg@{m['k']})"


def _plot_validation(runs: list[Run], out_dir: Path, smooth: int) -> Path | None:
    panels = ([(VAL_MEAN, "Validation accuracy (mean)")] if any(r.has(VAL_MEAN) for r in runs) else [])
    panels += [(k, _source_title(k)) for k in _val_source_keys(runs)]
    if not panels:
        return None
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _new_figure(nrows, ncols)
    for ax, (key, title) in zip(axes, panels):
        _draw(ax, runs, key, smooth, markers=True)
        ax.set_title(title)
        ax.set_ylabel("accuracy")
    return _finish(fig, axes, len(panels), out_dir / "val_accuracy.png")


def _plot_single(runs: list[Run], out_dir: Path, smooth: int, stem: str, key: str, title: str,
                 ylabel: str, log_y: bool) -> Path | None:
    if not any(r.has(key) for r in runs):
        return None
    fig, axes = _new_figure()
    _draw(axes[0], runs, key, smooth, log_y=log_y)
    axes[0].set_title(title)
    axes[0].set_ylabel(ylabel)
    return _finish(fig, axes, 1, out_dir / f"{stem}.png")


def _plot_summary(runs: list[Run], out_dir: Path, smooth: int) -> Path | None:
    panels = [p for p in SUMMARY if any(r.has(p[0]) for r in runs)]
    if not panels:
        return None
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _new_figure(nrows, ncols, panel=(4.6, 3.2))
    for ax, (key, title, ylabel) in zip(axes, panels):
        _draw(ax, runs, key, smooth, markers=key == VAL_MEAN)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    return _finish(fig, axes, len(panels), out_dir / SUMMARY_FIGURE)


# --------------------------------------------------------------------------- the comparison table


def _finite(run: Run, key: str) -> tuple[list[int], list[float]]:
    if not run.has(key):
        return [], []
    pairs = [(s, v) for s, v in zip(*run.series[key]) if math.isfinite(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _first_last_best(run: Run, key: str) -> dict[str, Any]:
    steps, values = _finite(run, key)
    if not values:
        return {"first": None, "last": None, "best": None, "best_step": None, "first_step": None,
                "last_step": None}
    best = max(range(len(values)), key=lambda i: values[i])  # the first step reaching the max
    return {"first": values[0], "first_step": steps[0], "last": values[-1], "last_step": steps[-1],
            "best": values[best], "best_step": steps[best]}


def _delta(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{b - a:+.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


_TRAIN_FORMATS = {"response/length_mean": "{:.1f}", "lpreg/delta_rho": "{:.3g}"}


def write_comparison(runs: list[Run], path: str | Path) -> Path:
    """``comparison.md``: validation accuracy and entropy, first vs last vs best, one row per run."""
    path = Path(path)
    lines = ["# Run comparison", ""]
    lines += [f"- **{_cell(r.label)}**: `{r.path}`" + (f" (loss: {r.method})" if r.method else "")
              for r in runs]
    lines += ["", "Validation accuracy is `val/mean` (mean avg@k over data sources); best is the highest "
              "validated value and its step. Entropy is the policy's mean token entropy (`entropy/mean`).", ""]

    lines += ["## Validation accuracy (val/mean) and policy entropy", ""]
    rows = []
    for r in runs:
        v = _first_last_best(r, VAL_MEAN)
        e = _first_last_best(r, "entropy/mean")
        rows.append([
            _cell(r.label), r.method or "n/a",
            _fmt(v["first"]), _fmt(v["last"]), _fmt(v["best"]),
            "n/a" if v["best_step"] is None else str(v["best_step"]),
            _delta(v["first"], v["last"]),
            _fmt(e["first"]), _fmt(e["last"]), _delta(e["first"], e["last"]),
            "n/a" if r.last_step is None else str(r.last_step),
        ])
    lines += _table(["run", "loss", "val first", "val last", "val best", "best step", "val Δ",
                     "entropy first", "entropy last", "entropy Δ", "last step"], rows)

    sources = _val_source_keys(runs)
    if sources:
        lines += ["", "## Validation accuracy per data source (first / last / best)", ""]
        rows = []
        for key in sources:
            for r in runs:
                v = _first_last_best(r, key)
                if v["first"] is None:
                    continue
                rows.append([_cell(_source_title(key)), _cell(r.label), _fmt(v["first"]), _fmt(v["last"]),
                             _fmt(v["best"]), str(v["best_step"])])
        lines += _table(["source", "run", "first", "last", "best", "best step"], rows)

    train_keys = [k for k in ("reward/mean", "response/length_mean", "lpreg/delta_rho", "lpreg/pass_share")
                  if any(r.has(k) for r in runs)]
    if train_keys:
        lines += ["", "## Training metrics (first / last)", ""]
        rows = []
        for r in runs:
            row = [_cell(r.label)]
            for k in train_keys:
                v = _first_last_best(r, k)
                fmt = _TRAIN_FORMATS.get(k, "{:.4f}")
                row.append(" / ".join("n/a" if v[x] is None else fmt.format(v[x]) for x in ("first", "last")))
            rows.append(row)
        lines += _table(["run", *train_keys], rows)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


_SUMMARY_LINES = (
    (VAL_MEAN, "validation accuracy", "{:.3f}"),
    ("entropy/mean", "policy entropy", "{:.3f}"),
    ("reward/mean", "training reward", "{:.3f}"),
    ("response/length_mean", "response length", "{:.1f}"),
)


def run_summary(run_dir: str | Path) -> str:
    """Before/after lines of a finished run (the end of ``megatron-lpreg train``)."""
    r = load_run(run_dir)
    lines = [f"run summary: {r.path} (last step {r.last_step})"]
    for key, name, fmt in _SUMMARY_LINES:
        v = _first_last_best(r, key)
        if v["first"] is None:
            continue
        line = (f"  {name} ({key}): {fmt.format(v['first'])} at step {v['first_step']} -> "
                f"{fmt.format(v['last'])} at step {v['last_step']}")
        if key == VAL_MEAN:
            line += f" (best {fmt.format(v['best'])} at step {v['best_step']})"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
              labels: Sequence[str] | None = None, smooth: int = 1) -> list[Path]:
    """Draw the figures of ``run_dirs`` overlaid into ``out_dir`` (default ``<first run>/plots``).

    Returns the files written: the PNG figures (a quantity no run logged is skipped), then
    ``comparison.md``. Raises :class:`PlotError` for a run directory without ``metrics.jsonl``,
    a ``labels`` list of the wrong length, or ``smooth < 1``.
    """
    import matplotlib

    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise PlotError("give at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise PlotError(f"{len(labels)} labels for {len(run_dirs)} run directories")
    if int(smooth) != smooth or smooth < 1:
        raise PlotError(f"smooth must be a whole number >= 1, got {smooth!r}")
    smooth = int(smooth)
    runs = [load_run(d, None if labels is None else labels[i]) for i, d in enumerate(run_dirs)]
    if labels is None:
        _default_labels(runs)
    out_dir = Path(out_dir) if out_dir is not None else run_dirs[0] / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    with matplotlib.rc_context(STYLE):
        for path in (
            _plot_validation(runs, out_dir, smooth),
            *(_plot_single(runs, out_dir, smooth, *q) for q in QUANTITIES),
            _plot_summary(runs, out_dir, smooth),
        ):
            if path is not None:
                written.append(path)
    written.append(write_comparison(runs, out_dir / COMPARISON_FILE))
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: RUN_DIR/plots of the first run)")
    p.add_argument("--labels", default=None, metavar="A,B",
                   help="comma-separated legend names, one per run (default: logging.wandb_name or the "
                        "directory name; equal names get the loss method added)")
    p.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="trailing moving-average window of the training curves, in steps (default 1)")


def run(args) -> int:
    labels = None
    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",")]
    try:
        written = plot_runs(args.run_dirs, args.out, labels=labels, smooth=args.smooth)
    except PlotError as e:
        from megatron_lpreg.config import ConfigError  # the CLI reports these with exit status 2

        raise ConfigError(str(e)) from None
    for path in written:
        print(path)
    return 0
