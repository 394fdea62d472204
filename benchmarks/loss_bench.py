"""Vocab-parallel Lp-Reg loss vs megatron-core cross entropy vs a naive full-vocab gather, side by side.

    python benchmarks/loss_bench.py [--tokens 4096] [--vocab 151936] [--tp 2] [--iters 3]

Each variant runs forward+backward on the same float32 logits shard [T, V/TP] in a fresh group of
TP gloo processes (one thread each), so its peak memory is its own:
  (a) megatron-core ``vocab_parallel_cross_entropy`` (the floor: one log-prob, nothing else)
  (b) ours: one pass giving log-prob + entropy + min-p proxy log-prob, then ``lp_reg_policy_loss``,
      consuming the logits as (a) does (``inplace=True``, the trainer's default k3 path)
  (b_keep) the same without consuming the logits (what kl=forward needs): the gradient is a new shard
  (c) naive: all-gather the full vocabulary, log_softmax / entropy / min-p filter with -1e4 sentinels
      and a re-normalised log_softmax, as the verl reference code does on unsharded logits. Its peak
      is ~10 GB per rank at T=4096, so after the gather the ranks take turns (two at once do not fit
      in 24 GiB); its time is its own work, waiting excluded, which if anything flatters it.
Time is the median over ``--iters`` iterations after one warm-up; "extra peak" is the rise of the
process's peak RSS (VmHWM, reset before the warm-up) above its RSS with the inputs allocated.
The printed ratios are the issue's targets: b/a time <= 1.3, b extra <= 2 shards, c/b memory >= TP.

Then a paired measurement of what Lp-Reg adds to a training micro-batch: the same inputs put
through the trainer's update path with the Lp-Reg defaults (k3, microbatch percentile) and with
``enabled=False`` (plain GRPO), alternating, medians, at two shapes: the CPU demo (vocab 337
padded to 512, 64 sequences, TP=2) and SmolLM2-135M (vocab 49152, 16 sequences, TP=1), ~60 tokens
each. "full" = fused token stats (inplace) + loss + backward into the float32 logits shard;
"loss" = ``lp_reg_policy_loss`` + backward alone on [B, S] log-probs. ``--only paired`` skips the
first part (whose naive variant needs ~10 GB per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _inputs(args, rank):
    g = torch.Generator().manual_seed(1234 + rank)
    per = args.vocab // args.tp
    logits = torch.randn(args.tokens, per, generator=g) * 2.0
    target = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(7))
    return logits, target


def _variant_a(z, target, ctx, args):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    loss = vocab_parallel_cross_entropy(z, target).mean()
    loss.backward()


def _variant_b(z, target, ctx, args, inplace=True):
    from megatron_lpreg.loss import LpRegConfig, lp_reg_policy_loss, vocab_parallel_token_stats

    st = vocab_parallel_token_stats(z, target, group=ctx.tp_group, kappa=0.02, inplace=inplace)
    B = 4
    lp = st.logprobs.view(B, -1)
    adv = torch.tensor([-1.0, 1.0, -0.5, 0.5], device=z.device)
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, _ = lp_reg_policy_loss(lp, lp.detach(), st.proxy_logprobs.view(B, -1), adv, mask,
                                 LpRegConfig(), entropy=st.entropy.detach().view(B, -1))
    loss.backward()


class _GatherVocab(torch.autograd.Function):
    """All-gather along the vocab; the backward keeps this rank's slice (every rank has the full loss)."""

    @staticmethod
    def forward(ctx, shard, group):
        import torch.distributed as dist

        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        ctx.rank, ctx.width = dist.get_rank(group), shard.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g[:, ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width].contiguous(), None


def _variant_c(z, target, ctx, args):
    """Returns its own busy time: after the gather the ranks take turns (see the module docstring)."""
    import torch.distributed as dist

    from megatron_lpreg.loss import LpRegConfig, lp_reg_policy_loss

    t0 = time.perf_counter()
    full = _GatherVocab.apply(z, ctx.tp_group)
    busy = time.perf_counter() - t0
    for turn in range(args.tp):
        dist.barrier(group=ctx.tp_group)
        if turn != ctx.tp_rank:
            continue
        t0 = time.perf_counter()
        logp_all = torch.log_softmax(full, dim=-1)
        lp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            # Temporaries freed as early as the math allows.
            p = torch.softmax(full, dim=-1)
            entropy = torch.logsumexp(full, dim=-1) - torch.linalg.vecdot(p, full)
            keep = p >= 0.02 * p.max(dim=-1, keepdim=True).values
            del p
            proxy_all = torch.log_softmax(full.detach().masked_fill(~keep, -1e4), dim=-1)
            proxy = proxy_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            proxy = torch.where(keep.gather(-1, target.unsqueeze(-1)).squeeze(-1), proxy, float("-inf"))
            del proxy_all, keep
        B = 4
        lp = lp.view(B, -1)
        adv = torch.tensor([-1.0, 1.0, -0.5, 0.5], device=z.device)
        mask = torch.ones_like(lp, dtype=torch.bool)
        loss, _ = lp_reg_policy_loss(lp, lp.detach(), proxy.view(B, -1), adv, mask, LpRegConfig(),
                                     entropy=entropy.view(B, -1))
        loss.backward()
        del logp_all, full
        busy += time.perf_counter() - t0
    return busy


