"""The shipped example configurations and launchers (examples/qwen3_14b, examples/qwen2.5_32b,
examples/launch): they load, `plan` reads them, and the launcher really starts ranks under torchrun."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg.commands import plan
from megatron_lpreg.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PAPER_CONFIGS = {
    # file -> (built-in model for `plan`, rho, mini_batch_prompts)
    "qwen3_14b/onpolicy.yaml": ("qwen3-14b", 0.01, 256),
    "qwen3_14b/offpolicy.yaml": ("qwen3-14b", 0.01, 32),
    "qwen2.5_32b/onpolicy.yaml": ("qwen2.5-32b", 0.005, 256),
    "qwen2.5_32b/offpolicy.yaml": ("qwen2.5-32b", 0.005, 32),
}
LAUNCHER = EXAMPLES / "launch" / "torchrun.sh"
SBATCH = EXAMPLES / "launch" / "slurm.sbatch"
DRY_RUN_TIMEOUT_S = 120
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "PLAN",
                "PLAN_ARGS", "FORCE", "DRY_RUN", "TORCHRUN")


# ------------------------------------------------------------------------------------- configs
def test_every_example_yaml_loads():
    files = sorted(EXAMPLES.rglob("*.yaml"))
    assert {str(f.relative_to(EXAMPLES)) for f in files} >= set(PAPER_CONFIGS)
    for f in files:
        load_config(f)  # unknown keys or bad values raise ConfigError naming file and line


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_settings(name):
    _, rho, mini_batch = PAPER_CONFIGS[name]
    cfg = load_config(EXAMPLES / name)
    g, r, o, loss, v = cfg.grpo, cfg.rollout, cfg.optim, cfg.loss, cfg.validation
    assert (loss.enabled, loss.rho, loss.kappa, loss.threshold, loss.kl) == (True, rho, 0.02, "minp", "k3")
    assert (loss.eps_low, loss.eps_high, loss.beta) == (1.0, 9.0, 1.0)
    assert (g.prompts_per_step, g.mini_batch_prompts, g.epochs) == (256, mini_batch, 1)
    assert (r.n, r.temperature, r.top_p, r.top_k, r.max_tokens) == (8, 1.0, 1.0, 0, 8192)
    assert cfg.data.max_prompt_len == 2048 and cfg.model.dtype == "bfloat16"
    assert (o.lr, o.betas, o.weight_decay, o.clip_grad) == (1e-6, (0.9, 0.999), 0.0, 1.0)
    assert v.every == 8 and v.samples == {"aime": 16, "aime25": 16, "amc": 16} and v.sampled_temperature == 0.6
    assert len(v.files) == 6 and cfg.checkpoint.every == 64
    assert cfg.parallel.tp == 8
    # Both DP sizes the configs are meant for (64 GPUs at tp 8) divide the batch sizes.
    assert g.prompts_per_step % 8 == 0 and g.mini_batch_prompts % 8 == 0


# ----------------------------------------------------------------------------------------- plan
def _plan(name: str, *extra: str) -> int:
    parser = argparse.ArgumentParser(prog="megatron-lpreg plan")
    plan.add_arguments(parser)
    model = PAPER_CONFIGS[name][0]
    # model.path is a placeholder directory that is not here: plan the built-in shape instead.
    args = parser.parse_args(["--model", model, "--config", str(EXAMPLES / name),
                              "--nodes", "8", "--gpus-per-node", "8", *extra])
    return plan.run(args)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_plan_accepts_the_configs(name, capsys):
    rc = _plan(name)
    out = capsys.readouterr().out
    assert rc in (0, 3), out
    assert "fits: " in out and "tp 8 x dp 8" in out


def test_plan_verdicts_quoted_in_the_readmes(capsys):
    # Both fit on 8 x 8 H100 80 GiB at tp 8 with the distributed optimizer; the 32B one does not
    # without it (the optimizer step).
    assert _plan("qwen3_14b/onpolicy.yaml") == 0
    assert _plan("qwen2.5_32b/onpolicy.yaml") == 0
    capsys.readouterr()
    assert _plan("qwen2.5_32b/onpolicy.yaml", "--no-distributed-optimizer") == 3
    assert "optimizer step needs" in capsys.readouterr().out


def _plan_json(name: str, *extra: str, capsys) -> dict:
    _plan(name, "--json", *extra)
    return json.loads(capsys.readouterr().out)


def _prose(path: Path) -> str:
    """A README's or a YAML's text with line breaks and comment marks folded into single spaces."""
    return re.sub(r"\s*\n\s*#?\s*|\s+", " ", path.read_text())


@pytest.mark.parametrize("example", ["qwen3_14b", "qwen2.5_32b"])
def test_the_readme_shows_what_plan_prints(example, capsys):
    block = re.search(r"```text\n(.*?)```", (EXAMPLES / example / "README.md").read_text(), re.S).group(1)
    assert _plan(f"{example}/onpolicy.yaml") == 0
    assert capsys.readouterr().out == block


# (config, extra plan flags, files quoting its peaks: training micro-batch / optimizer step / rollout)
PEAK_CLAIMS = [
    ("qwen3_14b/onpolicy.yaml", (), ["qwen3_14b/onpolicy.yaml", "qwen3_14b/offpolicy.yaml"]),
    ("qwen3_14b/onpolicy.yaml", ("--tp", "4"), ["qwen3_14b/README.md"]),
    ("qwen2.5_32b/onpolicy.yaml", (), ["qwen2.5_32b/onpolicy.yaml", "qwen2.5_32b/offpolicy.yaml"]),
    ("qwen2.5_32b/onpolicy.yaml", ("--no-distributed-optimizer",), ["qwen2.5_32b/README.md"]),
]


@pytest.mark.parametrize("name, extra, files", PEAK_CLAIMS)
def test_the_peaks_the_examples_quote_are_plans(name, extra, files, capsys):
    p = _plan_json(name, *extra, capsys=capsys)
    quoted = (f"peaks {p['training_peak_gib']:.0f} / {p['step_peak_gib']:.0f} / "
              f"{p['rollout_peak_gib']:.0f} GiB")
    for f in files:
        assert quoted in _prose(EXAMPLES / f), (f, quoted)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_what_the_trainer_keeps_through_the_rollout_is_the_plans(name, capsys):
    p = _plan_json(name, capsys=capsys)
    kept = p["rollout_peak_gib"] - p["engine_reserved_gib"] - p["overhead_gib"]
    assert f"the trainer keeps ~{kept:.0f} GiB through the rollout" in _prose(EXAMPLES / name)


def test_rollout_engine_auto_is_vllm_on_cuda_with_vllm_installed(monkeypatch):
    """What the examples' `rollout.engine: auto` comment says (and no example says vllm is refused)."""
    import torch

    from megatron_lpreg.rollout import vllm_engine
    from megatron_lpreg.rollout.build import rollout_engine_kind

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    assert rollout_engine_kind("auto") == "vllm" and rollout_engine_kind("vllm") == "vllm"
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    assert rollout_engine_kind("auto") == "hf"
    for f in EXAMPLES.rglob("*"):
        if f.suffix in (".yaml", ".md"):
            assert "refuses vllm" not in _prose(f), f


