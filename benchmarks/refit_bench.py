"""Refit from Megatron TP=2 shards into the rollout engine, against a plain memcpy, in one run.

    python benchmarks/refit_bench.py --engine vllm [--hidden ...] [--repeats 3]   # in the vLLM venv

``--engine vllm``: the same synthetic model into an SPMD vLLM engine of TP=2 (a shard on each rank,
``rollout/vllm_engine.py``), refit shard-to-shard (``weights/engine_shards.py``): each rank writes
its own Megatron shards into its own engine shard. Per rank: refit seconds against a memcpy of the
bytes this rank wrote (``refit/memcpy = X``, the bandwidth ratio), and the peak extra memory of the
refit (VmHWM reset before it, minus VmRSS; ranks started with MALLOC_MMAP_THRESHOLD_ as below).
The default (``--engine hf``) is the transformers engine:

    python benchmarks/refit_bench.py [--hidden 1024] [--layers 4] [--ffn 5504] [--vocab 151936]
                                     [--bucket-mb 16 64 256 512] [--timing-bucket-mb 512] [--repeats 3]

Builds a synthetic float32 Qwen2 model (random weights; default ~1.5 GB: vocab 151,936, untied
embedding and output layer, 4 layers of hidden 1024) as Megatron TP=2 shards on 2 gloo ranks, and an
``HFEngine`` (from the same HF config, no weights loaded) on TP rank 0. Then, on rank 0, measures
side by side, alternating, ``--repeats`` times each (medians reported):

  refit    stream_hf_weights(dst_tp_rank=0) + engine.update_weights, as ``GRPOTrainer.refit`` runs it,
           at ``--timing-bucket-mb`` (the trainer's default, 512); bytes = full HF bytes delivered
  memcpy   dst.copy_(src) of the same number of bytes, both buffers allocated and touched beforehand;
           and the same copy into a fresh allocation (page faults included, as for every buffer a
           refit allocates: glibc returns allocations over 32 MB to the kernel when they are freed)
  gather   dist.gather as the refit calls it (gloo stages the result in a flat buffer of its own and
           copies it out), same bytes in the same bucket size, output buffers preallocated
  p2p      rank 1's half of those bytes sent to rank 0 into one preallocated buffer: the transport
           alone, the floor of any TP=2 refit over gloo on this machine

and splits the refit time into the generator (pack, gather, merge to HF layout) and update_weights.

Peak extra memory of the refit on rank 0, per bucket size (``--bucket-mb``), measured in a second
pair of ranks: the process's resident-set high-water mark (VmHWM) minus its resident set (VmRSS)
just before the refit. VmHWM is reset before every bucket (``echo 5 > /proc/self/clear_refs``,
Linux >= 4.0), so each bucket gets its own peak (which includes what is still alive from the bucket
before). Those ranks start with ``MALLOC_MMAP_THRESHOLD_=262144``: glibc serves every allocation of
256 KiB or more with its own mmap and unmaps it on free (and no longer raises that threshold
itself), so RSS follows the bytes held in live tensors; torch's CPU allocator keeps no cache of its
own. (Set at run time with mallopt instead, heap chunks from earlier allocations are reused and kept
and the same refit measured anywhere from 1x to 2x its true peak.) The model, the engine and
everything allocated before the refit are in the baseline, so the figure is what the refit adds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_lpreg.memory import (  # noqa: E402
    release_freed_memory, reset_resident_peak, resident_bytes, resident_peak_bytes, resident_peak_measurable,
)

MB = 1024**2
MMAP_THRESHOLD = 256 * 1024  # bytes: glibc mmaps (and unmaps on free) every allocation this large


def hf_config(args) -> dict:
    heads = args.hidden // 64
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": args.hidden,
        "intermediate_size": args.ffn, "num_hidden_layers": args.layers, "num_attention_heads": heads,
        "num_key_value_heads": max(2, heads // 8), "vocab_size": args.vocab, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 4096, "tie_word_embeddings": args.tie,
        "torch_dtype": "float32",
    }


# ------------------------------------------------------------------------------ rank body
def _refit(ctx, model, spec, engine, bucket_bytes, per_bucket_memory=False):
    """One refit as the trainer runs it; returns timings, bytes and (optionally) per-bucket peaks."""
    import torch.distributed as dist

    from megatron_lpreg.weights import param_for_hf
    from megatron_lpreg.weights.stream import RefitStats, stream_hf_weights

    stats = RefitStats()
    steps = []  # (HF bytes of the bucket, peak extra bytes during it, Megatron parameters in it)
    dist.barrier(group=ctx.tp_group)
    base = resident_bytes()
    t_gen = t_upd = 0.0
    start = time.perf_counter()
    gen = stream_hf_weights(model, spec, tp_group=ctx.tp_group, bucket_bytes=bucket_bytes, dst_tp_rank=0,
                            stats=stats)
    while True:
        before = stats.bytes
        if per_bucket_memory:
            reset_resident_peak()
        t0 = time.perf_counter()
        try:
            bucket = next(gen)  # like the trainer's ``for bucket in ...``: the previous bucket is held
        except StopIteration:
            break
        t1 = time.perf_counter()
        if engine is not None:
            engine.update_weights(bucket)
        t2 = time.perf_counter()
        t_gen += t1 - t0
        t_upd += t2 - t1
        if per_bucket_memory:
            params = {param_for_hf(spec, name).megatron for name, _ in bucket}
            steps.append((stats.bytes - before, resident_peak_bytes() - base, len(params)))
    total = time.perf_counter() - start
    del bucket
    return dict(seconds=total, gen=t_gen, update=t_upd, bytes=stats.bytes, buckets=stats.buckets,
                largest=stats.largest_bucket_bytes, steps=steps)


def _refit_shared(ctx, model, spec, engine, shared, per_rank_memory=False):
    """One shared-memory refit (weights/shared_refit.py): seconds, and the peak extra bytes."""
    import torch.distributed as dist

    dist.barrier(group=ctx.tp_group)
    base = resident_bytes()
    if per_rank_memory:
        reset_resident_peak()
    start = time.perf_counter()
    shared.refit(model, spec, engine_model=engine.model if engine is not None else None)
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, peak_extra=resident_peak_bytes() - base if per_rank_memory else None)


def _memcpy(nbytes: int, src=None):
    """Seconds of dst.copy_(src) for ``nbytes``: into a touched buffer, and into a fresh one (whose
    pages the kernel must fault in and zero on first write, as it must for every new refit buffer)."""
    import torch

    n = nbytes // 4
    src = torch.randn(n) if src is None else src
    dst = torch.empty(n)
    start = time.perf_counter()
    dst.copy_(src)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - start, fresh, src


def _gather_floor(ctx, nbytes: int, bucket_bytes: int) -> float:
    """gloo gather of the same bytes to rank 0 in buckets of the same size, buffers preallocated."""
    import torch
    import torch.distributed as dist

    tp = ctx.tp_size
    per_rank = bucket_bytes // tp // 4
    local = torch.ones(per_rank)
    gathered = [torch.zeros(per_rank) for _ in range(tp)] if ctx.tp_rank == 0 else None
    sizes = [per_rank] * (nbytes // bucket_bytes)
    if nbytes % bucket_bytes:
        sizes.append(nbytes % bucket_bytes // tp // 4)
    dist.barrier(group=ctx.tp_group)
    start = time.perf_counter()
    for k in sizes:
        dist.gather(local[:k], [g[:k] for g in gathered] if gathered else None, group_dst=0,
                    group=ctx.tp_group)
    return time.perf_counter() - start


def _p2p_floor(ctx, nbytes: int, bucket_bytes: int) -> float:
    """Rank 1's shard bytes received by rank 0 with send/recv into one preallocated buffer: the
    transport alone, without gather's staging buffer and copy-out (what a TP=2 refit must move)."""
    import torch
    import torch.distributed as dist

    per_rank = bucket_bytes // ctx.tp_size // 4
    buf = torch.ones(per_rank)
    sizes = [per_rank] * (nbytes // bucket_bytes)
    if nbytes % bucket_bytes:
        sizes.append(nbytes % bucket_bytes // ctx.tp_size // 4)
    dist.barrier(group=ctx.tp_group)
    start = time.perf_counter()
    for k in sizes:
        if ctx.tp_rank == 0:
            for r in range(1, ctx.tp_size):
                dist.recv(buf[:k], group_src=r, group=ctx.tp_group)
        else:
            dist.send(buf[:k], group_dst=0, group=ctx.tp_group)
    return time.perf_counter() - start


def _setup(ctx, args):
    from transformers import AutoConfig

    from megatron_lpreg.model import build_gpt_model, parse_hf_config
    from megatron_lpreg.rollout import HFEngine

    raw = hf_config(args)
    spec = parse_hf_config(raw)
    t0 = time.perf_counter()
    model = build_gpt_model(spec).eval()
    engine = None
    if ctx.tp_rank == 0:
        kwargs = {k: v for k, v in raw.items() if k not in ("model_type", "torch_dtype")}
        engine = HFEngine.from_config(AutoConfig.for_model("qwen2", **kwargs))
    return spec, model, engine, time.perf_counter() - t0


def _timing_body(ctx, args):
    import torch.distributed as dist

    spec, model, engine, setup_s = _setup(ctx, args)
    full = list(engine.model.parameters()) if engine is not None else []
    res = dict(setup_s=setup_s, shard_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
               largest_tensor=max((p.numel() * p.element_size() for p in full), default=0),
               hf_bytes=sum(p.numel() * p.element_size() for p in full),
               refit=[], memcpy=[], memcpy_fresh=[], gather=[], p2p=[])
    timing_bucket = args.timing_bucket_mb * MB
    _refit(ctx, model, spec, engine, timing_bucket)  # warm-up: lazy imports, first touch of the engine
    src = None
    for _ in range(args.repeats):
        r = _refit(ctx, model, spec, engine, timing_bucket)
        res["refit"].append(r)
        nbytes = [r["bytes"]]  # only the receiving rank counts delivered bytes
        dist.broadcast_object_list(nbytes, group_src=0, group=ctx.tp_group)
        res["gather"].append(_gather_floor(ctx, nbytes[0], timing_bucket))
        res["p2p"].append(_p2p_floor(ctx, nbytes[0], timing_bucket))
        if ctx.tp_rank == 0:
            s, fresh, src = _memcpy(r["bytes"], src)
            res["memcpy"].append(s)
            res["memcpy_fresh"].append(fresh)
    # The shared-memory refit (the trainer's default for the hf engine on CPU): engine weights moved
    # into /dev/shm once, then each rank writes its own shards there.
    from megatron_lpreg.weights.shared_refit import SharedWeights

    shared = SharedWeights.attach(engine.model if engine is not None else None, group=ctx.tp_group)
    res["shared"] = []
    if shared is not None:
        _refit_shared(ctx, model, spec, engine, shared)  # warm-up
        for _ in range(args.repeats):
            res["shared"].append(_refit_shared(ctx, model, spec, engine, shared))
            if ctx.tp_rank == 0:
                s, _, src = _memcpy(res["refit"][0]["bytes"], src)
                res["memcpy"].append(s)
    del src
    res["check"] = _check(ctx, model, spec, engine)
    return res if ctx.tp_rank == 0 else None


def _memory_body(ctx, args):
    """Runs in ranks started with MALLOC_MMAP_THRESHOLD_ set (see the module docstring)."""
    spec, model, engine, _ = _setup(ctx, args)
    if not resident_peak_measurable():
        return None
    _refit(ctx, model, spec, engine, args.bucket_mb[0] * MB)  # warm-up
    res = {}
    for mb in args.bucket_mb:
        release_freed_memory()
        res[mb] = _refit(ctx, model, spec, engine, mb * MB, per_bucket_memory=True)
    from megatron_lpreg.weights.shared_refit import SharedWeights

    shared = SharedWeights.attach(engine.model if engine is not None else None, group=ctx.tp_group)
    if shared is not None:
        release_freed_memory()
        _refit_shared(ctx, model, spec, engine, shared)
        res["shared"] = _refit_shared(ctx, model, spec, engine, shared, per_rank_memory=True)
    return res if ctx.tp_rank == 0 else None


def _check(ctx, model, spec, engine):
    """The engine really holds the Megatron weights: compare a few tensors gathered independently."""
    import torch
    import torch.distributed as dist

    from megatron_lpreg.weights.table import find_param, to_hf

    ok = True
    for name in ("embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
                 "decoder.layers.0.mlp.linear_fc2.weight"):
        p = dict(model.named_parameters())[name].detach()
        shards = [torch.empty_like(p) for _ in range(ctx.tp_size)] if ctx.tp_rank == 0 else None
        dist.gather(p.contiguous(), shards, group_dst=0, group=ctx.tp_group)
        if engine is not None:
            params = dict(engine.model.named_parameters())
            for hf_name, t in to_hf(spec, find_param(spec, name), shards):
                ok = ok and torch.equal(params[hf_name], t)
    return ok if engine is not None else None


def _vllm_body(ctx, args, model_dir):
    """The SPMD vLLM engine: shard-to-shard refits against memcpy of the same bytes, and the peak."""
    import torch
    import torch.distributed as dist

    from megatron_lpreg.model import build_gpt_model, parse_hf_config
    from megatron_lpreg.rollout.vllm_engine import VLLMEngine
    from megatron_lpreg.rollout.vllm_platform import pack_for_cpu_gemm
    from megatron_lpreg.weights.engine_shards import ShardRefit
    from megatron_lpreg.weights.stream import RefitStats

    spec = parse_hf_config(model_dir)
    t0 = time.perf_counter()
    model = build_gpt_model(spec).eval()
    engine = VLLMEngine(model_dir, max_model_len=128, load_format="dummy", tensor_parallel_size=ctx.tp_size,
                        kv_cache_memory_bytes=64 * MB)
    refit = ShardRefit(engine.shard, ctx.tp)
    res = dict(setup_s=time.perf_counter() - t0, refit=[], memcpy=[], memcpy_fresh=[],
               shard_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    src = None
    for i in range(args.repeats + 1):  # the first is a warm-up
        dist.barrier(group=ctx.tp_group)
        release_freed_memory()
        base = resident_bytes()
        reset_resident_peak()
        stats = RefitStats()
        start = time.perf_counter()
        refit(model, spec, stats=stats)
        seconds = time.perf_counter() - start
        peak = resident_peak_bytes() - base
        start = time.perf_counter()
        pack_for_cpu_gemm(engine.model)  # what the engine does before it next generates
        pack = time.perf_counter() - start
        if i:
            res["refit"].append(dict(seconds=seconds, bytes=stats.bytes, peak_extra=peak,
                                     extra=stats.largest_extra_bytes, pack=pack))
            s, fresh, src = _memcpy(stats.bytes, src)
            res["memcpy"].append(s)
            res["memcpy_fresh"].append(fresh)
    del src
    # The engine holds the Megatron weights: its o_proj shard is this rank's linear_proj shard.
    mine = dict(model.named_parameters())["decoder.layers.0.self_attention.linear_proj.weight"]
    res["check"] = bool(torch.equal(engine.shard.params["model.layers.0.self_attn.o_proj.weight"], mine))
    engine.close()
    return res


def report_vllm(results, args, wall_s) -> None:
    med = statistics.median
    print(f"synthetic Qwen2 (float32, random), Megatron TP=2 -> SPMD vLLM engine TP=2, shard-to-shard, "
          f"median of {args.repeats}, 1 thread per rank:")
    for rank, res in enumerate(results):
        refit_s, mem_s = med(r["seconds"] for r in res["refit"]), med(res["memcpy"])
        nbytes = res["refit"][0]["bytes"]
        print(f"  rank {rank}: {res['shard_bytes'] / 1e9:.3f} GB Megatron shard, {nbytes / 1e9:.3f} GB written; "
              f"refit {refit_s:.3f} s ({_gbs(nbytes, refit_s):.2f} GB/s), memcpy {mem_s:.3f} s "
              f"({_gbs(nbytes, mem_s):.2f} GB/s), into a fresh allocation {med(res['memcpy_fresh']):.3f} s")
        print(f"  rank {rank}: refit/memcpy = {mem_s / refit_s:.3f}   (bandwidth ratio, target >= 0.5)")
        print(f"  rank {rank}: peak extra memory {max(r['peak_extra'] for r in res['refit']) / MB:.1f} MB measured "
              f"(VmHWM - VmRSS), {max(r['extra'] for r in res['refit']) / MB:.1f} MB of buffers (target 0); "
              f"engine holds the refitted weights: {res['check']}")
        pack_s = med(r["pack"] for r in res["refit"])
        print(f"  rank {rank}: then the CPU re-pack for vLLM's GEMM (before the next generate, CPU only): "
              f"{pack_s:.3f} s = {pack_s / mem_s:.2f} memcpy")
    print(f"\nbenchmark wall time {wall_s:.1f} s (model + engine set-up {results[0]['setup_s']:.1f} s)")


# ------------------------------------------------------------------------------ report
def _gbs(nbytes, seconds):
    return nbytes / seconds / 1e9


def report(res, args, wall_s) -> None:
    med = statistics.median
    refit = res["refit"]
    nbytes = refit[0]["bytes"]
    refit_s = med(r["seconds"] for r in refit)
    gen_s, upd_s = med(r["gen"] for r in refit), med(r["update"] for r in refit)
    mem_s, gather_s, fresh_s = med(res["memcpy"]), med(res["gather"]), med(res["memcpy_fresh"])
    p2p_s = med(res["p2p"])
    print(f"synthetic Qwen2 (float32, random): {res['hf_bytes'] / 1e9:.3f} GB HF, {res['shard_bytes'] / 1e9:.3f} GB "
          f"Megatron shard per rank (TP=2), largest tensor {res['largest_tensor'] / 1e6:.0f} MB; "
          f"engine holds the refitted weights: {res['check']}")
    print(f"timing at bucket {args.timing_bucket_mb} MB ({refit[0]['buckets']} buckets), median of "
          f"{args.repeats}, rank 0, 1 thread per rank:")
    print(f"  refit  {refit_s:7.3f} s  {_gbs(nbytes, refit_s):6.2f} GB/s   ({nbytes / 1e9:.3f} GB delivered; "
          f"generator {gen_s:.3f} s = pack+gather+merge, update_weights {upd_s:.3f} s)")
    print(f"  memcpy {mem_s:7.3f} s  {_gbs(nbytes, mem_s):6.2f} GB/s   (torch copy_, same bytes)")
    print(f"  memcpy {fresh_s:7.3f} s  {_gbs(nbytes, fresh_s):6.2f} GB/s   (same, into a fresh allocation: "
          f"page faults included)")
    print(f"  gather {gather_s:7.3f} s  {_gbs(nbytes, gather_s):6.2f} GB/s   (dist.gather alone, as the refit calls it)")
    print(f"  p2p    {p2p_s:7.3f} s  {_gbs(nbytes, p2p_s):6.2f} GB/s   (rank 1's half sent to rank 0, preallocated: "
          f"the transport floor)")
    print(f"  ratio refit / memcpy bandwidth = {mem_s / refit_s:.3f}   (target >= 0.5)")
    print(f"  ratio refit / memcpy-into-fresh bandwidth = {fresh_s / refit_s:.3f}")
    print(f"  ratio refit / gather-alone bandwidth = {gather_s / refit_s:.3f};  refit / p2p = {p2p_s / refit_s:.3f};"
          f"  memcpy / p2p time = {mem_s / p2p_s:.3f} (transport alone; a refit also copies at least rank 0's half)")
    print(f"  refit time beyond gather-alone + one memcpy: {refit_s - gather_s - mem_s:+.3f} s "
          f"(pack and merge copies, page faults on fresh buffers)")
    if res["shared"]:
        shared_s = med(r["seconds"] for r in res["shared"])
        print(f"  shared {shared_s:7.3f} s  {_gbs(nbytes, shared_s):6.2f} GB/s   (shared-memory refit, the trainer's "
              f"default for the hf engine on CPU: each rank writes its shards into the engine's weights)")
        print(f"  ratio shared refit / memcpy bandwidth = {mem_s / shared_s:.3f}   (target >= 0.5);  "
              f"shared vs streamed refit: {refit_s / shared_s:.1f}x faster")
    else:
        print("  shared: /dev/shm not usable here; not measured")
    print(f"  all runs (s): refit {[round(r['seconds'], 3) for r in refit]}, memcpy "
          f"{[round(s, 3) for s in res['memcpy']]}, fresh {[round(s, 3) for s in res['memcpy_fresh']]}, "
          f"gather {[round(s, 3) for s in res['gather']]}, shared {[round(r['seconds'], 3) for r in res['shared']]}, p2p {[round(s, 3) for s in res['p2p']]}")
    if res["memory"] is None:
        print("peak memory: /proc/self/clear_refs cannot reset VmHWM here; not measured")
        return
    print("\npeak extra memory on rank 0 during the refit = VmHWM (reset before each bucket) - VmRSS before "
          "the refit.\n'own' = a bucket's full HF bytes, 'prev' = the bucket before it; 'model' = 2 prev + 2 own "
          "(+ own / TP when the bucket packs several tensors);\nMB = 2^20 bytes:")
    print(f"  {'bucket':>8} {'buckets':>7} {'largest':>8} {'peak extra':>10} {'/largest':>8}  {'at (own, prev)':<16}"
          f" {'measured/model':>14}  steady state (own, prev <= bucket)")
    shared_mem = res["memory"].pop("shared", None)
    for mb, r in res["memory"].items():
        steps = r["steps"]  # (own bytes, peak extra bytes, megatron params in the bucket)
        prev = [0] + [st[0] for st in steps[:-1]]
        model = [2 * p + 2 * own + (own / 2 if n > 1 else 0) for (own, _, n), p in zip(steps, prev)]
        ratios = [st[1] / m for st, m in zip(steps, model) if st[0] >= MB]  # skip the tiny final-norm bucket
        k = max(range(len(steps)), key=lambda i: steps[i][1])
        peak = steps[k][1]
        steady = [i for i in range(len(steps)) if steps[i][0] <= mb * MB and prev[i] <= mb * MB]
        if steady:
            j = max(steady, key=lambda i: steps[i][1])
            steady_txt = (f"worst {steps[j][1] / MB:.0f} MB = {steps[j][1] / (mb * MB):.2f} x bucket "
                          f"({steps[j][0] / MB:.0f}, {prev[j] / MB:.0f} MB)")
        else:
            steady_txt = "none: every bucket or its predecessor is one tensor > bucket"
        at = f"{steps[k][0] / MB:.0f}, {prev[k] / MB:.0f} MB"
        print(f"  {mb:>5} MB {r['buckets']:>7} {r['largest'] / MB:>5.0f} MB {peak / MB:>7.0f} MB {peak / r['largest']:>8.2f}"
              f"  {at:<16} {min(ratios):>6.2f}-{max(ratios):<6.2f}  {steady_txt}")
    if shared_mem is not None:
        print(f"  shared-memory refit: peak extra {shared_mem['peak_extra'] / MB:.0f} MB (no buckets)")
    print(f"\nbenchmark wall time {wall_s:.1f} s (model + engine set-up {res['setup_s']:.1f} s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=5504, help="intermediate size (Qwen2.5's ratio to hidden, ~5.4)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--tie", action="store_true", help="tie embedding and output layer (no lm_head)")
    p.add_argument("--bucket-mb", type=int, nargs="+", default=[16, 64, 256, 512])
    p.add_argument("--timing-bucket-mb", type=int, default=512, help="bucket for the timed refits (trainer default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are killed")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    args = p.parse_args(argv)

    from tests.distributed import run_distributed

    start = time.perf_counter()
    if args.engine == "vllm":
        import json
        import tempfile

        with tempfile.TemporaryDirectory(prefix="refit-bench-") as model_dir:
            (Path(model_dir) / "config.json").write_text(json.dumps(hf_config(args)))
            results = _with_mmap_threshold(lambda: run_distributed(
                _vllm_body, 2, 2, args=(args, model_dir), timeout_s=args.timeout, collective_timeout_s=args.timeout))
        report_vllm(results, args, time.perf_counter() - start)
        return
    res = run_distributed(_timing_body, 2, 2, args=(args,), timeout_s=args.timeout,
                          collective_timeout_s=args.timeout)[0]
    # A second pair of ranks for the memory figures: glibc reads this when a process starts.
    res["memory"] = _with_mmap_threshold(lambda: run_distributed(
        _memory_body, 2, 2, args=(args,), timeout_s=args.timeout, collective_timeout_s=args.timeout)[0])
    report(res, args, time.perf_counter() - start)


def _with_mmap_threshold(start_ranks):
    """``start_ranks()`` with MALLOC_MMAP_THRESHOLD_ set for the ranks it starts (glibc reads it when
    a process starts), so a freed tensor leaves their resident set at once."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    try:
        return start_ranks()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


if __name__ == "__main__":
    main()
