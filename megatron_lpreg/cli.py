"""``megatron-lpreg``: the command line.

    megatron-lpreg train [--config FILE] [key=value ...]   GRPO + Lp-Reg; no --config: the CPU demo
    megatron-lpreg compare [--config FILE] [key=value ...] plain GRPO vs Lp-Reg, same seed, plotted
    megatron-lpreg evaluate --ckpt DIR --data FILE ...      avg@k per data_source of a checkpoint
    megatron-lpreg plan --model qwen3-14b --nodes 8 --tp 8  per-GPU memory, before a launch
    megatron-lpreg plot RUN_DIR [RUN_DIR ...]              paper-style figures, runs overlaid
    megatron-lpreg verify-refit --config FILE | --model DIR engine log-probs = Megatron's after a refit?

``train`` starts its own ranks (``parallel.nproc``, default one TP group) when not under torchrun;
under ``torchrun ... -m megatron_lpreg.cli train ...`` the launcher's ranks are used as they are.
A configuration, data or checkpoint problem exits with status 2 and one line saying where it is.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import yaml

from megatron_lpreg.checkpointing import CheckpointError
from megatron_lpreg.config import ConfigError, config_to_dict, load_config
from megatron_lpreg.data import DataError
from megatron_lpreg.model import ModelConfigError
from megatron_lpreg.parallel import ParallelConfigError
from megatron_lpreg.weights.hf_files import HFCheckpointError
from megatron_lpreg.grpo.skips import TrainingDiverged

USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelConfigError, ParallelConfigError, HFCheckpointError)
REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "examples" / "tiny_cpu" / "config.yaml"


def _uses_demo_assets(config: str | None, cfg) -> bool:
    """The demo config with its own model path (not one the user pointed elsewhere)."""
    if config is not None and Path(config).resolve() != DEMO_CONFIG:
        return False
    return cfg.model.path == load_config(DEMO_CONFIG).model.path


def _prepare_demo(cfg) -> None:
    """The demo's model and prompts are built on first use (about a minute), then reused."""
    sys.path.insert(0, str(REPO))
    from examples.tiny_cpu.prepare import is_complete, prepare

    out = Path(cfg.model.path).parent
    if not is_complete(out):
        print(f"megatron-lpreg: preparing the demo model and data in {out} (once)", flush=True)
        prepare(out)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _train(args) -> int:
    from megatron_lpreg.launch import local_processes, relaunch, under_launcher
    from megatron_lpreg.preflight import check_run

    config = args.config
    if config is None:
        if not DEMO_CONFIG.exists():
            raise ConfigError("no --config given and the demo config examples/tiny_cpu/config.yaml is not here")
        config = str(DEMO_CONFIG)
    cfg = load_config(config, args.overrides)
    if not under_launcher():
        if _uses_demo_assets(args.config, cfg):
            _prepare_demo(cfg)
        nproc = local_processes(cfg)
        if not args.dry_run:
            check_run(cfg, nproc)
        if nproc > 1:
            argv = ["train", "--config", config, *args.overrides]
            if args.max_steps is not None:
                argv += ["--max-steps", str(args.max_steps)]
            if args.dry_run:
                argv.append("--dry-run")
            return relaunch(nproc, argv)
    if _rank() == 0:
        print("# resolved configuration\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False), flush=True)
    if args.dry_run:
        return _dry_run(cfg)

    from megatron_lpreg.grpo.trainer import GRPOTrainer

    try:
        with GRPOTrainer(cfg) as trainer:
            trainer.fit(max_steps=args.max_steps)
    except Exception as e:
        if not isinstance(e, (*USER_ERRORS, TrainingDiverged)):
            # Which rank and where: a collective that timed out or lost its peer says neither.
            from megatron_lpreg import faults

            first = (str(e).strip().splitlines() or [""])[0][:300]
            print(f"megatron-lpreg: rank {_rank()} failed during {faults.where()}: {type(e).__name__}: {first}",
                  file=sys.stderr, flush=True)
        raise
    finally:
        _shutdown()
    if _rank() == 0:
        from megatron_lpreg.plot import PlotError, run_summary

        try:
            print(run_summary(cfg.run_dir), flush=True)
        except PlotError:  # nothing was logged (e.g. --max-steps 0)
            pass
    return 0


COMPARED = (("grpo", "GRPO", ["loss.enabled=false"]), ("lp_reg", "Lp-Reg", []))


def _compare(args) -> int:
    """Plain GRPO, then Lp-Reg, on one configuration; then their figures and comparison table."""
    from megatron_lpreg.plot import COMPARISON_FILE, plot_runs

    config = args.config or str(DEMO_CONFIG)
    out = Path(args.out or f"{load_config(config, args.overrides).run_dir}_compare")
    run_dirs = []
    for name, label, extra in COMPARED:
        run_dir = out / name
        print(f"megatron-lpreg compare: {label} in {run_dir}", flush=True)
        train_args = argparse.Namespace(config=args.config, max_steps=None, dry_run=False,
                                        overrides=[*args.overrides, *extra, f"run_dir={run_dir}"])
        code = _train(train_args)
        if code:
            return code
        run_dirs.append(run_dir)
    if _rank() == 0:
        plot_runs(run_dirs, out / "plots", labels=[label for _, label, _ in COMPARED])
        print((out / "plots" / COMPARISON_FILE).read_text(encoding="utf-8"))
        print(f"figures: {out / 'plots'}", flush=True)
    return 0


def _dry_run(cfg) -> int:
    """Bring up the process groups as a real run would, report the layout, and stop."""
    from megatron_lpreg.parallel import init_distributed

    try:
        ctx = init_distributed(cfg.parallel.tp, cfg.parallel.backend, cfg.parallel.timeout_s, seed=cfg.grpo.seed)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        # One write per line: the ranks share stdout, and print() writes the newline separately.
        sys.stdout.write(f"dry run: rank {ctx.rank}/{ctx.world_size} tp_rank {ctx.tp_rank}/{ctx.tp_size} "
                         f"dp_rank {ctx.dp_rank}/{ctx.dp_size} backend {ctx.backend}\n")
        sys.stdout.flush()
    finally:
        _shutdown()
    return 0


def _shutdown() -> None:
    import torch.distributed as dist

    from megatron_lpreg.parallel import destroy_distributed

    destroy_distributed()
    if dist.is_initialized():
        dist.destroy_process_group()


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, like every other error of the command (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megatron-lpreg", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run GRPO with Lp-Reg",
                           description="Run GRPO with Lp-Reg. Settings: defaults < --config < key=value. "
                                       "Without --config: the CPU demo (examples/tiny_cpu).")
    train.add_argument("--config", help="YAML run configuration (see examples/)")
    train.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many steps of this invocation (resume continues later)")
    train.add_argument("--dry-run", action="store_true",
                       help="start the ranks and process groups, print the layout, and exit")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. grpo.steps=10 loss.preset=grpo run_dir=runs/x")
    train.set_defaults(func=_train)
    compare = sub.add_parser("compare", help="plain GRPO vs Lp-Reg on one configuration, plotted",
                             description="Train twice with the same settings and seed: plain GRPO "
                                         "(loss.enabled=false) into OUT/grpo, then Lp-Reg into OUT/lp_reg; "
                                         "then draw both into OUT/plots and print comparison.md. "
                                         "Without --config: the CPU demo.")
    compare.add_argument("--config", help="YAML run configuration (see examples/)")
    compare.add_argument("--out", default=None, metavar="DIR", help="default: <run_dir>_compare")
    compare.add_argument("overrides", nargs="*", metavar="key=value", help="applied to both runs")
    compare.set_defaults(func=_compare)
    from megatron_lpreg import evaluate, plan, plot, verify_refit

    for name, module, help_text in (
        ("evaluate", evaluate, "avg@k of a checkpoint on prompt files"),
        ("plan", plan, "per-GPU memory estimate for a run"),
        ("plot", plot, "figures of one or more runs"),
        ("verify-refit", verify_refit, "check the refit: engine vs Megatron log-probs on fixed sequences"),
    ):
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


# megatron-core's notices about optional fused kernels and CUDA tuning, printed once per rank at
# import: they say nothing a user can act on here (the fallbacks are the tested paths).
QUIET_WARNINGS = (
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"When using async grad allreduce it is recommended",
    r"full scope is deprecated",
    r"MLP requires ffn_hidden_size",
)


def main(argv=None) -> int:
    if not os.environ.get("MEGATRON_LPREG_ALL_WARNINGS"):
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
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