def _variant_b_keep(z, target, ctx, args):
    return _variant_b(z, target, ctx, args, inplace=False)


VARIANTS = {"a": _variant_a, "b": _variant_b, "b_keep": _variant_b_keep, "c": _variant_c}


def _worker(rank, args, variant, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.tp),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_lpreg.parallel import destroy_distributed, init_distributed

    ctx = init_distributed(tp_size=args.tp, backend="gloo")
    logits, target = _inputs(args, rank)
    fn = VARIANTS[variant]
    dist.barrier()
    # The input is the model's output in training, not extra: a fresh copy per call (megatron's
    # cross entropy overwrites its input in place) made before the baseline is read.
    z = logits.clone().requires_grad_(True)
    base = _rss_kib("VmRSS")
    _reset_peak()
    fn(z, target, ctx, args)  # warm-up, also the memory measurement
    peak = _rss_kib("VmHWM")
    times = []
    for _ in range(args.iters):
        z = logits.clone().requires_grad_(True)
        dist.barrier()
        t0 = time.perf_counter()
        busy = fn(z, target, ctx, args)
        times.append(time.perf_counter() - t0 if busy is None else busy)
    shard_bytes = logits.numel() * logits.element_size()
    out.put((rank, statistics.median(times), (peak - base) * 1024, shard_bytes))
    destroy_distributed()


def run_variant(args, variant):
    from megatron_lpreg.parallel import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, args, variant, port, out)) for r in range(args.tp)]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + args.timeout
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=2.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                why = f"a rank exited with {dead} (killed for memory?)" if dead else "timed out"
                raise RuntimeError(f"variant {variant}: {why}")
    for p in procs:
        p.join()
    # Slowest rank's time, largest rank's memory: what the step would see.
    return {
        "time_s": max(r[1] for r in results),
        "extra_peak_bytes": max(r[2] for r in results),
        "shard_bytes": results[0][3],
    }


PAIRED_SHAPES = {
    # name: (sequences, max tokens, real vocab, padded vocab, TP)
    "demo": (64, 60, 337, 512, 2),
    "smollm2": (16, 60, 49152, 49152, 1),
}


def _paired_inputs(shape, rank):
    B, S, V, Vp, tp = shape
    g = torch.Generator().manual_seed(99)
    full = torch.randn(B, S, Vp, generator=g) * 2.5
    full[..., V:] = 0.0
    per = Vp // tp
    logits = full[..., rank * per:(rank + 1) * per].contiguous()
    target = torch.randint(0, V, (B, S), generator=g)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
    mask = torch.arange(S).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(B, generator=g)
    adv[torch.rand(B, generator=g) < 0.25] = 0.0  # groups with one reward
    # pi_old and the proxy from a nearby policy, as the scoring pass gives them.
    old_full = full + 0.3 * torch.randn(full.shape, generator=g)
    return logits, target, mask, adv, old_full[..., rank * per:(rank + 1) * per].contiguous(), V


