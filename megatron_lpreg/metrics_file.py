"""The ``metrics.jsonl`` format: what a line holds, how it is encoded, and reading it back.

One JSON object per line::

    {"step": 3, "time": 1767225600.25, "reward/mean": 0.25, "entropy/mean": 1.23, "loss": "NaN"}

* ``step`` is an int, ``time`` the wall-clock time of the line (Unix seconds, float); the metrics
  follow in the order given.  Floats stay floats (ints stay ints, bools stay bools).
* **Non-finite floats** are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``
  (the spellings Python's ``float()`` and JavaScript accept), so every line is strict JSON and a
  diverging loss stays distinguishable from a missing one.  :func:`read_metrics` turns them back
  into floats; a plain string metric that happens to read ``"NaN"`` therefore comes back as a float.

The writer is :class:`megatron_lpreg.logging.MetricsLogger`; this module is what it and the
readers (:mod:`megatron_lpreg.runs`, the benchmarks, the tests) share, so reading a run back does
not import wandb, tqdm or the logger.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MACHINE_METRICS", "METRICS_FILE", "read_metrics", "run_metrics"]

METRICS_FILE = "metrics.jsonl"

_NONFINITE_TO_STR = {math.inf: "Infinity", -math.inf: "-Infinity"}
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode(value: Any) -> Any:
    """Plain value -> strict-JSON value (non-finite floats become strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else _NONFINITE_TO_STR[value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, str):
        return _STR_TO_NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(encode(obj), allow_nan=False, ensure_ascii=False, **kwargs)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def parse_line(line: str) -> dict:
    """One metrics line -> its (decoded) record; ``ValueError`` if it is not a metrics record."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"missing or non-integer 'step': {step!r}")
    return decode(record)


MACHINE_METRICS = ("time", "memory/", "perf/")  # the wall-clock stamp, time/*, memory/*, perf/*: the machine, not the run


def run_metrics(row: dict) -> dict:
    """``row`` without the machine's measurements: what a resumed run must reproduce exactly."""
    return {k: v for k, v in row.items() if not k.startswith(MACHINE_METRICS)}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a ``metrics.jsonl`` back: one dict per line, non-finite floats restored.

    Blank lines are skipped.  An unparsable *last* line without a terminating newline is a write
    in progress (or torn by a crash) and is skipped too; any other malformed line raises
    ``ValueError("<path>:<line number>: ...")``.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # split() leaves "" after a final newline; a non-empty last element is an unterminated line.
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(parse_line(line))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if lineno == len(lines):
                break
            raise ValueError(f"{path}:{lineno}: malformed metrics line: {e}") from e
    return records
