"""Answers written to hurt the grader, through the real RewardPool with a 2 s limit and 512 MiB.

Each class must come back graded (reward 0, or 1 only where it is right) with a status, within the
time limit plus a margin for killing and reaping a worker on a loaded machine; the pool must grade
normal answers correctly afterwards. Worker memory is sampled (resident set, every 20 ms) while an
answer is in flight, so a spike shorter than that can be missed: the hard bound is the worker's
address-space limit, which the assertion checks against. Run with ``-s`` to see the table.
"""

from __future__ import annotations

import threading
import time

import pytest

from megatron_lpreg.rewards import RewardPool

TIMEOUT_S = 2.0
MEMORY_MB = 512
# SIGKILL, reaping and the supervisor's wake-up on a 2-core box shared with other test processes.
SLACK_S = 3.0

PARENT = {"too_long", "no_box", "unclosed", "ok"}  # decided without a worker
WORKER = {"ok", "timeout", "error"}  # "crash" would mean a worker died on an answer: never expected


def _nest(depth: int, open_: str, close: str, inner: str = "1") -> str:
    return open_ * depth + inner + close * depth


def _frac(depth: int) -> str:
    s = "1"
    for _ in range(depth):
        s = "\\frac{1}{" + s + "}"
    return s


def _tower(depth: int, base: str) -> str:
    s = base
    for _ in range(depth):
        s = f"{base}^{{{s}}}"
    return s


# id, response, ground truth, allowed statuses, expected reward
CLASSES = [
    ("braces-5000-deep", "\\boxed{" + _nest(5000, "{", "}") + "}", "1", {"too_long"}, 0.0),
    ("braces-490-deep", "\\boxed{" + _nest(490, "{", "}") + "}", "2", PARENT | WORKER, 0.0),
    ("parens-490-deep", "\\boxed{" + _nest(490, "(", ")") + "}", "2", WORKER, 0.0),
    ("unclosed-5M-braces", "\\boxed{" + "{" * 5_000_000, "1", {"too_long"}, 0.0),
    ("unbalanced-open", "\\boxed{{{1}", "1", {"unclosed"}, 0.0),
    ("unbalanced-close", "\\boxed{1}}}}}}", "2", {"ok"}, 0.0),
    ("escaped-close-brace", "\\boxed{\\}", "1", {"unclosed"}, 0.0),
    ("megabyte-text-no-box", "x" * (1 << 20), "1", {"no_box"}, 0.0),
    ("megabyte-box", "\\boxed{" + "1" * (1 << 20) + "}", "1", {"too_long"}, 0.0),
    ("100k-boxes", "\\boxed{1}" * 100_000, "2", {"ok"}, 0.0),
    ("power-tower-10^10^10", "\\boxed{10^{10^{10}}}", "1", WORKER, 0.0),
    ("python-power-9**9**9", "\\boxed{9**9**9}", "1", WORKER, 0.0),
    ("power-tower-9^9^9^9", "\\boxed{9^{9^{9^{9}}}}", "1", WORKER, 0.0),
    ("int-2^2^32", "\\boxed{2^{2^{32}}}", "1", WORKER, 0.0),
    # one C-level big-integer operation: SIGALRM cannot interrupt it, only the parent's SIGKILL can
    ("bigint-10^10^8-cancel", "\\boxed{10^{10^{8}}-10^{10^{8}}}", "1", WORKER, 0.0),
    ("x-tower-100", "\\boxed{" + _tower(100, "x") + "}", "x", WORKER, 0.0),
    ("e-tower", "\\boxed{e^{e^{e^{e^{10}}}}}", "1", WORKER, 0.0),
    ("factorial-10^8", "\\boxed{100000000!}", "1", WORKER, 0.0),
    ("factorial-chain", "\\boxed{((((9!)!)!)!)}", "1", WORKER, 0.0),
    ("nested-frac-60", "\\boxed{" + _frac(60) + "}", "2", WORKER, 0.0),
    ("sum-to-10^10", "\\boxed{\\sum_{n=1}^{10^{10}} n}", "1", WORKER, 0.0),
    ("integral-e^x^x", "\\boxed{\\int_0^{10^{10}} e^{x^x} dx}", "1", WORKER, 0.0),
    ("matrix-power-10^10", "\\boxed{\\begin{pmatrix}1&1\\\\1&0\\end{pmatrix}^{10^{10}}}", "1", WORKER, 0.0),
    ("80-term-polynomial", "\\boxed{" + "+".join(["x^{999}"] * 80) + "}", "x", WORKER, 0.0),
    ("null-bytes", "\x00" * 1000 + "\\boxed{1\x00+\x00" + "1}", "3", PARENT | WORKER, 0.0),
    ("lone-surrogate", "\\boxed{\ud800}", "1", PARENT | WORKER, 0.0),
    # 990-digit integers one apart: sympy's relative tolerance once called them equal (reward 1)
    ("near-equal-990-digit-ints", "\\boxed{" + "9" * 990 + "}", "9" * 989 + "8", {"ok"}, 0.0),
]


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class _MemorySampler(threading.Thread):
    """Peak resident set of the worker holding each batch item, sampled while it is in flight."""

    def __init__(self, pool: RewardPool, interval_s: float = 0.02):
        super().__init__(daemon=True)
        self.pool, self.interval_s = pool, interval_s
        self.peak: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for w in list(self.pool._workers):
                try:
                    task, pid = w.task, w.proc.pid
                except ValueError:  # replaced (closed) between the list copy and here
                    continue
                rss = _rss_mb(pid) if task is not None else None
                if rss is not None:
                    self.peak[task] = max(self.peak.get(task, 0.0), rss)
            self.stop.wait(self.interval_s)


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB) as p:
        yield p


