"""Prompt datasets from JSONL and Parquet files in verl's schema.

Rows are numbered in errors as ``line N`` (1-based physical line) for JSONL and ``row N`` (0-based row
index) for Parquet. With ``on_error="skip"`` malformed rows are dropped and reported through
``dataset.skipped`` / ``dataset.skip_reasons`` instead of raising :class:`DataError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from .schema import DataError, DataFields, FieldError, PromptRecord, parse_row

OnError = Literal["raise", "skip"]

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def _detect_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    raise ValueError(f"{path}: cannot tell the format from the file name; pass format='jsonl' or 'parquet'")


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    """(row label, decoded row or a DataError for undecodable lines); blank lines are ignored."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            label = f"line {lineno}"
            try:
                yield label, json.loads(line)
            except json.JSONDecodeError as e:
                yield label, DataError(path, label, None, f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    parquet_file = pq.ParquetFile(path)
    row = 0
    for batch in parquet_file.iter_batches(batch_size=4096):
        for item in batch.to_pylist():
            yield f"row {row}", item
            row += 1


class PromptDataset(Sequence):
    """Validated prompt records from one or more JSONL / Parquet files (concatenated in order)."""

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        fields: DataFields | None = None,
        on_error: OnError = "raise",
        format: str | None = None,
        max_samples: int | None = None,
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("no data files given")
        self.fields = fields or DataFields()
        self.on_error = on_error
        self.records: list[PromptRecord] = []
        self.skip_reasons: list[str] = []
        for path in self.paths:
            if max_samples is not None and len(self.records) >= max_samples:
                break
            self._load_file(path, format or _detect_format(path), max_samples)

    def _load_file(self, path: str, fmt: str, max_samples: int | None) -> None:
        if fmt == "jsonl":
            rows = _iter_jsonl(path)
        elif fmt == "parquet":
            rows = _iter_parquet(path)
        else:
            raise ValueError(f"unknown format {fmt!r} (expected 'jsonl' or 'parquet')")
        for label, row in rows:
            if max_samples is not None and len(self.records) >= max_samples:
                return
            if isinstance(row, DataError):
                self._fail(row)
                continue
            try:
                self.records.append(parse_row(row, len(self.records), self.fields))
            except FieldError as e:
                self._fail(DataError(path, label, e.field, e.reason))

    def _fail(self, error: DataError) -> None:
        if self.on_error == "raise":
            raise error
        self.skip_reasons.append(str(error))

    @property
    def skipped(self) -> int:
        """Number of malformed rows dropped (only non-zero with on_error='skip')."""
        return len(self.skip_reasons)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"PromptDataset(paths={self.paths!r}, records={len(self)}, skipped={self.skipped})"


def load_prompt_dataset(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    fields: DataFields | None = None,
    on_error: OnError = "raise",
    format: str | None = None,
    max_samples: int | None = None,
) -> PromptDataset:
    """Load and validate prompt files; see :class:`PromptDataset`."""
    return PromptDataset(paths, fields=fields, on_error=on_error, format=format, max_samples=max_samples)
