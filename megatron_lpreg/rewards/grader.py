"""Binary math reward: last ``\\boxed{}`` of the response vs the ground truth.

Stages, cheapest first; the first that says "equal" gives reward 1:

1. normalised string equality (:func:`~megatron_lpreg.rewards.normalize.normalize_answer`);
2. sympy equivalence: both sides parsed with ``latex2sympy2_extended`` (an ANTLR LaTeX parser
   that builds sympy objects directly -- no ``eval``/``sympify`` of the untrusted text), then
   compared structurally, numerically (closed-form numbers) or by ``simplify(a - b) == 0``;
3. ``math_verify.parse`` + ``math_verify.verify``.

A stage that raises is "not equal" and grading moves on.  Stages 2 and 3 run under a SIGALRM
deadline (``timeout_s`` in total, stage 2 gets at most half of it); if the budget runs out the
reward is 0 with status ``"timeout"``.  The alarm is a *soft* limit: it cannot interrupt long C
calls (big-integer arithmetic, regex matching) and only works in the main thread.  The hard
guarantees (wall-time kill, address-space limit, crash isolation) come from
:class:`~megatron_lpreg.rewards.pool.RewardPool`, which runs stages 2-3 in worker processes.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from typing import Callable, Iterator

from .extract import DEFAULT_MAX_ANSWER_CHARS, OK, find_last_boxed
from .normalize import normalize_answer

__all__ = ["GradingTimeout", "grade", "grade_answer", "grade_detailed", "fast_grade"]

DEFAULT_TIMEOUT_S = 5.0
# Relative tolerance for comparing two closed-form numbers after evalf.
_NUMERIC_RTOL = 1e-9
_EVALF_DIGITS = 30

# Statuses (shared with the pool).
STATUS_OK = "ok"
STATUS_TIMEOUT = "timeout"


class GradingTimeout(BaseException):
    """Raised by the SIGALRM handler.  A BaseException so library ``except Exception`` blocks
    (math-verify and sympy have many) cannot swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`GradingTimeout` in this (main) thread after ``seconds``; no-op elsewhere."""
    if seconds is None or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    armed = [True]

    def _on_alarm(signum, frame):  # noqa: ARG001
        if armed[0]:
            armed[0] = False
            raise GradingTimeout()

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1e-3))
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run_stage(fn: Callable[[], bool], seconds: float | None) -> tuple[bool, bool]:
    """Run one comparison stage; returns (equal, timed_out).  Exceptions count as not equal."""
    try:
        with _deadline(seconds):
            return bool(fn()), False
    except GradingTimeout:
        return False, True
    except Exception:  # noqa: BLE001 - parse failures, sympy errors, RecursionError, MemoryError ...
        return False, False


# --------------------------------------------------------------------------- sympy stage
def _sympy_compare(a, b) -> bool:
    import sympy

    if a == b:
        return True
    if getattr(a, "is_Rational", False) and getattr(b, "is_Rational", False):
        # Exact numbers that differ: the relative tolerance below would call 10**30 - 1 and 10**30 equal.
        return False
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
        return False  # sets, intervals, relations, tuples: structural equality only; math-verify does more
    if not a.free_symbols and not b.free_symbols:
        va, vb = a.evalf(_EVALF_DIGITS), b.evalf(_EVALF_DIGITS)
        if not (va.is_number and vb.is_number) or va.has(sympy.zoo, sympy.nan) or vb.has(sympy.zoo, sympy.nan):
            return False
        if not (va.is_finite and vb.is_finite):
            return va == vb
        diff = abs(complex(va - vb))
        return diff <= _NUMERIC_RTOL * max(1.0, abs(complex(vb)))
    if a.free_symbols != b.free_symbols:
        return False
    diff = a - b
    if sympy.expand(diff) == 0:
        return True
    return sympy.simplify(diff) == 0


def _sympy_equal(answer_norm: str, truth_norm: str) -> bool:
    from latex2sympy2_extended import latex2sympy

    return _sympy_compare(latex2sympy(answer_norm), latex2sympy(truth_norm))


# --------------------------------------------------------------------------- math-verify stage
_MV_LOGGER_QUIETED = False


def _math_verify_equal(answer: str, truth: str) -> bool:
    global _MV_LOGGER_QUIETED
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if not _MV_LOGGER_QUIETED:
        # We run math-verify with its own (signal.alarm based) timeouts disabled -- ours wrap it --
        # and it warns about that once per process.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _MV_LOGGER_QUIETED = True
    # The answer was already extracted from the response: hand it over as a box so only the LaTeX
    # extractor runs on it (math-verify's plain-expression extractor calls sympy's parse_expr).
    pred = parse(
        "\\boxed{" + answer + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
        parsing_timeout=None,
    )
    truth_text = truth if ("$" in truth or "\\boxed" in truth) else "\\boxed{" + truth + "}"
    gold = parse(
        truth_text,
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=None,
    )
    if not pred or not gold:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


# --------------------------------------------------------------------------- fast path
_EXACT_DECIMAL = re.compile(r"-?[0-9]{1,60}(?:\.[0-9]{1,60})?")
_EXACT_FRACTION = re.compile(r"(-?)\\frac\{(-?[0-9]{1,60})\}\{(-?[0-9]{1,60})\}")
# Two plain numbers further apart than this (relative) are unequal for every later stage too
# (sympy uses 1e-9, math-verify rounds to 6 decimals); closer ones are left to those stages.
_FAST_UNEQUAL_RTOL = 1e-4


def _exact_number(s: str):
    """Fraction for a normalised plain integer / decimal / ``\\frac{int}{int}``, else None."""
    from fractions import Fraction

    if _EXACT_DECIMAL.fullmatch(s):
        return Fraction(s)
    m = _EXACT_FRACTION.fullmatch(s)
    if m is not None and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) else value
    return None


def _fast_compare(a: str, g: str) -> float | None:
    if not a or not g:
        return 0.0
    if a == g:
        return 1.0
    x, y = _exact_number(a), _exact_number(g)
    if x is None or y is None:
        return None
    if x == y:
        return 1.0
    if abs(x - y) > _FAST_UNEQUAL_RTOL * max(1, abs(y)):
        return 0.0
    return None


# --------------------------------------------------------------------------- public API
def fast_grade(answer: str, ground_truth: str) -> float | None:
    """Decide cheaply, without sympy: 1.0 if the normalised strings are equal or both are the same
    plain number (``0.5`` vs ``1/2``), 0.0 if either side normalises to nothing or both are plain
    numbers clearly apart, else None (undecided: needs the symbolic stages).  Safe to run in the
    trainer process (linear-time string work on capped inputs)."""
    return _fast_compare(normalize_answer(answer), normalize_answer(ground_truth))


def grade_answer(answer: str, ground_truth: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> tuple[float, str]:
    """Grade an already-extracted answer against the ground truth: ``(reward, status)``."""
    a, g = normalize_answer(answer), normalize_answer(ground_truth)
    decided = _fast_compare(a, g)
    if decided is not None:
        return decided, STATUS_OK
    start = time.monotonic()
    sympy_budget = None if timeout_s is None else timeout_s / 2
    equal, timed_out = _run_stage(lambda: _sympy_equal(a, g), sympy_budget)
    if equal:
        return 1.0, STATUS_OK
    remaining = None
    if timeout_s is not None:
        remaining = timeout_s - (time.monotonic() - start)
        if remaining <= 0:
            return 0.0, STATUS_TIMEOUT
    equal, mv_timed_out = _run_stage(lambda: _math_verify_equal(answer, ground_truth), remaining)
    if equal:
        return 1.0, STATUS_OK
    return 0.0, (STATUS_TIMEOUT if (timed_out or mv_timed_out) else STATUS_OK)


def grade_detailed(
    response: str,
    ground_truth: str,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    max_answer_chars: int | None = DEFAULT_MAX_ANSWER_CHARS,
) -> tuple[float, str]:
    """``(reward, status)``; status is ``ok``, ``timeout``, or why no answer was found
    (``no_box``, ``too_long``, ``unclosed``)."""
    answer, status = find_last_boxed(response, max_answer_chars)
    if answer is None:
        return 0.0, status
    assert status == OK
    return grade_answer(answer, ground_truth, timeout_s)


def grade(
    response: str,
    ground_truth: str,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    max_answer_chars: int | None = DEFAULT_MAX_ANSWER_CHARS,
) -> float:
    """Binary reward (0.0 or 1.0) of ``response`` against ``ground_truth``, in this process.

    Only soft (SIGALRM) timeouts apply here; use :class:`RewardPool` for hard limits.
    """
    return grade_detailed(response, ground_truth, timeout_s, max_answer_chars)[0]
