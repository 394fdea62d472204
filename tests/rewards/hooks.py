"""Grade functions run inside RewardPool workers by the tests (importable by spawned children)."""

import os
import signal
import time

from megatron_lpreg.rewards.grader import grade_answer


def hooked_grade(answer, truth, timeout_s=None):
    """Misbehaves on command: the answer text selects the failure mode."""
    if answer == "EXIT":
        os._exit(7)
    if answer == "SEGV":
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(5)
    if answer == "HANG":
        # Ignores the soft deadline entirely: only the parent's SIGKILL ends this.
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        time.sleep(60)
    if answer == "ALLOC":
        blocks = [bytearray(64 * 1024 * 1024) for _ in range(64)]  # 4 GiB > RLIMIT_AS
        return float(len(blocks) > 0), "ok"
    if answer == "RAISE":
        raise ValueError("boom")
    if answer == "ONE":  # a correct answer that costs no parsing, so no timing can flip it
        return 1.0, "ok"
    if answer == "PID":
        return 0.0, f"pid={os.getpid()}"
    return grade_answer(answer, truth, timeout_s=timeout_s)
