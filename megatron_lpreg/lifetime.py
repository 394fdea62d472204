"""Every process megatron-lpreg starts ends with the process that started it, kill -9 included.

A process killed by SIGKILL runs no clean-up, so without this its children live on: the ranks the
launcher starts, the reward workers, and megatron-core's checkpoint-writer queue manager (a spawned
server it starts on the first save and never shuts down, ~270 MB with torch imported). Each such
child calls :func:`exit_with_parent` at start: a daemon thread waits for the parent to exit (on a
pidfd, Linux 5.3+; elsewhere by polling once a second), then SIGKILLs the multiprocessing children of
this process (they may not watch anyone) and exits. ``prctl(PR_SET_PDEATHSIG)`` is not used: it fires
when the parent *thread* that started the child ends, not the parent process.

Which parent: the pid in ``MEGATRON_LPREG_PARENT_PID``, which every megatron-lpreg process sets to
its own pid for its children (so a child whose parent died while it was starting still sees it
gone), else the OS parent. A spawned child of a ``megatron-lpreg`` command re-imports
``megatron_lpreg.cli`` as ``__mp_main__`` first, which calls :func:`exit_with_parent`; that covers
children started by other libraries' code.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time

PARENT_ENV = "MEGATRON_LPREG_PARENT_PID"
EXIT_STATUS = 128 + signal.SIGHUP  # as a shell reports a process whose terminal went away
_POLL_S = 1.0

_watching_in: int | None = None  # the pid whose watcher thread runs (a forked child has none)


def mark_as_parent() -> None:
    """Children started from now on watch this process."""
    os.environ[PARENT_ENV] = str(os.getpid())


def started_by_megatron_lpreg() -> bool:
    """Whether an ancestor of this process is a megatron-lpreg process (it set PARENT_ENV)."""
    return os.environ.get(PARENT_ENV) not in (None, "", str(os.getpid()))


def exit_with_parent() -> None:
    """Exit (status :data:`EXIT_STATUS`) as soon as the parent process exits; idempotent."""
    global _watching_in
    if _watching_in == os.getpid():
        return
    parent = int(os.environ.get(PARENT_ENV) or 0) or os.getppid()
    mark_as_parent()
    if parent in (os.getpid(), 0, 1):
        return
    _watching_in = os.getpid()
    fd, direct = _pidfd(parent), parent == os.getppid()
    if not _alive(parent, fd, direct):
        _exit()
    threading.Thread(target=_watch, args=(parent, fd, direct), name="megatron-lpreg-parent-watch",
                     daemon=True).start()


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        return None


def _alive(pid: int, fd: int | None, direct: bool) -> bool:
    if fd is not None:
        # A pidfd turns readable when its process has exited (a zombie included).
        return fd >= 0 and not select.select([fd], [], [], 0)[0]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A dead direct parent may linger as a zombie: being re-parented says it is gone.
    return not direct or os.getppid() == pid


def _watch(pid: int, fd: int | None, direct: bool) -> None:
    if fd is not None:
        select.select([fd], [], [])
    else:
        while _alive(pid, None, direct):
            time.sleep(_POLL_S)
    _exit()


def _exit() -> None:
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
    os._exit(EXIT_STATUS)


# ------------------------------------------------------------------------- checking (tests, benchmarks)
TAG_ENV = "MEGATRON_LPREG_PROCESS_TAG"


def tagged_processes(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process (but this one) whose environment has ``TAG_ENV=tag``: a
    command started with the tag and everything it started, whoever adopted them since (Linux /proc)."""
    needle = f"\0{TAG_ENV}={tag}\0".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in b"\0" + f.read() + b"\0":
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":  # exited, not yet reaped
                    continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append((int(name), cmd))
    return found


def wait_for_no_tagged(tag: str, timeout_s: float) -> list[tuple[int, str]]:
    """Processes still tagged ``tag`` after up to ``timeout_s`` seconds (empty: all gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = tagged_processes(tag)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)
