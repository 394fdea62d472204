"""Start the ranks of a run on this machine when the user did not use torchrun.

``megatron-lpreg train`` at TP=2 on a laptop should just work: without torchrun's environment the
command re-executes itself as ``parallel.nproc`` local rank processes (default: one TP group). The
configuration is checked before anything is started, so a bad key still fails in one line rather
than once per rank.

The launcher watches its ranks: when one exits with an error or is killed, the others are stopped
(they would otherwise wait in a collective until ``parallel.timeout_s``) and one line per failed
rank says how it ended and the last phase it reported (``megatron_lpreg.faults``). The ranks exit
by themselves if the launcher dies, even by SIGKILL (``megatron_lpreg.lifetime``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_lpreg.faults import PHASE_DIR_ENV
from megatron_lpreg.lifetime import PARENT_ENV

TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL for a rank that does not stop (a hung one)


def under_launcher() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def local_processes(cfg) -> int:
    return cfg.parallel.nproc or cfg.parallel.tp


def rank_command(module_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_lpreg.cli", *module_args]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def last_phase(phase_dir: Path, rank: int) -> str:
    try:
        return (phase_dir / f"rank_{rank}").read_text() or "start"
    except OSError:
        return "start"


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def relaunch(nproc: int, module_args: list[str]) -> int:
    """Run ``megatron_lpreg.cli <module_args>`` on ``nproc`` local ranks; returns the exit status:
    0, or the first failed rank's status (128 + signal for a killed one)."""
    from megatron_lpreg.parallel import free_port

    env = dict(os.environ)
    # Each rank gets its share of the cores; torch would otherwise start one thread per core per rank.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), **{PARENT_ENV: str(os.getpid())})  # ranks end with us
    with tempfile.TemporaryDirectory(prefix="megatron-lpreg-ranks-") as tmp:
        phase_dir = Path(tmp)
        procs = [subprocess.Popen(rank_command(module_args), env={
            **env, "RANK": str(r), "LOCAL_RANK": str(r), PHASE_DIR_ENV: str(phase_dir)}) for r in range(nproc)]
        # Ctrl-C / a scheduler's SIGTERM reach the ranks too (a terminal's Ctrl-C reaches the whole
        # foreground group anyway; a plain `kill` of the launcher only reaches us).
        previous = {sig: signal.signal(sig, lambda s, _f: _stop(procs)) for sig in (signal.SIGTERM,)}
        try:
            failed = None
            while failed is None and any(p.poll() is None for p in procs):
                failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
                if failed is None:
                    time.sleep(0.2)
            if failed is None:
                failed = next((r for r, p in enumerate(procs) if p.returncode), None)
            if failed is None:
                return 0
            phases = {r: last_phase(phase_dir, r) for r in range(nproc)}
            code = procs[failed].returncode
            _stop(procs)
        except KeyboardInterrupt:  # Ctrl-C reached the ranks too; wait for them to go
            _stop(procs)
            return 130
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    others = "; ".join(f"rank {r} was at {phases[r]}" for r in range(nproc) if r != failed)
    print(f"megatron-lpreg: rank {failed} {describe_exit(code)} during {phases[failed]}"
          f"{'; ' + others if others else ''}; stopped the other ranks", file=sys.stderr, flush=True)
    return code if code > 0 else 128 - code
