"""Prompt datasets from JSONL and Parquet files in verl's schema.

Rows are numbered in errors as ``line N`` (1-based physical line) for JSONL and ``row N`` (0-based row
index) for Parquet. A JSONL line over ``MAX_ROW_BYTES`` (8 MB), a Parquet prompt over as many
characters, a line that is not UTF-8, an empty file and a file pyarrow cannot read are errors too. With ``on_error="skip"`` malformed rows are dropped and reported through
``dataset.skipped`` / ``dataset.skip_reasons`` instead of raising :class:`DataError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from .schema import MAX_ROW_BYTES, DataError, DataFields, FieldError, PromptRecord, parse_row

OnError = Literal["raise", "skip"]

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def _detect_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    raise DataError(path, None, None, "cannot tell the format from the file name (expected .jsonl or .parquet); "
                                      "pass format='jsonl' or 'parquet'")


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(path, None, None, f"cannot read the file ({e.strerror})") from None


def _lines(f, limit: int) -> Iterator[bytes | None]:
    """Physical lines of a binary file; None for a line longer than ``limit`` bytes, which is read
    past in bounded chunks (a multi-GB line never sits in memory whole)."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n") and len(line) == limit + 1:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = f.readline(1 << 20)
        yield None


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    """(row label, decoded row or a DataError for undecodable lines); blank lines are ignored."""
    with _open(path) as f:
        for lineno, raw in enumerate(_lines(f, MAX_ROW_BYTES), start=1):
            label = f"line {lineno}"
            if raw is None:
                yield label, DataError(path, label, None, f"line longer than the {MAX_ROW_BYTES >> 20} MB row limit")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield label, DataError(path, label, None,
                                       f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield label, json.loads(line)
            except json.JSONDecodeError as e:
                yield label, DataError(path, label, None, f"invalid JSON ({e.msg} at column {e.pos + 1})")
            except RecursionError:
                yield label, DataError(path, label, None, "invalid JSON (nested too deeply)")


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet_file = pq.ParquetFile(path)
        for batch in parquet_file.iter_batches(batch_size=4096):
            for item in batch.to_pylist():
                yield f"row {row}", item
                row += 1
    except (pa.ArrowException, OSError) as e:
        # pyarrow's messages can span lines (e.g. a schema dump): the first one says what is wrong.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "file" if row == 0 else f"after row {row - 1}"
        raise DataError(path, None, None, f"cannot read as Parquet ({where}: {reason})") from None


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
        if not self.records and self.skip_reasons:
            raise DataError(self.paths[0], None, None, f"no usable prompt rows: all {self.skipped} were skipped "
                                                       f"(data.on_error=skip), the first: {self.skip_reasons[0]}")

    def _load_file(self, path: str, fmt: str, max_samples: int | None) -> None:
        if fmt == "jsonl":
            rows = _iter_jsonl(path)
        elif fmt == "parquet":
            rows = _iter_parquet(path)
        else:
            raise ValueError(f"unknown format {fmt!r} (expected 'jsonl' or 'parquet')")
        seen = 0
        for label, row in rows:
            if max_samples is not None and len(self.records) >= max_samples:
                return
            seen += 1
            if isinstance(row, DataError):
                self._fail(row)
                continue
            try:
                self.records.append(parse_row(row, len(self.records), self.fields))
            except FieldError as e:
                self._fail(DataError(path, label, e.field, e.reason))
        if not seen:
            raise DataError(path, None, None, "no prompt rows (the file is empty)")

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
