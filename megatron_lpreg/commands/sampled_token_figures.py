"""The paper's Figure 1 (c, d) from the ``sampled_p/*`` metrics (grpo/sampled_tokens.py).

    token_probability.png  density of pi_old(sampled token), early vs late steps, one panel per method
    sparks.png             low-probability sampled tokens by decade of p, inside (sparks) and outside
                           (noise) the min-p support, early vs late, one panel per method

"Early" and "late" are the first and last ``WINDOW`` share of each run's logged steps (at least one
step), averaged over the steps and over a method's seeds: the bins are fixed, so the averages are
histograms themselves.
"""

from __future__ import annotations

import math
from pathlib import Path

from megatron_lpreg.grpo.sampled_tokens import LOW_DECADES, P_BINS, decade_label, hist_key, low_key
from megatron_lpreg.runs import Run

WINDOW = 0.1


def _window_mean(runs: list[Run], key: str, late: bool) -> float | None:
    """``key`` averaged over the early (or late) window of each run, then over the runs."""
    means = []
    for r in runs:
        if not r.has(key):
            continue
        values = [v for v in r.series[key][1] if math.isfinite(v)]
        if not values:
            continue
        n = max(1, round(WINDOW * len(values)))
        chunk = values[-n:] if late else values[:n]
        means.append(sum(chunk) / len(chunk))
    return sum(means) / len(means) if means else None


def _windows(members: list[Run]) -> tuple[int, int]:
    """The first and last step of the early and late windows, for the legend."""
    steps = sorted({s for r in members if r.has(hist_key(0)) for s in r.series[hist_key(0)][0]})
    n = max(1, round(WINDOW * len(steps)))
    return steps[n - 1], steps[-n]


def plot_token_probability(groups: list[tuple[str, list[Run]]], out_dir: Path, new_figure) -> Path | None:
    groups = [(label, m) for label, m in groups if any(r.has(hist_key(0)) for r in m)]
    if not groups:
        return None
    fig, axes = new_figure(1, len(groups), panel=(4.2, 3.2))
    width = 1.0 / P_BINS
    edges = [i * width for i in range(P_BINS + 1)]
    for ax, (label, members) in zip(axes, groups):
        early_end, late_start = _windows(members)
        for late, color, name in ((False, "#9ecae1", f"steps <= {early_end}"), (True, "#08519c", f"steps >= {late_start}")):
            shares = [_window_mean(members, hist_key(i), late) or 0.0 for i in range(P_BINS)]
            ax.stairs([s / width for s in shares], edges, color=color, linewidth=1.8, label=name)
        ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel(r"$\pi_{old}$(sampled token)")
        ax.set_ylabel("density")
        ax.legend(loc="upper left")
    out = out_dir / "token_probability.png"
    fig.savefig(out, format="png")
    return out


def plot_sparks(groups: list[tuple[str, list[Run]]], out_dir: Path, new_figure) -> Path | None:
    groups = [(label, m) for label, m in groups if any(r.has(low_key(True, 0)) for r in m)]
    if not groups:
        return None
    fig, axes = new_figure(1, len(groups), panel=(4.6, 3.2))
    x = list(range(LOW_DECADES))
    bars = ((True, False, "#a1d99b", "in support, early"), (True, True, "#238b45", "in support, late"),
            (False, False, "#fcae91", "outside, early"), (False, True, "#cb181d", "outside, late"))
    width = 0.2
    for ax, (label, members) in zip(axes, groups):
        for k, (inside, late, color, name) in enumerate(bars):
            shares = [_window_mean(members, low_key(inside, d), late) or 0.0 for d in x]
            ax.bar([i + (k - 1.5) * width for i in x], shares, width=width, color=color, label=name)
        ax.set_xticks(x, [decade_label(d) for d in x], rotation=30, fontsize=8)
        ax.set_title(label)
        ax.set_xlabel(r"$\pi_{old}$(sampled token)")
        ax.set_ylabel("share of sampled tokens")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=len(bars))
    out = out_dir / "sparks.png"
    fig.savefig(out, format="png")
    return out
