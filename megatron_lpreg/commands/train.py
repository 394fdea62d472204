"""``megatron-lpreg train``: GRPO with Lp-Reg; without --config, the CPU demo (examples/tiny_cpu).

Outside torchrun the command starts its own ranks (``parallel.nproc``, default one TP group) after
checking everything they will read (commands/preflight.py); under ``torchrun ... -m
megatron_lpreg.cli train ...`` the launcher's ranks are used as they are.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from megatron_lpreg.config import ConfigError, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "tiny_cpu" / "config.yaml"


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML run configuration (see examples/)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of this invocation (resume continues later)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything train checks before it starts (model, TP/DP layout, weights, "
                        "prompt files, checkpoints), then start the ranks and process groups, print the "
                        "layout, and exit; under torchrun only the process groups are checked")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. grpo.steps=10 loss.preset=grpo run_dir=runs/x")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _demo_assets(config: str | None, cfg) -> str | None:
    """What of the demo's generated files the run uses: "all" (the demo config with its own model),
    "data" (its prompts, another model: ``model.path=...``) or None (not the demo config)."""
    if config is not None and Path(config).resolve() != DEMO_CONFIG:
        return None
    demo = load_config(DEMO_CONFIG)
    if cfg.model.path == demo.model.path:
        return "all"
    return "data" if list(cfg.data.train_files) == list(demo.data.train_files) else None


def _prepare_demo(cfg, data_only: bool) -> None:
    """The demo's model and prompts are built on first use (about a minute), then reused; its prompts
    alone take a second."""
    sys.path.insert(0, str(REPO))
    from examples.tiny_cpu.prepare import is_complete, prepare, prepare_data

    if data_only:
        files = [Path(f) for f in [*cfg.data.train_files, *cfg.validation.files]]
        if not all(f.is_file() for f in files):
            prepare_data(files[0].parent, log=lambda line: print(f"megatron-lpreg: {line}", flush=True))
        return
    out = Path(cfg.model.path).parent
    if not is_complete(out):
        print(f"megatron-lpreg: preparing the demo model and data in {out} (once)", flush=True)
        prepare(out)


def run(args) -> int:
    from megatron_lpreg.commands.launch import local_processes, relaunch, under_launcher
    from megatron_lpreg.commands.preflight import check_run

    config = args.config
    if config is None:
        if not DEMO_CONFIG.exists():
            raise ConfigError("no --config given and the demo config examples/tiny_cpu/config.yaml is not here")
        config = str(DEMO_CONFIG)
    cfg = load_config(config, args.overrides)
    if not under_launcher():
        demo = _demo_assets(args.config, cfg)
        if demo is not None:
            _prepare_demo(cfg, data_only=demo == "data")
        nproc = local_processes(cfg)
        check_run(cfg, nproc)
        if nproc > 1:
            argv = ["train", "--config", config, *args.overrides]
            if args.max_steps is not None:
                argv += ["--max-steps", str(args.max_steps)]
            if args.dry_run:
                argv.append("--dry-run")
            return relaunch(nproc, argv)
    if rank() == 0:
        print("# resolved configuration\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False), flush=True)
    if args.dry_run:
        return _dry_run(cfg)

    from megatron_lpreg.commands import USER_ERRORS
    from megatron_lpreg.grpo.skips import TrainingDiverged
    from megatron_lpreg.grpo.trainer import GRPOTrainer
    from megatron_lpreg.parallel import destroy_distributed

    try:
        with GRPOTrainer(cfg) as trainer:
            trainer.fit(max_steps=args.max_steps)
    except Exception as e:
        if not isinstance(e, (*USER_ERRORS, TrainingDiverged)):
            # Which rank and where: a collective that timed out or lost its peer says neither.
            from megatron_lpreg import faults

            first = (str(e).strip().splitlines() or [""])[0][:300]
            print(f"megatron-lpreg: rank {rank()} failed during {faults.where()}: {type(e).__name__}: {first}",
                  file=sys.stderr, flush=True)
        raise
    finally:
        destroy_distributed()
    if rank() == 0:
        from megatron_lpreg.commands.report import run_summary
        from megatron_lpreg.runs import RunError

        try:
            print(run_summary(cfg.run_dir), flush=True)
        except RunError:  # nothing was logged (e.g. --max-steps 0)
            pass
    return 0


def _dry_run(cfg) -> int:
    """Bring up the process groups as a real run would, report the layout, and stop."""
    from megatron_lpreg.parallel import barrier, destroy_distributed, init_distributed, world_group

    try:
        ctx = init_distributed(cfg.parallel.tp, cfg.parallel.backend, cfg.parallel.timeout_s, seed=cfg.grpo.seed)
        barrier(world_group())
        # One write per line: the ranks share stdout, and print() writes the newline separately.
        sys.stdout.write(f"dry run: rank {ctx.rank}/{ctx.world_size} tp_rank {ctx.tp_rank}/{ctx.tp_size} "
                         f"dp_rank {ctx.dp_rank}/{ctx.dp_size} backend {ctx.backend}\n")
        sys.stdout.flush()
    finally:
        destroy_distributed()
    return 0
