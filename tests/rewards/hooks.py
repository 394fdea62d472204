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


def verl_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's compute_score signature: echoes what it was given, so a test can check each argument."""
    if solution_str == "HANG":
        time.sleep(60)
    if solution_str == "RAISE":
        raise ValueError("boom")
    if solution_str == "PID":
        return float(os.getpid())
    if solution_str == "DICT":
        return {"score": 0.5, "acc": True}
    bonus = (extra_info or {}).get("bonus", 0.0)
    return float(solution_str == ground_truth) + bonus + (0.25 if data_source == "gsm" else 0.0)


def short_score(response, ground_truth):
    """The short form: a graded value the math grader would never give (it gives 0 or 1)."""
    return 0.75 if response.endswith(ground_truth) else float("nan")


def length_score(data_source, solution_str, ground_truth, extra_info=None):
    """A reward no math grader gives: the response's length plus a per-source offset."""
    return len(solution_str) / 100 + (10.0 if data_source == "aime" else 0.0)
