"""Sample responses: what the model writes, readable beside the metrics.

``run_dir/samples.jsonl`` holds one JSON object per response::

    {"step": 12, "kind": "train" | "val", "data_source": ..., "prompt": ..., "response": ...,
     "ground_truth": ..., "reward": 1.0, "status": "ok", "response_len": 212, "finish_reason": "stop"}

the first ``logging.samples_per_step`` responses of each training step (whole prompt groups
first, so a group's spread of rewards is visible) and of each validation source. The prompt is
the text the model saw (template included). Size-bounded: past ``logging.samples_max_mb`` the
file becomes ``samples.jsonl.1`` (replacing an older one) and a new one starts. A resumed run
drops the lines of steps after its checkpoint, as ``metrics.jsonl`` does. ``evaluate`` writes the
same rows for every response it scores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_lpreg.metrics_file import atomic_write_text

SAMPLES_FILE = "samples.jsonl"


def sample_rows(graded, tokenizer, *, step: int, kind: str, limit: int | None = None) -> list[dict]:
    """Rows of the first ``limit`` responses (all when None) of a ``GradedRollout`` that kept its
    texts and records (the engine rank's)."""
    count = len(graded.completions) if limit is None else min(limit, len(graded.completions))
    prompts = {}
    rows = []
    for i in range(count):
        p = i // graded.n
        if p not in prompts:
            prompts[p] = tokenizer.decode(graded.prompt_ids[p], skip_special_tokens=False)
        record = graded.records[p] if graded.records else None
        completion = graded.completions[i]
        rows.append({
            "step": step, "kind": kind, "data_source": record.data_source if record else None,
            "prompt": prompts[p], "response": graded.texts[i] if graded.texts else None,
            "ground_truth": record.ground_truth if record else None, "reward": graded.rewards[i],
            "status": graded.statuses[i], "response_len": len(completion.token_ids),
            "finish_reason": completion.finish_reason,
        })
    return rows


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append ``rows`` to a JSONL file (no size bound: ``evaluate``'s complete record)."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


class SampleFile:
    """``run_dir/samples.jsonl`` with its size bound; with ``enabled=False`` (ranks other than 0,
    or ``samples_per_step: 0``) every method is a no-op."""

    def __init__(self, run_dir, *, max_bytes: int, start_step: int, enabled: bool = True):
        self.path = Path(run_dir) / SAMPLES_FILE
        self.max_bytes = max_bytes
        self.enabled = enabled
        if enabled and self.path.exists():
            self._drop_after(start_step)

    def _drop_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line torn by a crash
                continue
        atomic_write_text(self.path, "".join(kept))

    def write(self, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        write_rows(self.path, rows)
        if self.path.stat().st_size > self.max_bytes:
            os.replace(self.path, self.path.with_name(SAMPLES_FILE + ".1"))
