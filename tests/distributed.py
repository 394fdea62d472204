"""Run a test body on several gloo ranks, with a hard timeout so a hung collective fails fast.

    results = run_distributed(body, world_size=2, tp_size=2, args=(...))

``body(ctx, *args)`` runs on every rank after ``megatron_lpreg.parallel.init_distributed``; ``ctx`` is
the ParallelContext. It must be a module-level function (spawned processes import it by name).
The per-rank return values come back as a list ordered by rank. A remote exception is re-raised
here with the remote traceback; a rank still running at the deadline kills the whole group.
"""

from __future__ import annotations

import os
import pickle
import queue
import traceback

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 180.0


class DistributedTestError(AssertionError):
    pass


def _worker(rank, world_size, port, tp_size, collective_timeout_s, body, args, out):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    try:
        from megatron_lpreg.lifetime import exit_with_parent

        exit_with_parent()  # a killed test run leaves no ranks behind
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        from megatron_lpreg.parallel import destroy_distributed, init_distributed

        ctx = init_distributed(tp_size=tp_size, backend="gloo", timeout_s=collective_timeout_s)
        result = body(ctx, *args)
        destroy_distributed()
        # Plain pickle copies tensor bytes; the queue's own pickler would share them by file
        # descriptor, which breaks once this process exits.
        out.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        out.put((rank, False, traceback.format_exc()))


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for proc in [parent, *children]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def run_distributed(
    body,
    world_size: int = 2,
    tp_size: int | None = None,
    args: tuple = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    collective_timeout_s: float = 60.0,
):
    # The rendezvous port is picked free, then bound by rank 0 in its own process: another process
    # (a parallel test run, a vLLM engine) can take it in between. That fails in init_process_group,
    # before the body runs, so a fresh port is safe to try.
    for attempt in range(3):
        try:
            return _run_once(body, world_size, tp_size, args, timeout_s, collective_timeout_s)
        except DistributedTestError as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise


def _run_once(body, world_size, tp_size, args, timeout_s, collective_timeout_s):
    from megatron_lpreg.lifetime import mark_as_parent
    from megatron_lpreg.parallel import free_port

    mark_as_parent()
    tp_size = world_size if tp_size is None else tp_size
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, tp_size, collective_timeout_s, body, args, out),
            # Not daemonic: dist_checkpointing's save starts a multiprocessing Manager, which a
            # daemonic process may not do. The finally-block below kills stragglers and children.
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    failures: list[str] = []
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise DistributedTestError(
                    f"ranks {missing} did not finish within {timeout_s:.0f}s (hung collective?)"
                    + ("\n" + "\n".join(failures) if failures else "")
                )
            try:
                rank, ok, payload = out.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)]
                dead = [r for r in dead if r not in results]
                if dead and out.empty():
                    time.sleep(0.5)
                    if out.empty():
                        raise DistributedTestError(
                            f"rank(s) {dead} died with exit codes "
                            f"{[procs[r].exitcode for r in dead]}"
                        )
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                # One failed rank usually leaves the others blocked in a collective: stop now.
                break
        if failures:
            raise DistributedTestError("\n".join(failures))
    finally:
        for p in procs:
            if p.is_alive():
                _kill_tree(p.pid)
        for p in procs:
            p.join(timeout=10)
    return [results[r] for r in range(world_size)]
