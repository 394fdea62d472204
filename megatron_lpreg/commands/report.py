"""What a run (or several) came to, as text: the summary ``train`` prints at its end and the
``comparison.md`` table that ``plot`` and ``compare`` write next to the figures.

comparison.md: per run, first / last / best validation accuracy (``val/mean``) and first / last
entropy, then per data source, then the training metrics' first / last values; values as logged.
Runs sharing a label (a method's seeds) also get one row per label: best and final validation
accuracy and entropy at start / lowest / end, as mean +- sample standard deviation over the runs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from megatron_lpreg.runs import Run, group_by_label, load_run

COMPARISON_FILE = "comparison.md"
VAL_MEAN = "val/mean"
_VAL_SOURCE = re.compile(r"^val/(?P<source>.+)/avg@(?P<k>\d+)$")


def val_source_keys(runs: list[Run]) -> list[str]:
    """The per-source validation keys (``val/<source>/avg@k``) any of ``runs`` logged, sorted."""
    return sorted({k for r in runs for k in r.series if _VAL_SOURCE.match(k) and r.has(k)})


def source_title(key: str) -> str:
    m = _VAL_SOURCE.match(key)
    return f"{m['source']} (avg@{m['k']})"



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


def _row_names(runs: list[Run]) -> dict[int, str]:
    """id(run) -> the name of its row in the per-run tables: the label, and where several runs share
    it (a method's seeds) the run directory's name too, so that their rows can be told apart."""
    count: dict[str, int] = {}
    for r in runs:
        count[r.label] = count.get(r.label, 0) + 1
    return {id(r): _cell(r.label if count[r.label] == 1 else f"{r.label} ({r.path.name})") for r in runs}


def write_comparison(runs: list[Run], path: str | Path) -> Path:
    """``comparison.md``: validation accuracy and entropy, first vs last vs best, one row per run."""
    path = Path(path)
    name = _row_names(runs)
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
            name[id(r)], r.method or "n/a",
            _fmt(v["first"]), _fmt(v["last"]), _fmt(v["best"]),
            "n/a" if v["best_step"] is None else str(v["best_step"]),
            _delta(v["first"], v["last"]),
            _fmt(e["first"]), _fmt(e["last"]), _delta(e["first"], e["last"]),
            "n/a" if r.last_step is None else str(r.last_step),
        ])
    lines += _table(["run", "loss", "val first", "val last", "val best", "best step", "val Δ",
                     "entropy first", "entropy last", "entropy Δ", "last step"], rows)

    sources = val_source_keys(runs)
    if sources:
        lines += ["", "## Validation accuracy per data source (first / last / best)", ""]
        rows = []
        for key in sources:
            for r in runs:
                v = _first_last_best(r, key)
                if v["first"] is None:
                    continue
                rows.append([_cell(source_title(key)), name[id(r)], _fmt(v["first"]), _fmt(v["last"]),
                             _fmt(v["best"]), str(v["best_step"])])
        lines += _table(["source", "run", "first", "last", "best", "best step"], rows)

    lines += _per_method(runs)

    train_keys = [k for k in ("reward/mean", "response/length_mean", "lpreg/delta_rho", "lpreg/pass_share")
                  if any(r.has(k) for r in runs)]
    if train_keys:
        lines += ["", "## Training metrics (first / last)", ""]
        rows = []
        for r in runs:
            row = [name[id(r)]]
            for k in train_keys:
                v = _first_last_best(r, k)
                fmt = _TRAIN_FORMATS.get(k, "{:.4f}")
                row.append(" / ".join("n/a" if v[x] is None else fmt.format(v[x]) for x in ("first", "last")))
            rows.append(row)
        lines += _table(["run", *train_keys], rows)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def _per_method(runs: list[Run]) -> list[str]:
    """One row per label with several runs: each statistic taken per run, then over the runs."""
    groups = [(label, members) for label, members in group_by_label(runs) if len(members) > 1]
    if not groups:
        return []
    rows = []
    for label, members in groups:
        val = [_first_last_best(r, VAL_MEAN) for r in members]
        ent = [_finite(r, "entropy/mean")[1] for r in members]
        ent = [e for e in ent if e]
        rows.append([
            _cell(label), str(len(members)),
            _mean_std([v["best"] for v in val if v["best"] is not None]),
            _mean_std([v["last"] for v in val if v["last"] is not None]),
            _mean_std([e[0] for e in ent]), _mean_std([min(e) for e in ent]), _mean_std([e[-1] for e in ent]),
        ])
    return ["", "## Per method: mean ± standard deviation over its runs (seeds)", "",
            *_table(["method", "runs", "val best", "val last", "entropy first", "entropy min", "entropy last"],
                    rows)]


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


