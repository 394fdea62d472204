"""How often the runs of a comparison take the rare "Carry:" route, from their samples.jsonl.

    python -m examples.explore_cpu.routes runs/explore_cpu_compare [--out routes.png]

For each OUT/<method>/seed<s>, the share of training responses (``kind: train``) containing
"Carry:" per step, averaged over a method's seeds; printed at the first, middle and last tenth of
the steps, and drawn per method (mean and min-max band over seeds) when ``--out`` is given.
The study's config logs every response of a step (``logging.samples_per_step: 64``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROUTE = "Carry:"


def route_shares(samples: Path) -> dict[int, float]:
    """step -> share of the step's logged training responses that take the carry route."""
    hits, total = defaultdict(int), defaultdict(int)
    for name in (samples.with_name(samples.name + ".1"), samples):  # the rotated older file first
        if not name.exists():
            continue
        for line in name.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("kind") != "train":
                continue
            hits[row["step"]] += ROUTE in row["response"]
            total[row["step"]] += 1
    return {s: hits[s] / total[s] for s in sorted(total)}


def method_shares(out: Path) -> dict[str, list[dict[int, float]]]:
    """method directory name -> one {step: share} per seed directory."""
    found = {}
    for method in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "plots"):
        seeds = [route_shares(s / "samples.jsonl") for s in sorted(method.glob("seed*")) if (s / "samples.jsonl").exists()]
        seeds = [s for s in seeds if s]  # a run that has not logged a training step yet
        if seeds:
            found[method.name] = seeds
    return found


def window_mean(shares: dict[int, float], where: str) -> float:
    steps = sorted(shares)
    n = max(1, len(steps) // 10)
    chunk = {"first": steps[:n], "middle": steps[len(steps) // 2 - n // 2:][:n], "last": steps[-n:]}[where]
    return sum(shares[s] for s in chunk) / len(chunk)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("compare_dir", type=Path)
    p.add_argument("--out", type=Path, help="write a figure of the carry-route share over steps")
    args = p.parse_args(argv)
    found = method_shares(args.compare_dir)
    if not found:
        print(f"no samples.jsonl under {args.compare_dir}/<method>/seed*", file=sys.stderr)
        return 2
    print("| method | seeds | carry route, first 10% of steps | middle 10% | last 10% |")
    print("|---|---|---|---|---|")
    for method, seeds in found.items():
        cells = []
        for where in ("first", "middle", "last"):
            vals = [window_mean(s, where) for s in seeds]
            cells.append(f"{sum(vals) / len(vals):.3f} ({min(vals):.2f}-{max(vals):.2f})")
        print(f"| {method} | {len(seeds)} | " + " | ".join(cells) + " |")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=90, layout="constrained")
        for method, seeds in found.items():
            steps = sorted(set.intersection(*(set(s) for s in seeds)))
            k = 5  # trailing mean over 5 steps: one step has only 64 responses
            rows = [[sum(s[x] for x in steps[max(0, i - k + 1):i + 1]) / len(steps[max(0, i - k + 1):i + 1])
                     for i in range(len(steps))] for s in seeds]
            mean = [sum(c) / len(c) for c in zip(*rows)]
            line, = ax.plot(steps, mean, label=method)
            ax.fill_between(steps, [min(c) for c in zip(*rows)], [max(c) for c in zip(*rows)],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel('share of responses taking "Carry:"')
        ax.set_title("The rare route (5-step trailing mean, band: seeds' range)")
        ax.legend(fontsize=8)
        fig.savefig(args.out, format="png")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
