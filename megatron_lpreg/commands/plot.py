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
    low_p_share.png      share of sampled tokens with p < 0.1 under pi_old
    low_p_in_support.png of those, the share inside the min-p support (sparks, not noise)
    token_probability.png, sparks.png   the paper's Fig. 1c/1d (commands/sampled_token_figures.py)
    lpreg_selected.png, clipfrac.png, grad_norm.png, step_time.png   diagnostics
    summary.png          accuracy, entropy, response length and reward in one grid
    comparison.md        per run: first / last / best validation accuracy, first / last entropy;
                         per label with several runs (a method's seeds): mean +- standard deviation

Runs given the same label (``--labels GRPO,GRPO,Lp-Reg,Lp-Reg``: a method's seeds) are drawn as one
curve, their mean, with a band between the lowest and the highest run.

A quantity that no run logged is skipped. ``--smooth N`` draws each training curve as a trailing
moving average over its last N logged steps, over the raw curve drawn faintly; validation curves
(sparse) and comparison.md use the values as logged. A run directory without ``metrics.jsonl`` is
an error (exit status 2) naming it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from megatron_lpreg.commands.report import COMPARISON_FILE, VAL_MEAN, source_title, val_source_keys, write_comparison
from megatron_lpreg.runs import Run, RunError, group_by_label, load_run

SUMMARY_FIGURE = "summary.png"

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
    ("low_p_share", "sampled_p/low_share", "Sampled tokens with $p < 0.1$", "share", False),
    ("low_p_in_support", "sampled_p/low_in_support", "Low-probability tokens inside the min-p support",
     "share", False),
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


def mean_and_spread(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step over the runs that logged ``key`` there: steps, mean, lowest, highest."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        if r.has(key):
            for step, value in zip(*r.series[key]):
                if math.isfinite(value):
                    by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (steps, [sum(by_step[s]) / len(by_step[s]) for s in steps],
            [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps])


def _draw(ax, runs: list[Run], key: str, smooth: int, *, log_y: bool = False, markers: bool = False) -> bool:
    """Overlay ``key`` of every run on ``ax``; False (ax untouched) when no run has it. Runs sharing a
    label (a method's seeds) are drawn as their mean, with the band between the lowest and highest.

    ``markers``: a sparse curve (validation), drawn as logged with a marker per point, unsmoothed.
    """
    drawn = False
    positive = True
    lo, hi = math.inf, -math.inf
    for i, (label, members) in enumerate(group_by_label(runs)):
        steps, values, low, high = mean_and_spread(members, key)
        if not steps:
            continue
        color = COLORS[i % len(COLORS)]
        marker = "o" if markers or len(steps) == 1 else None
        if len(members) > 1:
            ax.fill_between(steps, low, high, color=color, alpha=0.18, linewidth=0)
            label = f"{label} (mean of {len(members)})"
        if smooth > 1 and len(steps) > 1 and not markers:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1.0)
            ax.plot(steps, _smooth(values, smooth), color=color, label=label, marker=marker, markersize=3)
        else:
            ax.plot(steps, values, color=color, label=label, marker=marker, markersize=3)
        lo, hi = min(lo, *low), max(hi, *high)
        positive = positive and min(low) > 0
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


def _plot_validation(runs: list[Run], out_dir: Path, smooth: int) -> Path | None:
    panels = ([(VAL_MEAN, "Validation accuracy (mean)")] if any(r.has(VAL_MEAN) for r in runs) else [])
    panels += [(k, source_title(k)) for k in val_source_keys(runs)]
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


# --------------------------------------------------------------------------- entry points


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
              labels: Sequence[str] | None = None, smooth: int = 1) -> list[Path]:
    """Draw the figures of ``run_dirs`` overlaid into ``out_dir`` (default ``<first run>/plots``).

    Returns the files written: the PNG figures (a quantity no run logged is skipped), then
    ``comparison.md``. Raises :class:`RunError` for a run directory without ``metrics.jsonl``,
    a ``labels`` list of the wrong length, or ``smooth < 1``.
    """
    import matplotlib

    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise RunError("give at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise RunError(f"{len(labels)} labels for {len(run_dirs)} run directories")
    if int(smooth) != smooth or smooth < 1:
        raise RunError(f"smooth must be a whole number >= 1, got {smooth!r}")
    smooth = int(smooth)
    runs = [load_run(d, None if labels is None else labels[i]) for i, d in enumerate(run_dirs)]
    if labels is None:
        _default_labels(runs)
    out_dir = Path(out_dir) if out_dir is not None else run_dirs[0] / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)

    from megatron_lpreg.commands.sampled_token_figures import plot_sparks, plot_token_probability

    written: list[Path] = []
    groups = group_by_label(runs)
    with matplotlib.rc_context(STYLE):
        for path in (
            _plot_validation(runs, out_dir, smooth),
            *(_plot_single(runs, out_dir, smooth, *q) for q in QUANTITIES),
            _plot_summary(runs, out_dir, smooth),
            plot_token_probability(groups, out_dir, _new_figure),
            plot_sparks(groups, out_dir, _new_figure),
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
                   help="comma-separated legend names, one per run; runs with the same name (a method's "
                        "seeds) are drawn as their mean and spread (default: logging.wandb_name or the "
                        "directory name; equal default names get the loss method added)")
    p.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="trailing moving-average window of the training curves, in steps (default 1)")


def run(args) -> int:
    labels = None if args.labels is None else [s.strip() for s in args.labels.split(",")]
    for path in plot_runs(args.run_dirs, args.out, labels=labels, smooth=args.smooth):
        print(path)
    return 0