def _paired_worker(rank, shape, iters, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(shape[4]),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_lpreg import loss as L
    from megatron_lpreg.parallel import destroy_distributed, init_distributed

    ctx = init_distributed(tp_size=shape[4], backend="gloo")
    group = ctx.tp_group if shape[4] > 1 else None
    logits, target, mask, adv, old_logits, V = _paired_inputs(shape, rank)
    with torch.no_grad():
        st = L.vocab_parallel_token_stats(old_logits, target, group=group, vocab_size=V)
        old, proxy = st.logprobs, st.proxy_logprobs
        lp0 = L.vocab_parallel_logprobs(logits, target, group, vocab_size=V)
    configs = {"lpreg": L.LpRegConfig(), "grpo": L.LpRegConfig(enabled=False)}
    tensors_fn = getattr(L, "lp_reg_policy_loss_tensors", None)

    def full(cfg, fn=L.lp_reg_policy_loss):
        z = logits.clone().requires_grad_(True)
        if group is not None:
            dist.barrier(group=group)
        t0 = time.perf_counter()
        s = L.vocab_parallel_token_stats(z, target, group=group, vocab_size=V, entropy=False,
                                         proxy=False, inplace=True)
        loss, _ = fn(s.logprobs, old, proxy, adv, mask, cfg)
        loss.backward()
        return time.perf_counter() - t0

    def loss_only(cfg, fn=L.lp_reg_policy_loss):
        lp = lp0.clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss, _ = fn(lp, old, proxy, adv, mask, cfg)
        loss.backward()
        return time.perf_counter() - t0

    kinds = {"full": full, "loss": loss_only}
    if tensors_fn is not None:  # what a trainer that reads its metrics once per step calls
        kinds["full_tensors"] = lambda cfg: full(cfg, tensors_fn)
        kinds["loss_tensors"] = lambda cfg: loss_only(cfg, tensors_fn)
    times = {(k, c): [] for k in kinds for c in configs}
    for i in range(iters + 2):
        order = list(configs) if i % 2 == 0 else list(configs)[::-1]
        for k, fn in kinds.items():
            for c in order:
                t = fn(configs[c])
                if i >= 2:  # warm-up
                    times[(k, c)].append(t)
    out.put((rank, {f"{k}/{c}": v for (k, c), v in times.items()}))
    destroy_distributed()


def run_paired(iters: int, timeout: float) -> dict:
    from megatron_lpreg.parallel import free_port

    ctx = mp.get_context("spawn")
    res = {}
    for name, shape in PAIRED_SHAPES.items():
        out = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_paired_worker, args=(r, shape, iters, port, out)) for r in range(shape[4])]
        for p in procs:
            p.start()
        got = [out.get(timeout=timeout) for _ in procs]
        for p in procs:
            p.join()
        # Per iteration the slowest rank's time, as a step would see it.
        res[name] = {k: [max(ts) for ts in zip(*(r[1][k] for r in got))] for k in got[0][1]}
    summary = {}
    for name, r in res.items():
        B, S, V, Vp, tp = PAIRED_SHAPES[name]
        print(f"paired {name} ({B} seqs x <= {S} tokens, vocab {V} -> {Vp}, TP={tp}, {iters} pairs):")
        for kind in dict.fromkeys(k.split("/")[0] for k in r):
            lp, gr = r[f"{kind}/lpreg"], r[f"{kind}/grpo"]
            # The median of the per-pair ratios: each pair ran back to back, so a load change on a
            # shared machine hits both sides of a pair.
            ratio = statistics.median(a / b for a, b in zip(lp, gr))
            summary[f"{name}/{kind}"] = ratio
            print(f"  {kind:<13s} lpreg {statistics.median(lp) * 1e3:8.2f} ms  grpo "
                  f"{statistics.median(gr) * 1e3:8.2f} ms  lpreg/grpo = {ratio:.3f}")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--only", choices=("original", "paired"), help="run one of the two parts")
    ap.add_argument("--paired-iters", type=int, default=30)
    args = ap.parse_args(argv)
    if args.vocab % args.tp:
        ap.error(f"--vocab {args.vocab} must be divisible by --tp {args.tp}")
    if args.only == "paired":
        return run_paired(args.paired_iters, args.timeout)

    res = {v: run_variant(args, v) for v in VARIANTS}
    shard = res["a"]["shard_bytes"]
    gib = 1024**3
    print(f"T={args.tokens} V={args.vocab} TP={args.tp} float32, one logits shard = {shard / gib:.2f} GiB")
    names = {"a": "megatron vocab_parallel_cross_entropy", "b": "ours: logprob+entropy+proxy + Lp-Reg",
             "b_keep": "ours, logits kept (inplace=False)", "c": "naive full-vocab gather + filter"}
    for v, r in res.items():
        print(f"  ({v:>6s}) {names[v]:<38s} fwd+bwd {r['time_s']:7.3f} s   extra peak "
              f"{r['extra_peak_bytes'] / gib:6.2f} GiB = {r['extra_peak_bytes'] / shard:5.2f} shards")
    ratios = {
        "time_b_over_a": res["b"]["time_s"] / res["a"]["time_s"],
        "time_c_over_b": res["c"]["time_s"] / res["b"]["time_s"],
        "b_extra_peak_shards": res["b"]["extra_peak_bytes"] / shard,
        "time_bkeep_over_a": res["b_keep"]["time_s"] / res["a"]["time_s"],
        "bkeep_extra_peak_shards": res["b_keep"]["extra_peak_bytes"] / shard,
        "mem_c_over_b": res["c"]["extra_peak_bytes"] / max(res["b"]["extra_peak_bytes"], 1),
    }
    print(f"ratio time b/a = {ratios['time_b_over_a']:.2f} (target <= 1.3)")
    print(f"ratio time c/b = {ratios['time_c_over_b']:.2f}")
    print(f"b extra peak = {ratios['b_extra_peak_shards']:.2f} shards (target <= 2)")
    print(f"(b_keep: time / a = {ratios['time_bkeep_over_a']:.2f}, extra peak = "
          f"{ratios['bkeep_extra_peak_shards']:.2f} shards)")
    print(f"ratio memory c/b = {ratios['mem_c_over_b']:.2f} (target >= TP = {args.tp})")
    paired = run_paired(args.paired_iters, args.timeout) if args.only is None else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": res, "ratios": ratios, "paired": paired}, f, indent=2)
    return ratios


if __name__ == "__main__":
    main()
