"""Process pool that grades responses with hard per-answer time and memory limits.

Design (no ``concurrent.futures``): ``num_workers`` worker processes, each with its own duplex
pipe and at most one task in flight.  The parent runs a supervisor loop that

* decides cheap cases itself (no box / unusable box -> 0, equal normalised strings -> 1);
* hands the rest to idle workers, with a wall-clock deadline ``timeout_s`` per answer;
* waits on all pipes and process sentinels at once (``multiprocessing.connection.wait``);
* SIGKILLs a worker whose answer passes its deadline (reward 0, status ``timeout``) and starts a
  replacement; a worker that dies on its own (segfault, ``os._exit``, OOM kill) costs its answer
  (reward 0, status ``crash``) and is replaced the same way.  The rest of the batch is unaffected.

Workers cap their address space (``RLIMIT_AS``) at their start-up size + ``memory_mb`` before
importing sympy, so a runaway expression gets a ``MemoryError`` (status ``error``; the worker then
retires itself) instead of eating the node.
Workers exit by themselves when the process holding the pool dies, even by SIGKILL
(``megatron_lpreg.lifetime``).
Inside the worker, :func:`~megatron_lpreg.rewards.grader.grade_answer` additionally runs with a
soft SIGALRM deadline slightly below ``timeout_s``, so most slow answers come back as ``timeout``
without the cost of restarting a worker.

With ``function`` (``reward.function``) the workers run the user's reward function on whole
responses instead (``rewards.custom``), under the same deadline and memory cap; the parent decides
nothing itself then, and the function's values are kept as they are (not made 0/1).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from megatron_lpreg.lifetime import mark_as_parent

from .custom import STATUS_ERROR, call_reward, import_function, takes_verl_signature
from .extract import DEFAULT_MAX_ANSWER_CHARS, find_last_boxed
from .grader import DEFAULT_TIMEOUT_S, STATUS_OK, STATUS_TIMEOUT, fast_grade, grade_answer

__all__ = ["BatchResult", "RewardPool", "STATUSES"]

logger = logging.getLogger(__name__)

STATUS_CRASH = "crash"
#: Every status a graded item can have.  ``ok``: graded normally (reward 0 or 1); ``no_box``,
#: ``too_long``, ``unclosed``: no usable final answer; ``timeout``: over the time limit;
#: ``crash``: the worker died; ``error``: exception or memory limit while grading.
STATUSES = ("ok", "no_box", "too_long", "unclosed", STATUS_TIMEOUT, STATUS_CRASH, STATUS_ERROR)

# The soft in-worker deadline is this fraction of timeout_s; the hard kill comes at timeout_s.
_SOFT_FRACTION = 0.8
_STARTUP_TIMEOUT_S = 120.0


@dataclass
class BatchResult:
    rewards: list[float]
    statuses: list[str]
    #: seconds per item: fast-path time in the parent, or dispatch-to-result for worker items.
    seconds: list[float]
    #: how many items went to a worker (the rest were decided in the parent).
    num_worker_items: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = dict(collections.Counter(self.statuses))


# --------------------------------------------------------------------------- worker side
def _address_space_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return 0


def _set_memory_limit(memory_mb: int | None) -> None:
    """RLIMIT_AS = the worker's address space right now + ``memory_mb``.

    Relative to the baseline because a spawned worker re-imports the trainer's ``__main__``
    module, which may already have mapped torch/CUDA libraries (hundreds of MB to GBs of address
    space) before we get here; an absolute cap would then leave no headroom at all.
    """
    if not memory_mb:
        return
    try:
        import resource

        limit = _address_space_bytes() + int(memory_mb) * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - non-Linux
        pass


def _warm_up() -> None:
    """Import sympy / latex2sympy2_extended / math-verify and compile their regexes up front, so
    the first real answer is not charged for it."""
    try:
        # Neither pair is decided by the string/number fast path, so both symbolic stages run.
        grade_answer("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", timeout_s=None)
        grade_answer("\\{1\\}", "(1, 2)", timeout_s=None)
    except Exception:  # noqa: BLE001
        pass


def _worker_main(conn, memory_mb: int | None, soft_timeout_s: float, grade_fn: Callable | None,
                 function: str | None = None) -> None:
    from megatron_lpreg.lifetime import exit_with_parent

    exit_with_parent()  # before the memory limit: the watcher thread needs its stack
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's business; it closes us.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _set_memory_limit(memory_mb)
    fn = grade_fn or grade_answer
    if function:
        user_fn = import_function(function)
        verl = takes_verl_signature(user_fn)
    else:
        _warm_up()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        except MemoryError:
            os._exit(3)
        if msg is None:
            return
        task_id, payload = msg
        retire = False
        try:
            if function:  # (data_source, response, ground_truth, extra_info); the user's value as it is
                reward, status = call_reward(user_fn, verl, *payload)
            else:  # (boxed answer, ground truth)
                reward, status = fn(*payload, timeout_s=soft_timeout_s)
                reward = 1.0 if float(reward) == 1.0 else 0.0
        except MemoryError:
            reward, status, retire = 0.0, STATUS_ERROR, True
        except BaseException:  # noqa: BLE001 - any failure of one answer is reward 0
            reward, status = 0.0, STATUS_ERROR
        try:
            conn.send((task_id, reward, str(status), retire))
        except (OSError, MemoryError):
            os._exit(4)
        if retire:  # memory may be fragmented or half-freed: start clean
            os._exit(0)


# --------------------------------------------------------------------------- parent side
class _Worker:
    def __init__(self, ctx, memory_mb, soft_timeout_s, grade_fn, function):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.conn = parent_conn
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, memory_mb, soft_timeout_s, grade_fn, function),
            name="reward-worker",
            daemon=True,
        )
        self.proc.start()
        child_conn.close()
        self.started = time.monotonic()
        self.ready = False
        self.task: int | None = None  # index into the current batch
        self.task_id = -1  # pool-wide unique id of the task in flight (stale replies are ignored)
        self.dispatched = 0.0
        self.deadline = 0.0
        self.done = 0
        self.retiring = False  # said it exits after its last answer: replace it before the next dispatch

    def kill(self) -> None:
        try:
            if self.proc.is_alive():
                os.kill(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, OSError, ValueError):
            pass
        self.proc.join(timeout=5)
        try:
            self.conn.close()
        except OSError:
            pass
        try:
            self.proc.close()
        except ValueError:  # still running after SIGKILL + 5 s: leave it to the OS
            pass


class RewardPool:
    """Grades batches of responses in worker processes with hard limits.

    Args:
        num_workers: worker processes (each grades one answer at a time).
        timeout_s: wall-clock limit per answer; past it the worker is killed and the answer gets 0.
        memory_mb: address-space headroom of each worker: ``RLIMIT_AS`` is set to the worker's
            address space at start-up (interpreter + re-imported ``__main__``) plus this many MiB,
            before sympy/math-verify are imported; ``None``/0 = unlimited.
        max_answer_chars: longer boxed answers get 0 without grading (status ``too_long``).
        start_method: ``"spawn"`` (default) or ``"forkserver"``; never fork a trainer process.
        max_tasks_per_worker: recycle a worker after this many answers (bounds sympy caches).
        grade_fn: ``fn(answer, ground_truth, timeout_s=...) -> (reward, status)`` run in the
            workers instead of :func:`grade_answer` (must be picklable; for tests).
        function: ``"module:fn"``, a user reward function (``rewards.custom``) run in the workers
            on whole responses instead of the math grader; its rewards are kept as it returns them.

    Not thread-safe for concurrent ``grade_batch`` calls from several threads (a lock serialises
    them).  Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_mb: int | None = 1024,
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        start_method: str = "spawn",
        max_tasks_per_worker: int | None = 2000,
        grade_fn: Callable | None = None,
        function: str | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb
        self.max_answer_chars = int(max_answer_chars)
        self.max_tasks_per_worker = max_tasks_per_worker
        self._grade_fn = grade_fn
        self.function = function
        if function:
            import_function(function)  # a bad path is one clear error here, not a dead worker
        self._ctx = mp.get_context(start_method)
        self._soft_timeout_s = self.timeout_s * _SOFT_FRACTION
        self._lock = threading.Lock()
        self._closed = False
        self._next_task_id = 0
        #: cumulative status counts over the pool's lifetime, plus ``workers_replaced``.
        self.stats: collections.Counter[str] = collections.Counter()
        self._workers: list[_Worker] = [self._spawn() for _ in range(self.num_workers)]

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self) -> _Worker:
        mark_as_parent()  # the worker watches this process, whoever started it
        return _Worker(self._ctx, self.memory_mb, self._soft_timeout_s, self._grade_fn, self.function)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = self._spawn()
        self.stats["workers_replaced"] += 1

    def worker_pids(self) -> list[int | None]:
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            w.kill()
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------ grading
    def grade_batch(self, responses: Sequence[str], ground_truths: Sequence[str]) -> list[float]:
        """Rewards (0.0 / 1.0) for ``responses[i]`` vs ``ground_truths[i]``."""
        return self.grade_batch_detailed(responses, ground_truths).rewards

    def grade_batch_detailed(self, responses: Sequence[str], ground_truths: Sequence[str],
                             data_sources: Sequence[str] | None = None,
                             extra_infos: Sequence[dict | None] | None = None) -> BatchResult:
        """``data_sources`` and ``extra_infos`` (one per response) reach a user ``function`` only."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        n = len(responses)
        rewards = [0.0] * n
        statuses = [STATUS_ERROR] * n
        seconds = [0.0] * n
        pending: collections.deque[tuple[int, tuple]] = collections.deque()
        for i, (response, truth) in enumerate(zip(responses, ground_truths)):
            if self.function:
                pending.append((i, (data_sources[i] if data_sources else "", response, str(truth),
                                    extra_infos[i] if extra_infos else None)))
                continue
            t0 = time.perf_counter()
            answer, status = find_last_boxed(response, self.max_answer_chars)
            if answer is None:
                statuses[i] = status
            else:
                try:
                    decided = fast_grade(answer, str(truth))
                except Exception:  # noqa: BLE001 - let the worker try
                    decided = None
                if decided is None:
                    pending.append((i, (answer, str(truth))))
                else:
                    rewards[i], statuses[i] = decided, STATUS_OK
            seconds[i] = time.perf_counter() - t0
        num_worker_items = len(pending)
        with self._lock:
            try:
                self._supervise(pending, rewards, statuses, seconds)
            except BaseException:
                # e.g. KeyboardInterrupt: do not leave workers busy with this batch's answers.
                for idx, w in enumerate(self._workers):
                    if w.task is not None:
                        self._replace(idx)
                raise
        result = BatchResult(rewards, statuses, seconds, num_worker_items)
        self.stats.update(result.counts)
        return result

    def _finish(self, w: _Worker, rewards, statuses, seconds, reward: float, status: str) -> None:
        i = w.task
        assert i is not None
        rewards[i], statuses[i] = reward, status
        seconds[i] = time.monotonic() - w.dispatched
        w.task = None

    def _supervise(self, pending, rewards, statuses, seconds) -> None:
        startup_failures = 0
        while True:
            busy = [w for w in self._workers if w.task is not None]
            if not pending and not busy:
                return
            now = time.monotonic()

            # 1. dispatch to idle, ready workers
            for idx, w in enumerate(self._workers):
                if not pending or not w.ready or w.task is not None:
                    continue
                item = pending.popleft()
                task_id = self._next_task_id
                self._next_task_id += 1
                try:
                    w.conn.send((task_id, item[1]))
                except (OSError, ValueError):
                    pending.appendleft(item)
                    self._replace(idx)
                    continue
                w.task, w.task_id, w.dispatched, w.deadline = item[0], task_id, now, now + self.timeout_s

            # 2. wait for results, deaths or the nearest deadline
            waits = [w.deadline - now for w in self._workers if w.task is not None]
            waits += [w.started + _STARTUP_TIMEOUT_S - now for w in self._workers if not w.ready]
            wait_s = max(0.0, min(waits, default=1.0))
            objects = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
            ready = set(mp_connection.wait(objects, timeout=min(wait_s, 1.0)))

            # 3. messages first (a worker may have answered and then exited)
            dead: set[int] = set()
            for idx, w in enumerate(self._workers):
                if w.conn not in ready:
                    continue
                try:
                    while w.conn.poll():
                        msg = w.conn.recv()
                        if msg[0] == "ready":
                            w.ready = True
                            startup_failures = 0
                        elif w.task is not None and msg[0] == w.task_id:
                            _, reward, status, w.retiring = msg
                            self._finish(w, rewards, statuses, seconds, float(reward), str(status))
                            w.done += 1
                except (EOFError, OSError):
                    dead.add(idx)
            for idx, w in enumerate(self._workers):
                if w.proc.sentinel in ready:
                    dead.add(idx)

            # 4. deaths, deadlines, recycling
            now = time.monotonic()
            for idx, w in enumerate(self._workers):
                if idx in dead:
                    if w.task is not None:
                        self._finish(w, rewards, statuses, seconds, 0.0, STATUS_CRASH)
                    elif not w.ready:
                        startup_failures += 1
                    self._replace(idx)
                elif w.task is not None and now >= w.deadline:
                    self._finish(w, rewards, statuses, seconds, 0.0, STATUS_TIMEOUT)
                    self._replace(idx)
                elif not w.ready and now >= w.started + _STARTUP_TIMEOUT_S:
                    startup_failures += 1
                    self._replace(idx)
                elif w.task is None and (w.retiring or (self.max_tasks_per_worker
                                                        and w.done >= self.max_tasks_per_worker)):
                    self._replace(idx)

            # 5. workers cannot even start (broken environment): give up on the batch, never hang
            if startup_failures > 3 * self.num_workers and not any(w.ready for w in self._workers):
                logger.error("reward workers keep failing to start; %d answers graded 0", len(pending))
                while pending:
                    i = pending.popleft()[0]
                    rewards[i], statuses[i] = 0.0, STATUS_ERROR
                return
