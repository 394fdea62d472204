"""Start the ranks of a run on this machine when the user did not use torchrun.

``megatron-lpreg train`` at TP=2 on a laptop should just work: without torchrun's environment the
command re-executes itself under ``torch.distributed.run --standalone`` with ``parallel.nproc``
processes (default: one TP group). The configuration is checked before anything is started, so a
bad key still fails in one line rather than once per rank.
"""

from __future__ import annotations

import os
import subprocess
import sys

TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def under_launcher() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def local_processes(cfg) -> int:
    return cfg.parallel.nproc or cfg.parallel.tp


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_lpreg.cli", *module_args]


def relaunch(nproc: int, module_args: list[str]) -> int:
    """Run ``megatron_lpreg.cli <module_args>`` on ``nproc`` local ranks; returns the exit status."""
    env = dict(os.environ)
    # Each rank gets its share of the cores; torch would otherwise start one thread per core per rank.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(torchrun_command(nproc, module_args), env=env)
