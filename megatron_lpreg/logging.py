"""Training metrics: ``metrics.jsonl`` (the source of truth), Weights & Biases, and the console.

:class:`MetricsLogger` writes one JSON object per :meth:`MetricsLogger.log` call to
``<run_dir>/metrics.jsonl`` in the format of :mod:`megatron_lpreg.metrics_file` (strict JSON,
non-finite floats as strings; :func:`~megatron_lpreg.metrics_file.read_metrics` reads it back).

Steps count completed optimiser steps: ``log(k, ...)`` follows step ``k`` and a run resumed
from a checkpoint taken after step ``start_step`` logs ``start_step + 1`` next.  When the
logger starts, existing lines with ``step > start_step`` (logged after the checkpoint it
resumes from) are dropped, as is an unparsable line (a write torn by a crash); the file is
rewritten atomically (temp file + ``os.replace``), so a resumed run's file reads like an
uninterrupted one.  The rule holds for ``start_step == 0`` too: a fresh run in an existing
``run_dir`` replaces what a previous attempt logged there (a warning says how many lines
went).

``backends`` chooses the others: ``wandb`` (the default) and ``tensorboard`` (event files under
``<run_dir>/tensorboard``, every numeric metric a scalar at its step; written with
``torch.utils.tensorboard`` when the ``tensorboard`` package is installed, else ``tensorboardX``;
a resumed logger purges events after ``start_step``). Without ``wandb`` in ``backends`` wandb is
never imported. A backend that cannot start or write logs one warning and is switched off;
``metrics.jsonl`` does not depend on either.  The mode is
``wandb_mode``, else ``$WANDB_MODE``, else ``"offline"`` without a project and ``"online"`` with
one; the run lives under ``<run_dir>/wandb``.  The run id is kept in ``<run_dir>/wandb_run_id``: a
resumed logger (``start_step > 0``) continues that run (``resume="allow"``), a fresh one starts a
new run and overwrites the file.  If wandb cannot be imported, ``wandb.init`` fails, or a later
wandb call raises, one warning is logged and wandb is switched off for the rest of the run.
``WANDB_SILENT=true`` is set unless the environment already sets it.

:meth:`MetricsLogger.log_summary` merges values into the wandb summary and
``<run_dir>/summary.json`` (atomic write; a resumed logger keeps the values already there, a
fresh one starts empty and removes a previous attempt's file).

Console: a tqdm bar over ``total_steps`` (shown only when stderr is a terminal, tqdm's default)
whose postfix carries the key metrics, and one compact line per step on stdout via
``tqdm.write``, e.g. ``step 3/10 reward 0.250 entropy 1.234 lpreg_sel 0.0125 time 2.41s``.

Only rank 0 should log: with ``enabled=False`` every method is a no-op and nothing is touched.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import secrets
import string
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_lpreg.metrics_file import METRICS_FILE, atomic_write_text, decode, dumps, parse_line

__all__ = ["MetricsLogger", "RUN_ID_FILE", "SUMMARY_FILE"]

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
RUN_ID_FILE = "wandb_run_id"
DEFAULT_PROJECT = "megatron-lpreg"

# (metric key, short console label, format) for the progress-bar postfix and the per-step line.
CONSOLE_KEYS: tuple[tuple[str, str, str], ...] = (
    ("reward/mean", "reward", "{:.3f}"),
    ("entropy/mean", "entropy", "{:.3f}"),
    ("lpreg/selected", "lpreg_sel", "{:.3g}"),
    ("time/step", "time", "{:.2f}s"),
)

_RESERVED = ("step", "time")
_ID_ALPHABET = string.ascii_lowercase + string.digits


# --------------------------------------------------------------------------- values


def _plain(value: Any, key: str) -> Any:
    """``value`` as a plain Python scalar (numpy / torch scalars via ``.item()``)."""
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)
    if callable(item):  # numpy scalar / 0-d array, one-element torch tensor
        try:
            return _plain(item(), key)
        except (ValueError, RuntimeError) as e:
            raise TypeError(f"metric {key!r}: {type(value).__name__} is not a scalar ({e})") from e
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric {key!r}: cannot log a value of type {type(value).__name__}")


def _new_run_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def _format_console(metrics: Mapping[str, Any]) -> list[str]:
    parts = []
    for key, label, fmt in CONSOLE_KEYS:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        parts.append(f"{label} {fmt.format(value)}")
    return parts


# --------------------------------------------------------------------------- the logger


class MetricsLogger:
    """Metrics to ``<run_dir>/metrics.jsonl``, wandb and the console; see the module docstring.

    Use it as a context manager or call :meth:`close`.  ``config`` goes to ``wandb.config``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        config: dict,
        enabled: bool = True,
        total_steps: int | None = None,
        wandb_project: str | None = None,
        wandb_mode: str | None = None,
        wandb_name: str | None = None,
        wandb_entity: str | None = None,
        console: bool = True,
        start_step: int = 0,
        backends: tuple[str, ...] | list[str] = ("wandb",),
    ) -> None:
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.start_step = int(start_step)
        self.console = console
        self.wandb_run = None
        self.wandb_run_id: str | None = None
        self.wandb_mode: str | None = None
        self._wandb_warned = False
        self.tensorboard = None
        self._file = None
        self._bar = None
        self._summary: dict[str, Any] = {}
        self._last_step: int | None = None
        self._warned_step_order = False
        self._closed = False
        if not self.enabled:
            return
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.summary_path = self.run_dir / SUMMARY_FILE
        self._truncate_metrics()
        self._load_summary()
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if "wandb" in backends:
            self._init_wandb(config, wandb_project, wandb_mode, wandb_name, wandb_entity)
        if "tensorboard" in backends:
            self._init_tensorboard()
        if console:
            from tqdm import tqdm

            # disable=None: the bar shows only on a terminal; the per-step lines always print.
            self._bar = tqdm(
                total=total_steps,
                initial=self.start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                disable=None,
            )

    # ----------------------------------------------------------------------- start-up

    def _truncate_metrics(self) -> None:
        """Drop lines with ``step > start_step`` and unparsable lines; rewrite atomically."""
        if not self.metrics_path.exists():
            return
        text = self.metrics_path.read_text(encoding="utf-8")
        kept, dropped, malformed = [], 0, 0
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                step = parse_line(line)["step"]
            except ValueError:
                malformed += 1
                continue
            if step > self.start_step:
                dropped += 1
            else:
                kept.append(line)
        new_text = "".join(line + "\n" for line in kept)
        if new_text == text:
            return
        if dropped or malformed:
            logger.warning(
                "%s: starting at step %d; dropped %d line(s) with a later step and %d malformed "
                "line(s), kept %d",
                self.metrics_path, self.start_step, dropped, malformed, len(kept),
            )
        atomic_write_text(self.metrics_path, new_text)

    def _load_summary(self) -> None:
        if not self.summary_path.exists():
            return
        if self.start_step == 0:  # a fresh run replaces a previous attempt's summary
            self.summary_path.unlink()
            return
        try:
            summary = decode(json.loads(self.summary_path.read_text(encoding="utf-8")))
            if not isinstance(summary, dict):
                raise ValueError(f"expected a JSON object, got {type(summary).__name__}")
            self._summary = summary
        except ValueError as e:
            logger.warning("%s is unreadable (%s); starting an empty summary", self.summary_path, e)
            self._summary = {}

    def _warn_wandb(self, what: str, error: BaseException) -> None:
        """Log one warning for the first wandb failure and switch wandb off."""
        self.wandb_run = None
        if not self._wandb_warned:
            self._wandb_warned = True
            logger.warning(
                "wandb %s failed (%s: %s); continuing without wandb, %s is still written",
                what, type(error).__name__, error, self.metrics_path,
            )

    def _init_wandb(self, config, project, mode, name, entity) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        if mode is None:
            mode = os.environ.get("WANDB_MODE") or ("offline" if project is None else "online")
        self.wandb_mode = mode
        id_path = self.run_dir / RUN_ID_FILE
        run_id = None
        if self.start_step > 0 and id_path.exists():
            run_id = id_path.read_text(encoding="utf-8").strip() or None
        resuming = run_id is not None
        if run_id is None:
            run_id = _new_run_id()
            # Written before init, so a resume finds the id even if this init fails.
            atomic_write_text(id_path, run_id + "\n")
        self.wandb_run_id = run_id
        try:
            import wandb

            self.wandb_run = wandb.init(
                project=project or DEFAULT_PROJECT,
                entity=entity,
                name=name,
                config=config,
                dir=os.fspath(self.run_dir),
                mode=mode,
                id=run_id,
                resume="allow",
                reinit="create_new",  # several loggers in one process stay independent
            )
        except Exception as e:  # noqa: BLE001 - any wandb problem must not stop training
            self._warn_wandb("init", e)
            return
        if resuming and mode == "online":
            # wandb drops logs whose step is below the resumed run's step; say so up front.
            try:
                next_step = self.wandb_run.step
            except Exception:  # noqa: BLE001
                next_step = None
            if next_step is not None and next_step > self.start_step + 1:
                logger.warning(
                    "wandb run %s already has history up to step %d; wandb will ignore steps "
                    "%d..%d of this resumed run (metrics.jsonl keeps them)",
                    self.wandb_run_id, next_step - 1, self.start_step + 1, next_step - 1,
                )

    def _init_tensorboard(self) -> None:
        try:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package; tensorboardX is light
                from tensorboardX import SummaryWriter
            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.start_step + 1)
        except Exception as e:  # noqa: BLE001
            logger.warning("tensorboard logging off: %s (pip install tensorboardX, or tensorboard)",
                           str(e).splitlines()[0] if str(e) else type(e).__name__)

    # ----------------------------------------------------------------------- logging

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` for ``step``: a metrics.jsonl line, ``wandb.log`` and the console.

        Values may be Python numbers, bools, strings, None, or numpy / torch scalars.  ``"step"``
        and ``"time"`` are reserved keys.  The same step may be logged more than once (e.g.
        training then validation metrics); wandb ignores a step lower than one already logged.
        """
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log() after close()")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        step = int(step)
        values: dict[str, Any] = {}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise TypeError(f"metric names must be str, got {key!r}")
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved in metrics.jsonl")
            values[key] = _plain(value, key)
        if self._last_step is not None and step < self._last_step and not self._warned_step_order:
            self._warned_step_order = True
            logger.warning(
                "step %d logged after step %d; wandb will drop it", step, self._last_step
            )
        self._last_step = step if self._last_step is None else max(self._last_step, step)

        self._file.write(dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._file.flush()

        if self.wandb_run is not None:
            try:
                self.wandb_run.log(values, step=step)
            except Exception as e:  # noqa: BLE001
                self._warn_wandb("log", e)

        if self.tensorboard is not None:
            try:
                for key, value in values.items():
                    if isinstance(value, numbers.Real) and not isinstance(value, bool):
                        self.tensorboard.add_scalar(key, value, global_step=step)
                self.tensorboard.flush()
            except Exception as e:  # noqa: BLE001
                logger.warning("tensorboard logging off: %s", e)
                self.tensorboard = None

        if self.console:
            self._update_console(step, values)

    def _update_console(self, step: int, values: Mapping[str, Any]) -> None:
        from tqdm import tqdm

        parts = _format_console(values)
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix_str(" ".join(parts), refresh=False)
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
        # tqdm.write prints above the bar and redraws it (now with this step's state).
        total = f"/{self.total_steps}" if self.total_steps is not None else ""
        tqdm.write(" ".join([f"step {step}{total}", *parts]), file=sys.stdout)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Merge ``metrics`` (e.g. the best validation score) into the wandb run summary and
        ``<run_dir>/summary.json``; values may be scalars or nested lists / dicts of them."""
        if not self.enabled:
            return
        values = {str(k): _plain(v, str(k)) for k, v in metrics.items()}
        self._summary.update(values)
        atomic_write_text(self.summary_path, dumps(self._summary, indent=2) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update(values)
            except Exception as e:  # noqa: BLE001
                self._warn_wandb("summary", e)

    @property
    def summary(self) -> dict[str, Any]:
        """A copy of the summary written so far (including a resumed run's earlier values)."""
        return dict(self._summary)

    # ----------------------------------------------------------------------- shutdown

    def close(self, exit_code: int | None = None) -> None:
        """Finish the wandb run (``exit_code`` != 0 marks it failed), close the bar and the
        file.  Idempotent."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                self._warn_wandb("finish", e)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=1 if exc_type is not None else None)
