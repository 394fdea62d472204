"""Throughput of the math reward (RewardPool) on a realistic GRPO batch.

    python benchmarks/reward_bench.py [--n 2048] [--workers 2] [--timeout 5] [--adversarial 6] [--seed 0]

The batch mixes, in roughly these shares: correct boxed integers (40%), equivalent answers in
another form (fractions/decimals, 12%), equivalent answers that need sympy / math-verify
(``\\sqrt2/2`` vs ``\\frac{\\sqrt2}{2}``, ``10^{3}`` vs 1000, ..., 10%), wrong answers (integers
and symbolic, 25%), no box (10%, incl. truncated boxes), plus ``--adversarial`` hostile answers
(power towers, huge factorials, deep nesting, multi-MB responses).  Every response carries ~1.5 KB
of "reasoning" text before the box, like a real rollout.

Prints responses/s, total seconds, p50/p99 per-answer seconds (parent fast path or
dispatch-to-result in a worker), how many answers needed a worker, and the status counts
(timeouts included).  The pool's start-up (spawning workers) is reported separately.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lpreg.rewards import RewardPool  # noqa: E402

_REASONING = (
    "Let us set up the equation carefully. We have $a + b = 10$ and $ab = 21$, so $a$ and $b$ are "
    "roots of $t^2 - 10t + 21 = 0$, i.e. $(t-3)(t-7)=0$. "
)

_SYMBOLIC_EQUIV = [
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"),
    (r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}"),
    (r"10^{3}", "1000"),
    (r"2^{10}", "1024"),
    (r"\sqrt{8}", r"2\sqrt{2}"),
    (r"(x+1)^2", "x^2+2x+1"),
    (r"2\pi", r"\pi \cdot 2"),
    (r"\{3, 1, 2\}", r"\{1,2,3\}"),
    (r"\frac{\pi}{4}", r"\pi/4"),
    (r"3\sqrt{3}", r"\sqrt{27}"),
]
_SYMBOLIC_WRONG = [
    (r"\sqrt{3}", r"\sqrt{2}"),
    (r"\frac{\pi}{3}", r"\frac{\pi}{4}"),
    (r"(x-1)^2", "x^2+2x+1"),
    (r"2\sqrt{3}", r"3\sqrt{2}"),
    (r"\text{Tuesday}", "Monday"),
]
_ADVERSARIAL = [
    (r"\boxed{9^{9^{9^{9}}}}", "1"),
    (r"\boxed{100000000!}", "1"),
    (r"\boxed{" + "(" * 300 + "1" + ")" * 300 + "}", "1"),
    ("x" * 5_000_000 + r"\boxed{1}", "2"),
    (r"\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}", "1"),
    (r"\boxed{\int_0^{10^{10}} e^{x^x} dx}", "1"),
]


def make_batch(n: int, n_adversarial: int, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    responses, truths, kinds = [], [], []

    def add(kind: str, answer_text: str, truth: str) -> None:
        responses.append(_REASONING * rng.randint(5, 15) + answer_text)
        truths.append(truth)
        kinds.append(kind)

    for _ in range(n - n_adversarial):
        u = rng.random()
        k = rng.randint(1, 999)
        if u < 0.40:
            add("correct_int", rf"The answer is $\boxed{{{k}}}$.", str(k))
        elif u < 0.52:
            p, q = rng.randint(1, 50), rng.randint(2, 50)
            m = rng.randint(2, 5)
            add("correct_frac", rf"So $\boxed{{\dfrac{{{p * m}}}{{{q * m}}}}}$.", f"{p}/{q}")
        elif u < 0.62:
            ans, truth = rng.choice(_SYMBOLIC_EQUIV)
            add("correct_symbolic", rf"Thus \boxed{{{ans}}}.", truth)
        elif u < 0.77:
            add("wrong_int", rf"\boxed{{{k + rng.randint(1, 9)}}}", str(k))
        elif u < 0.87:
            ans, truth = rng.choice(_SYMBOLIC_WRONG)
            add("wrong_symbolic", rf"\boxed{{{ans}}}", truth)
        elif u < 0.95:
            add("no_box", f"I think the answer is {k}.", str(k))
        else:
            add("truncated", rf"\boxed{{\frac{{{k}}}{{", str(k))
    for i in range(n_adversarial):
        text, truth = _ADVERSARIAL[i % len(_ADVERSARIAL)]
        responses.append(text)
        truths.append(truth)
        kinds.append("adversarial")
    order = list(range(n))
    rng.shuffle(order)
    return [responses[i] for i in order], [truths[i] for i in order], [kinds[i] for i in order]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--adversarial", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    responses, truths, kinds = make_batch(args.n, args.adversarial, random.Random(args.seed))
    t0 = time.perf_counter()
    with RewardPool(num_workers=args.workers, timeout_s=args.timeout) as pool:
        pool.grade_batch([r"\boxed{1/2}"], [r"\sqrt{2}"])  # wait until the workers are up
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = pool.grade_batch_detailed(responses, truths)
        total = time.perf_counter() - t1
        replaced = pool.stats["workers_replaced"]

    by_kind: dict[str, list[float]] = {}
    for kind, reward in zip(kinds, result.rewards):
        by_kind.setdefault(kind, []).append(reward)
    print(f"batch: {args.n} responses ({args.adversarial} adversarial), {args.workers} workers, timeout {args.timeout}s")
    print(f"pool start-up: {startup:.2f} s")
    print(f"total: {total:.2f} s  ->  {args.n / total:.1f} responses/s")
    print(f"per-answer: p50 {_percentile(result.seconds, 0.5) * 1e3:.2f} ms  p99 {_percentile(result.seconds, 0.99) * 1e3:.2f} ms  "
          f"max {max(result.seconds):.2f} s  mean {statistics.fmean(result.seconds) * 1e3:.2f} ms")
    print(f"answers sent to workers: {result.num_worker_items}")
    print(f"timeouts: {result.counts.get('timeout', 0)}  crashes: {result.counts.get('crash', 0)}  "
          f"errors: {result.counts.get('error', 0)}  workers replaced: {replaced}")
    print(f"statuses: {dict(sorted(result.counts.items()))}")
    print("mean reward by kind: " + ", ".join(f"{k}={statistics.fmean(v):.3f} (n={len(v)})" for k, v in sorted(by_kind.items())))


if __name__ == "__main__":
    main()
