"""Padding in the log-prob and training passes: fixed-size micro-batches vs token-budget bucketing vs
packed rows, on the same GRPO-like batch, side by side.

    python benchmarks/padding_bench.py [--sequences 64] [--max-response 1024] [--budget 8192] [--iters 2]

Response lengths are drawn as GRPO responses come: log-normal around ``--median`` tokens (many
short, a long tail), cut at ``--max-response`` (the cut ones are the truncated responses), after
prompts of 60-180 tokens. The variants run the trainer's own passes (``recompute_logprobs``,
``train`` with one optimiser step that only clears the gradient) over a random
megatron GPTModel at TP=1:
  fixed:  micro-batches of ``budget // (max prompt + max response)`` sequences in rollout order,
          each padded to its longest (a micro-batch size that can never exceed the budget)
  bucket: ``token_budget_microbatches`` (sorted first-fit-decreasing by padded size; the default)
  packed: ``grpo.pack_sequences`` (rows of the micro-batch's longest length, short sequences side
          by side under a block-diagonal causal mask)
"computed" counts the token positions the model runs on; "padding" is the share of them that are
pads; "attention" is the sum over rows of row_length^2 (the dense-mask attention's work), relative
to bucketing. Times are medians over ``--iters`` after one warm-up.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def grpo_lengths(n: int, median: int, max_response: int, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(60, 181, (n,), generator=g).tolist()
    normal = torch.randn(n, generator=g)
    responses = [max(1, min(max_response, int(median * math.exp(0.9 * float(z))))) for z in normal]
    return prompts, responses


def _fixed(count: int):
    def microbatches(lengths, max_tokens, *, pad_to_multiple=1):
        return [list(range(i, min(i + count, len(lengths)))) for i in range(0, len(lengths), count)]

    return microbatches


def layouts(lengths: list[int], budget: int, fixed_count: int) -> dict[str, list[list[list[int]]]]:
    """Each variant's micro-batches as lists of rows (lists of sequence indices)."""
    from megatron_lpreg.policy.batching import token_budget_microbatches
    from megatron_lpreg.policy.packing import token_budget_packs

    return {
        "fixed": [[[i] for i in mb] for mb in _fixed(fixed_count)(lengths, budget)],
        "bucket": [[[i] for i in mb] for mb in token_budget_microbatches(lengths, budget)],
        "packed": token_budget_packs(lengths, budget),
    }


def layout_stats(lengths, mbs) -> dict[str, float]:
    computed = attention = 0
    for mb in mbs:
        row = max(sum(lengths[i] for i in r) for r in mb)
        computed += len(mb) * row
        attention += len(mb) * row * row
    return {"micro-batches": len(mbs), "computed": computed, "padding": 1 - sum(lengths) / computed,
            "attention": attention}


class _ClearGrads:
    def __init__(self, model):
        self.model = model

    def step(self):
        self.model.zero_grad(set_to_none=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--median", type=int, default=200, help="median response length")
    ap.add_argument("--max-response", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=8192, help="grpo.micro_batch_tokens")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout-only", action="store_true", help="the token counts only, no model passes")
    args = ap.parse_args(argv)

    import megatron_lpreg.policy.passes as policy
    from megatron_lpreg.grpo.advantages import group_advantages
    from megatron_lpreg.policy.batching import RolloutBatch
    from megatron_lpreg.loss import LpRegConfig
    from megatron_lpreg.model import build_gpt_model, parse_hf_config
    from megatron_lpreg.parallel import init_distributed

    ctx = init_distributed(tp_size=1, backend="gloo")
    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 64)
    spec = parse_hf_config({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": args.vocab, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "max_position_embeddings": 4 * (180 + args.max_response)})
    model = build_gpt_model(spec, torch.float32, use_te=False)

    prompts, responses = grpo_lengths(args.sequences, args.median, args.max_response, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = [torch.randint(0, args.vocab, (p + r,), generator=g).tolist() for p, r in zip(prompts, responses)]
    rewards = torch.randint(0, 2, (args.sequences,), generator=g).float()
    batch = RolloutBatch.from_sequences(ids, prompts, group_advantages(rewards, 8 if args.sequences % 8 == 0 else 1))
    lengths = batch.lengths
    fixed_count = max(1, args.budget // (180 + args.max_response))
    cfg = LpRegConfig()
    print(f"{args.sequences} sequences: response median {statistics.median(responses):.0f}, mean "
          f"{statistics.mean(responses):.0f}, max {max(responses)} ({sum(r == args.max_response for r in responses)} "
          f"cut at {args.max_response}); {sum(lengths)} real tokens; budget {args.budget}; fixed = "
          f"{fixed_count} sequences per micro-batch; model hidden {args.hidden} x {args.layers} layers, "
          f"vocab {args.vocab}; {torch.get_num_threads()} threads")

    stats = {name: layout_stats(lengths, mbs) for name, mbs in layouts(lengths, args.budget, fixed_count).items()}
    real_microbatches = policy.token_budget_microbatches
    contexts = {name: policy.PolicyContext(
        model=model, vocab_size=spec.vocab_size, pad_id=0, device=ctx.device, tp_group=None, dp_group=None,
        dp_size=1, micro_batch_tokens=args.budget, pack_sequences=name == "packed") for name in stats}
    times = {name: ([], []) for name in stats}
    # Variants take turns within each iteration, so a shared machine's load drifts over all alike.
    for _ in range(0 if args.layout_only else args.iters + 1):
        for name, pc in contexts.items():
            policy.token_budget_microbatches = _fixed(fixed_count) if name == "fixed" else real_microbatches
            try:
                t = time.perf_counter()
                scores = policy.recompute_logprobs(pc, batch, cfg)
                times[name][0].append(time.perf_counter() - t)
                batch.set(old_logprobs=scores.old_logprobs, proxy_logprobs=scores.proxy_logprobs)
                t = time.perf_counter()
                policy.train(pc, batch, cfg, _ClearGrads(model), num_minibatches=1, epochs=1)
                times[name][1].append(time.perf_counter() - t)
            finally:
                policy.token_budget_microbatches = real_microbatches
    results = {name: tuple(statistics.median(t[1:]) if len(t) > 1 else math.nan for t in pair)
               for name, pair in times.items()}

    base = stats["bucket"]
    print(f"{'variant':8} {'micro-batches':>13} {'computed':>9} {'padding':>8} {'attention':>9} "
          f"{'score s':>8} {'train s':>8} {'total s':>8} {'vs bucket':>9}")
    for name, (score_s, train_s) in results.items():
        s = stats[name]
        total = score_s + train_s
        print(f"{name:8} {s['micro-batches']:13d} {s['computed']:9d} {s['padding']:8.1%} "
              f"{s['attention'] / base['attention']:9.2f} {score_s:8.2f} {train_s:8.2f} {total:8.2f} "
              f"{total / sum(results['bucket']):9.2f}")


if __name__ == "__main__":
    main()
