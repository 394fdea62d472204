"""A finished (or running) run directory read back: its metrics as per-key series and its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_lpreg.metrics_file import METRICS_FILE, read_metrics

CONFIG_FILE = "config.yaml"


class RunError(ValueError):
    """A run directory that cannot be read, or a bad argument about runs; the message names it."""


@dataclass
class Run:
    """One run: ``series[key] = (steps, values)`` sorted by step, for every numeric metric."""

    path: Path
    label: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    method: str | None = None

    def has(self, key: str) -> bool:
        return key in self.series and len(self.series[key][0]) > 0

    @property
    def last_step(self) -> int | None:
        return max((steps[-1] for steps, _ in self.series.values() if steps), default=None)


def group_by_label(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs under one label (a method's seeds), in first-appearance order."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    return list(groups.items())


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _merge(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Records -> per-metric series; lines of the same step are merged (a later line wins a key)."""
    by_step: dict[int, dict] = {}
    for record in records:
        by_step.setdefault(record["step"], {}).update(record)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key in ("step", "time"):
                continue
            number = _number(value)
            if number is None:
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(number)
    return series


def _load_config(path: Path) -> dict:
    if not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def loss_method(config: dict) -> str | None:
    """The loss of a resolved ``config.yaml``: its ``loss.preset``; ``None`` for a config without one.

    The compare command's plain-GRPO run switches Lp-Reg off under the default preset, keeping its
    clip: that is named ``grpo (clip lo/hi)``, not ``lp_reg``.
    """
    loss = config.get("loss")
    if not isinstance(loss, dict) or "preset" not in loss:
        return None
    if loss["preset"] == "lp_reg" and loss.get("enabled") is False:
        return f"grpo (clip {loss.get('eps_low')}/{loss.get('eps_high')})"
    return str(loss["preset"])


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Read ``<run_dir>/metrics.jsonl`` (and ``config.yaml`` when present); RunError if unreadable."""
    path = Path(run_dir)
    metrics = path / METRICS_FILE
    if not path.is_dir():
        raise RunError(f"run directory {str(path)!r} does not exist")
    if not metrics.is_file():
        raise RunError(f"run directory {str(path)!r} has no {METRICS_FILE} (is it a run directory?)")
    try:
        records = read_metrics(metrics)
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {metrics}: {e}") from e
    config = _load_config(path / CONFIG_FILE)
    if label is None:
        logging_cfg = config.get("logging")
        name = logging_cfg.get("wandb_name") if isinstance(logging_cfg, dict) else None
        label = str(name) if name else path.resolve().name
    return Run(path=path, label=label, series=_merge(records), config=config, method=loss_method(config))
