"""``megatron-lpreg``: the command line.

    megatron-lpreg train [--config FILE] [key=value ...]   GRPO + Lp-Reg; no --config: the CPU demo
    megatron-lpreg compare [--config FILE] [key=value ...] plain GRPO vs Lp-Reg, same seed, plotted
    megatron-lpreg evaluate --ckpt DIR --data FILE ...      avg@k per data_source of a checkpoint
    megatron-lpreg plan --model qwen3-14b --nodes 8 --tp 8  per-GPU memory, before a launch
    megatron-lpreg plot RUN_DIR [RUN_DIR ...]              paper-style figures, runs overlaid
    megatron-lpreg verify-refit --config FILE | --model DIR engine log-probs = Megatron's after a refit?
    megatron-lpreg config-reference                        the configuration reference (Markdown)

``train`` starts its own ranks (``parallel.nproc``, default one TP group) when not under torchrun;
under ``torchrun ... -m megatron_lpreg.cli train ...`` the launcher's ranks are used as they are.
A configuration, data or checkpoint problem exits with status 2 and one line saying where it is.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from megatron_lpreg import lifetime

if __name__ == "__mp_main__":
    # A multiprocessing child of a megatron-lpreg command (a reward worker, megatron-core's checkpoint
    # writer manager, ...) runs this module first: it must not outlive the command (lifetime.py).
    lifetime.exit_with_parent()

from megatron_lpreg.commands import USER_ERRORS  # noqa: E402
from megatron_lpreg.grpo.skips import TrainingDiverged  # noqa: E402

# (subcommand, module in megatron_lpreg.commands, help, description; None: the module's docstring)
COMMANDS = (
    ("train", "train", "run GRPO with Lp-Reg",
     "Run GRPO with Lp-Reg. Settings: defaults < --config < key=value. Without --config: the CPU demo "
     "(examples/tiny_cpu)."),
    ("compare", "compare", "plain GRPO vs Lp-Reg on one configuration, plotted",
     "Train twice with the same settings and seed: plain GRPO (loss.enabled=false) into OUT/grpo, then "
     "Lp-Reg into OUT/lp_reg; then draw both into OUT/plots and print comparison.md. Without --config: "
     "the CPU demo."),
    ("evaluate", "evaluate", "avg@k of a checkpoint on prompt files", None),
    ("plan", "plan", "per-GPU memory estimate for a run", None),
    ("plot", "plot", "figures of one or more runs", None),
    ("verify-refit", "verify_refit", "check the refit: engine vs Megatron log-probs on fixed sequences", None),
    ("config-reference", "config_reference", "print the configuration reference (docs/configuration.md)", None),
)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, like every other error of the command (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megatron-lpreg", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name, help_text, description in COMMANDS:
        module = importlib.import_module(f"megatron_lpreg.commands.{module_name}")
        if description is None:
            p = sub.add_parser(name, help=help_text, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        else:
            p = sub.add_parser(name, help=help_text, description=description)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv=None) -> int:
    # Started by another megatron-lpreg process (a rank of the launcher, ...): end with it.
    if lifetime.started_by_megatron_lpreg():
        lifetime.exit_with_parent()
    lifetime.mark_as_parent()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines are about its internals
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"megatron-lpreg: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"megatron-lpreg: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
