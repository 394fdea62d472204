"""``megatron-lpreg compare``: several loss methods, several seeds, one configuration, then plotted.

    megatron-lpreg compare --methods grpo,entropy_bonus,clip_higher,kl_cov,lpreg --seeds 3

Trains each method (a loss preset on top of the configuration) with each seed (``grpo.seed``,
then +1, +2, ...) into OUT/<method>/seed<seed>, then draws every run into OUT/plots: a method's
seeds as their mean with the spread between the lowest and highest, and writes comparison.md with
a per-method table (mean +- standard deviation over seeds). A run directory that already holds a
finished run resumes from its last checkpoint, so an interrupted comparison picks up where it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_lpreg.commands import train
from megatron_lpreg.config import load_config

# method name -> (legend label, loss preset)
METHODS: dict[str, tuple[str, str]] = {
    "grpo": ("GRPO", "grpo"),
    "clip_higher": ("Clip-Higher", "clip_higher"),
    "entropy_bonus": ("Entropy bonus", "entropy_bonus"),
    "kl_cov": ("KL-Cov", "kl_cov"),
    "80_20": ("80/20", "80_20"),
    "gspo": ("GSPO", "gspo"),
    "lpreg": ("Lp-Reg", "lp_reg"),
}
DEFAULT_METHODS = "grpo,lpreg"


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {text!r}: unknown {unknown or 'empty list'}; known: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods {text!r}: a method is listed twice")
    return methods


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML run configuration (see examples/)")
    p.add_argument("--out", default=None, metavar="DIR", help="default: <run_dir>_compare")
    p.add_argument("--methods", default=DEFAULT_METHODS, metavar="A,B",
                   help=f"loss methods to train, any of {', '.join(METHODS)} (default {DEFAULT_METHODS})")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="seeds per method: grpo.seed, grpo.seed + 1, ... (default 1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")


def run(args) -> int:
    from megatron_lpreg.commands.plot import plot_runs
    from megatron_lpreg.commands.report import COMPARISON_FILE

    try:
        methods = parse_methods(args.methods)
    except ValueError as err:
        print(f"megatron-lpreg compare: {err}", flush=True)
        return 2
    if args.seeds < 1:
        print(f"megatron-lpreg compare: --seeds {args.seeds}: expected >= 1", flush=True)
        return 2
    config = args.config or str(train.DEMO_CONFIG)
    base = load_config(config, args.overrides)
    out = Path(args.out or f"{base.run_dir}_compare")
    run_dirs, labels = [], []
    for method in methods:
        label, preset = METHODS[method]
        for seed in range(base.grpo.seed, base.grpo.seed + args.seeds):
            run_dir = out / method / f"seed{seed}"
            print(f"megatron-lpreg compare: {label}, seed {seed}, in {run_dir}", flush=True)
            overrides = [*args.overrides, f"loss.preset={preset}", f"grpo.seed={seed}", f"run_dir={run_dir}"]
            code = train.run(argparse.Namespace(config=args.config, max_steps=None, dry_run=False,
                                                overrides=overrides))
            if code:
                return code
            run_dirs.append(run_dir)
            labels.append(label)
    if train.rank() == 0:
        plot_runs(run_dirs, out / "plots", labels=labels)
        print((out / "plots" / COMPARISON_FILE).read_text(encoding="utf-8"))
        print(f"figures: {out / 'plots'}", flush=True)
    return 0
