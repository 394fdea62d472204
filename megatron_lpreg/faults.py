"""Named points in a training step: where each rank last was, and injected faults for tests.

The trainer and the checkpoint code call ``point(name)`` where a step passes a phase boundary
(rollout, logprob, train, optimizer, refit, checkpoint_shard, checkpoint_commit, checkpoint_rename).
That does two things:

* it remembers the phase and step, so a failing rank can say where it was (``where()``), and when
  the launcher set ``MEGATRON_LPREG_PHASE_DIR``, writes it to ``<dir>/rank_<r>`` so the launcher can
  say where a rank that died without a word (SIGKILL, OOM killer) last was;
* when ``MEGATRON_LPREG_FAULT`` names that point, it injects the fault there (reliability tests and
  ``benchmarks/fault_matrix.py``). Without the variable it costs a dictionary look-up.

``MEGATRON_LPREG_FAULT="point:step[:rank][:action][,point:step...]"``

    point   one of POINTS
    step    the training step (``3``), or ``3+`` for every step from 3 on
    rank    global rank that fails (default: every rank)
    action  kill    SIGKILL this process (default): a rank that dies without cleanup
            killall SIGKILL this process group: the launcher and every rank at once
            hang    sleep forever: a rank that stops answering collectives
            nan     fill the tensors the point offers (gradients, logits) with NaN
            enospc  raise OSError(ENOSPC) as a write to a full disk does

A fault fires at the first time its point is reached in a matching step (each time for ``nan``).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

FAULT_ENV = "MEGATRON_LPREG_FAULT"
PHASE_DIR_ENV = "MEGATRON_LPREG_PHASE_DIR"
POINTS = ("rollout", "logprob", "train", "optimizer", "refit", "validation",
          "checkpoint_shard", "checkpoint_commit", "checkpoint_rename")
ACTIONS = ("kill", "killall", "hang", "nan", "enospc")


@dataclass(frozen=True)
class Fault:
    point: str
    step: int
    from_step_on: bool
    rank: int | None
    action: str

    def matches(self, point: str, step: int | None, rank: int) -> bool:
        if point != self.point or step is None or (self.rank is not None and rank != self.rank):
            return False
        return step >= self.step if self.from_step_on else step == self.step


def parse_faults(spec: str) -> list[Fault]:
    """``MEGATRON_LPREG_FAULT``'s value as faults; a malformed entry is a ValueError naming it."""
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = entry.split(":")
        point, step, rank, action = parts[0], parts[1] if len(parts) > 1 else "", None, "kill"
        for extra in parts[2:]:
            if extra.isdigit():
                rank = int(extra)
            else:
                action = extra
        from_on = step.endswith("+")
        if point not in POINTS or not step.rstrip("+").isdigit() or action not in ACTIONS or len(parts) > 4:
            raise ValueError(f"{FAULT_ENV}: bad entry {entry!r}: expected point:step[:rank][:action] with point in "
                             f"{', '.join(POINTS)} and action in {', '.join(ACTIONS)}")
        faults.append(Fault(point, int(step.rstrip("+")), from_on, rank, action))
    return faults


_parsed: dict[str, list[Fault]] = {}
_fired: set[tuple[Fault, int]] = set()
_where = {"phase": None, "step": None}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def where() -> str:
    """'train step 3': the last point this process reached ('start' before any)."""
    if _where["phase"] is None:
        return "start"
    return f"{_where['phase']} step {_where['step']}" if _where["step"] is not None else _where["phase"]


def point(name: str, step: int | None = None, tensors: Callable[[], Iterable[torch.Tensor]] | None = None) -> None:
    """This rank reached ``name`` in ``step`` (default: the last step given). ``tensors``: what a
    ``nan`` fault poisons here (a callable, so a run without faults builds nothing)."""
    if step is not None:
        _where["step"] = step
    _where["phase"] = name
    phase_dir = os.environ.get(PHASE_DIR_ENV)
    if phase_dir:
        try:
            Path(phase_dir, f"rank_{_rank()}").write_text(where())
        except OSError:  # the report is a courtesy; never fail a step over it
            pass
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    if spec not in _parsed:
        _parsed[spec] = parse_faults(spec)
    for fault in _parsed[spec]:
        if fault.matches(name, _where["step"], _rank()):
            if fault.action != "nan" and (fault, _where["step"]) in _fired:
                continue
            _fired.add((fault, _where["step"]))
            _inject(fault, tensors)


def _inject(fault: Fault, tensors) -> None:
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "killall":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    elif fault.action == "hang":
        while True:
            time.sleep(60)
    elif fault.action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAULT_ENV} at {where()})")
    elif fault.action == "nan" and tensors is not None:
        with torch.no_grad():
            for t in tensors():
                if t is not None:
                    t.fill_(float("nan"))
