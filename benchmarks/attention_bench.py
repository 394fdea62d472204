"""Local-spec core attention: SDPA (the default) vs megatron's unfused DotProductAttention, side by side.

    python benchmarks/attention_bench.py [--tokens 2048] [--hidden 512] [--layers 2] [--iters 3]

One micro-batch row of ``--tokens`` tokens, forward + backward (``model_logits`` and a sum over the
logits) through a random Qwen2-like model at TP=1, once per attention, the two alternating so that
a slow spell of a shared machine hits both; times and peaks are medians over ``--iters`` after one
warm-up each. ``causal`` passes no mask (SDPA's is_causal; the unfused path on CPU gets the explicit
[S, S] mask, as ``model_logits`` gives it); ``packed`` is a block-diagonal causal [1, 1, S, S] mask
of sequences of 128-512 tokens, as ``policy.packing`` builds for packed rows.

Memory: on CUDA the allocator's peak above what was allocated at the start of the pass; on CPU the
resident high-water mark's rise (``megatron_lpreg.memory``), exact because the script re-executes
itself with ``MALLOC_MMAP_THRESHOLD_`` set so every large tensor is its own mapping, returned on free.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MB = 1024 ** 2


def packed_mask(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    segments, start, seg = torch.empty(tokens, dtype=torch.long), 0, 0
    while start < tokens:
        n = int(torch.randint(128, 513, (1,), generator=g))
        segments[start:start + n] = seg
        start, seg = start + n, seg + 1
    causal = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
    return ((segments.unsqueeze(1) != segments.unsqueeze(0)) | causal).view(1, 1, tokens, tokens)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--masks", default="causal,packed")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA unless given")
    args = ap.parse_args(argv)

    from megatron_lpreg import memory
    from megatron_lpreg.model import build_gpt_model, parse_hf_config
    from megatron_lpreg.model.build import model_logits
    from megatron_lpreg.parallel import init_distributed

    ctx = init_distributed(tp_size=1, backend="nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(ctx.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    spec = parse_hf_config({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": args.hidden,
        "intermediate_size": 2 * args.hidden, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 2 * args.tokens})
    torch.manual_seed(0)
    models = {a: build_gpt_model(spec, dtype, use_te=False, local_attention=a).to(device)
              for a in ("sdpa", "unfused")}
    # Attention has no parameters: the same weights make the two passes the same computation.
    models["unfused"].load_state_dict(models["sdpa"].state_dict())
    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1)).to(device)
    cpu_peak = device.type == "cpu" and memory.resident_peak_measurable()
    memory.freeze_setup_objects()

    def one_pass(model, mask) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            memory.release_freed_memory()
            memory.reset_resident_peak()
            base = memory.resident_bytes()
        start = time.perf_counter()
        logits = model_logits(model, ids, mask)
        logits.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        del logits
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = memory.resident_peak_bytes() - base if cpu_peak else float("nan")
        return seconds, peak / MB

    print(f"{args.tokens} tokens, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV, "
          f"{args.layers} layers, {dtype}, {device.type}; forward + backward, medians of {args.iters}")
    print(f"{'mask':8} {'attention':9} {'time s':>8} {'peak MiB':>9}")
    for kind in args.masks.split(","):
        mask = None if kind == "causal" else packed_mask(args.tokens, seed=2).to(device)
        runs: dict[str, list[tuple[float, float]]] = {a: [] for a in models}
        for i in range(args.iters + 1):
            for attention, model in models.items():
                result = one_pass(model, mask)
                if i:  # the first round warms up kernels and allocator
                    runs[attention].append(result)
        med = {a: (statistics.median(t for t, _ in r), statistics.median(m for _, m in r)) for a, r in runs.items()}
        for attention, (t, m) in med.items():
            print(f"{kind:8} {attention:9} {t:8.3f} {m:9.1f}")
        (ts, ms), (tu, mu) = med["sdpa"], med["unfused"]
        print(f"{kind:8} {'ratio':9} {ts / tu:8.2f} {ms / mu:9.2f}   (sdpa / unfused)")


if __name__ == "__main__":
    if not torch.cuda.is_available() and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc reads it at start-up only: without it freed tensors may stay in the heap and the
        # resident peak of one pass would include the last pass's leftovers.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "262144"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