# ------------------------------------------------------------------------------------- launchers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**values) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHON=sys.executable)
    env.update({k: str(v) for k, v in values.items()})
    return env


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S)


def _tail(proc) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def test_launchers_are_valid_bash():
    for script in (LAUNCHER, SBATCH):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert os.stat(LAUNCHER).st_mode & stat.S_IXUSR


def test_launcher_usage():
    proc = _run(["bash", str(LAUNCHER)], _env())
    assert proc.returncode == 2 and "usage: examples/launch/torchrun.sh CONFIG" in proc.stderr
    proc = _run(["bash", str(LAUNCHER), "examples/no_such.yaml"], _env())
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_launcher_dry_run_starts_two_ranks_under_torchrun():
    env = _env(NPROC_PER_NODE=2, DRY_RUN=1, PLAN=0, MASTER_PORT=_free_port())
    proc = _run(["bash", str(LAUNCHER), "examples/qwen3_14b/onpolicy.yaml", "parallel.tp=2",
                 "parallel.backend=gloo"], env)
    assert proc.returncode == 0, _tail(proc)
    assert "--nnodes=1" in proc.stderr and "--dry-run" in proc.stderr, _tail(proc)
    # Both ranks share stdout, so their lines may interleave: search, do not split on newlines.
    ranks = sorted(re.findall(r"dry run: rank (\d+)/2 tp_rank \d/2 dp_rank 0/1 backend gloo", proc.stdout))
    assert ranks == ["0", "1"], _tail(proc)


def test_launcher_refuses_a_run_plan_says_does_not_fit():
    # tp 2 on one node of 8 x 80 GiB: the 14B optimizer state alone is 110 GiB per GPU.
    env = _env(NPROC_PER_NODE=8, PLAN_ARGS="--model qwen3-14b", MASTER_PORT=_free_port())
    proc = _run(["bash", str(LAUNCHER), "examples/qwen3_14b/onpolicy.yaml", "parallel.tp=2"], env)
    assert proc.returncode == 3, _tail(proc)
    assert "does not fit" in proc.stderr and "torch.distributed.run" not in proc.stderr, _tail(proc)


def test_slurm_script_starts_one_launcher_per_node(tmp_path):
    """slurm.sbatch with stand-ins for scontrol and srun: 2 'nodes' on this machine, 1 rank each."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A long host list: a reader that stops after the first line would hit SIGPIPE (exit 141).
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\nyes 127.0.0.1 | head -n 200000\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        "# srun stand-in: drop the options, run the command once per node with SLURM_NODEID set\n"
        "n=1\n"
        "while [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && n=${1#--nodes=}; shift; done\n"
        "pids=()\n"
        "for ((i = 0; i < n; i++)); do SLURM_NODEID=$i \"$@\" & pids+=($!); done\n"
        "rc=0; for p in \"${pids[@]}\"; do wait $p || rc=$?; done; exit $rc\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_SUBMIT_DIR=ROOT,
               SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_ID=4242, SLURM_JOB_NUM_NODES=2,
               SLURM_GPUS_PER_NODE="h100:1", MASTER_PORT=_free_port(), DRY_RUN=1, PLAN=0)
    proc = _run(["bash", str(SBATCH), "examples/qwen3_14b/onpolicy.yaml", "parallel.tp=2",
                 "parallel.backend=gloo"], env)
    assert proc.returncode == 0, _tail(proc)
    assert "2 nodes x 1 GPUs, master 127.0.0.1" in proc.stdout, _tail(proc)
    assert "--nnodes=2 --node-rank=0 --nproc-per-node=1 --master-addr=127.0.0.1" in proc.stderr, _tail(proc)
    ranks = sorted(re.findall(r"dry run: rank (\d+)/2 tp_rank \d/2", proc.stdout))
    assert ranks == ["0", "1"], _tail(proc)