def test_adversarial_answers_are_graded_within_the_limits(pool):
    # Workers warm (sympy imported) before the clock starts; their resident size is the baseline.
    assert pool.grade_batch([r"\boxed{\sqrt{2}/2}"], [r"\frac{\sqrt2}{2}"]) == [1.0]
    baseline = max(_rss_mb(pid) or 0.0 for pid in pool.worker_pids())
    sampler = _MemorySampler(pool)
    sampler.start()
    start = time.monotonic()
    result = pool.grade_batch_detailed([c[1] for c in CLASSES], [c[2] for c in CLASSES])
    elapsed = time.monotonic() - start
    sampler.stop.set()
    sampler.join()

    rows = []
    for i, (name, _, _, allowed, reward) in enumerate(CLASSES):
        rows.append((name, result.statuses[i], result.rewards[i], result.seconds[i], sampler.peak.get(i)))
    print(f"\nworker baseline RSS {baseline:.0f} MB; batch of {len(CLASSES)} on 2 workers: {elapsed:.1f} s; "
          f"workers replaced: {pool.stats['workers_replaced']}")
    print(f"{'class':28s} {'status':9s} reward  seconds  peak RSS MB")
    for name, status, reward, seconds, peak in rows:
        print(f"{name:28s} {status:9s} {reward:5.1f}  {seconds:7.2f}  {'-' if peak is None else f'{peak:.0f}'}")

    for (name, _, _, allowed, reward), (_, status, got, seconds, peak) in zip(CLASSES, rows):
        assert status in allowed, (name, status)
        assert got == reward, (name, got)
        assert seconds <= TIMEOUT_S + SLACK_S, (name, seconds)
        if peak is not None:
            assert peak <= baseline + MEMORY_MB, (name, peak)
    # Two workers: at worst every worker item takes the full limit, half of them on each.
    assert elapsed <= (result.num_worker_items / 2 + 2) * (TIMEOUT_S + SLACK_S)

    # ...and the pool still grades ordinary answers, right and wrong, on both workers (fresh or
    # surviving); the symbolic pair is a cheap one, so a starved 2-core box cannot time it out.
    after = pool.grade_batch_detailed([r"\boxed{\frac{2}{4}}", r"\boxed{\sqrt{2}/2}", r"\boxed{7}", r"\boxed{\sqrt{2}/2}"],
                                      ["0.5", r"\frac{\sqrt2}{2}", "8", r"\frac{\sqrt2}{2}"])
    assert after.rewards == [1.0, 1.0, 0.0, 1.0], after
    assert set(after.statuses) == {"ok"} and after.num_worker_items == 2
