"""``megatron-lpreg``: the command line.

    megatron-lpreg train --config FILE [key=value ...]     GRPO + Lp-Reg (run under torchrun for TP x DP)

A configuration, data or checkpoint problem exits with status 2 and one line saying where it is.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_lpreg.checkpointing import CheckpointError
from megatron_lpreg.config import ConfigError, load_config
from megatron_lpreg.data import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _train(args) -> None:
    from megatron_lpreg.grpo.trainer import GRPOTrainer
    from megatron_lpreg.parallel import destroy_distributed

    cfg = load_config(args.config, args.overrides)
    try:
        with GRPOTrainer(cfg) as trainer:
            trainer.fit(max_steps=args.max_steps)
    finally:
        destroy_distributed()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-lpreg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run GRPO with Lp-Reg",
                           description="Run GRPO with Lp-Reg. Settings: defaults < --config < key=value.")
    train.add_argument("--config", help="YAML run configuration (see examples/)")
    train.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many steps of this invocation (resume continues later)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. grpo.steps=10 loss.preset=grpo run_dir=runs/x")
    train.set_defaults(func=_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"megatron-lpreg: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
