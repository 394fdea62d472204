"""``megatron-lpreg compare``: plain GRPO vs Lp-Reg on one configuration and seed, then plotted.

Trains twice with the same settings: plain GRPO (``loss.enabled=false``) into OUT/grpo, then
Lp-Reg into OUT/lp_reg; draws both into OUT/plots and prints comparison.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_lpreg.commands import train
from megatron_lpreg.config import load_config

COMPARED = (("grpo", "GRPO", ["loss.enabled=false"]), ("lp_reg", "Lp-Reg", []))


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML run configuration (see examples/)")
    p.add_argument("--out", default=None, metavar="DIR", help="default: <run_dir>_compare")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to both runs")


def run(args) -> int:
    from megatron_lpreg.commands.plot import plot_runs
    from megatron_lpreg.commands.report import COMPARISON_FILE

    config = args.config or str(train.DEMO_CONFIG)
    out = Path(args.out or f"{load_config(config, args.overrides).run_dir}_compare")
    run_dirs = []
    for name, label, extra in COMPARED:
        run_dir = out / name
        print(f"megatron-lpreg compare: {label} in {run_dir}", flush=True)
        train_args = argparse.Namespace(config=args.config, max_steps=None, dry_run=False,
                                        overrides=[*args.overrides, *extra, f"run_dir={run_dir}"])
        code = train.run(train_args)
        if code:
            return code
        run_dirs.append(run_dir)
    if train.rank() == 0:
        plot_runs(run_dirs, out / "plots", labels=[label for _, label, _ in COMPARED])
        print((out / "plots" / COMPARISON_FILE).read_text(encoding="utf-8"))
        print(f"figures: {out / 'plots'}", flush=True)
    return 0
