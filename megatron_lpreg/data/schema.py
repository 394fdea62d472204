"""verl's prompt-file schema: field names, the record type, and per-row validation.

A verl RL prompt row looks like::

    {"prompt": [{"role": "user", "content": "..."}],   # or a plain string
     "data_source": "math_dapo",
     "reward_model": {"ground_truth": "34", "style": "rule"},
     ...}

Field names are configurable through :class:`DataFields`. A dotted name (``reward_model.ground_truth``)
is first looked up as a flat column of that exact name and otherwise walked as a nested path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

Message = dict[str, str]
Prompt = Union[str, list[Message]]

_MISSING = object()

#: A row (a JSONL line, or a Parquet row's prompt text) above this size is an error: no real prompt
#: is near it, and a runaway row (a concatenated file, a binary blob) should not be tokenised.
MAX_ROW_BYTES = 8 << 20


class DataError(ValueError):
    """A malformed prompt row. The message names the file, the row and the field."""

    def __init__(self, path: str, row: str | None, field: str | None, reason: str):
        self.path = str(path)
        self.row = row
        self.field = field
        self.reason = reason
        where = self.path if row is None else f"{self.path}: {row}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {reason}")


class FieldError(ValueError):
    """Validation failure of one field inside one row (no location yet); wrapped into DataError."""

    def __init__(self, field: str | None, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class DataFields:
    """Column names of the three fields the trainer needs (dotted = nested lookup)."""

    prompt: str = "prompt"
    data_source: str = "data_source"
    ground_truth: str = "reward_model.ground_truth"


@dataclass(frozen=True)
class PromptRecord:
    """One validated prompt.

    ``prompt`` is either the prompt string or a list of ``{"role", "content"}`` chat messages.
    ``index`` is the record's position in its dataset (0-based, dense after skipped rows).
    """

    index: int
    prompt: Prompt
    data_source: str
    ground_truth: str
    extra_info: dict | None = None  # verl's per-row extras, passed to a custom reward function

    def messages(self) -> list[Message]:
        """The prompt as a chat message list (a string prompt becomes one user message)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [dict(m) for m in self.prompt]

    @property
    def question(self) -> str:
        """The user's question: the string prompt, or the user messages' contents joined."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        if not users:
            raise ValueError(f"record {self.index}: the message list has no user message")
        return "\n\n".join(users)


def lookup(row: dict, name: str) -> Any:
    """Value of column ``name`` in ``row``; a dotted name falls back to a nested walk. Missing -> _MISSING."""
    if name in row:
        return row[name]
    if "." not in name:
        return _MISSING
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_size(chars: int, field: str) -> None:
    if chars > MAX_ROW_BYTES:
        raise FieldError(field, f"prompt is {chars / 2**20:.1f} M characters, over the "
                                f"{MAX_ROW_BYTES >> 20} MB row limit")


def validate_prompt(value: Any, field: str) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise FieldError(field, "empty prompt")
        _check_size(len(value), field)
        return value
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise FieldError(field, "empty prompt (no messages)")
        messages: list[Message] = []
        for i, msg in enumerate(value):
            if not isinstance(msg, dict):
                raise FieldError(field, f"message {i} is a {_type_name(msg)}, expected a dict with 'role' and 'content'")
            role, content = msg.get("role"), msg.get("content")
            if not isinstance(role, str) or not role:
                raise FieldError(field, f"message {i} has no string 'role'")
            if not isinstance(content, str):
                raise FieldError(field, f"message {i} has 'content' of type {_type_name(content)}, expected str")
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "user" for m in messages):
            raise FieldError(field, "message list has no 'user' message")
        if not any(m["content"].strip() for m in messages):
            raise FieldError(field, "empty prompt (all message contents are empty)")
        _check_size(sum(len(m["content"]) for m in messages), field)
        return messages
    raise FieldError(field, f"expected a string or a list of chat messages, got {_type_name(value)}")


def validate_data_source(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {_type_name(value)}")
    if not value:
        raise FieldError(field, "empty data_source")
    return value


def _scalar_ground_truth(value: Any, field: str) -> str:
    if isinstance(value, bool):
        raise FieldError(field, "expected a string or a number, got bool")
    if isinstance(value, str):
        if not value.strip():
            raise FieldError(field, "empty ground truth")
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FieldError(field, f"non-finite ground truth {value!r}")
        # Integer-valued floats (an int column that went through a float dtype) print as integers.
        return str(int(value)) if value.is_integer() else repr(value)
    raise FieldError(field, f"expected a string or a number, got {_type_name(value)}")


def validate_ground_truth(value: Any, field: str) -> str:
    """Ground truth as a string: numbers are converted, a one-element list is unwrapped."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise FieldError(field, f"expected a single answer, got a list of {len(value)} elements")
        value = value[0]
        if isinstance(value, (list, tuple, dict)):
            raise FieldError(field, f"expected a string or a number inside the list, got {_type_name(value)}")
    return _scalar_ground_truth(value, field)


def parse_row(row: Any, index: int, fields: DataFields) -> PromptRecord:
    """Validate one decoded row; raises FieldError naming the offending field."""
    if not isinstance(row, dict):
        raise FieldError(None, f"row is a {_type_name(row)}, expected a JSON object")
    values = {}
    for attr in ("prompt", "data_source", "ground_truth"):
        name = getattr(fields, attr)
        value = lookup(row, name)
        if value is _MISSING or value is None:
            raise FieldError(name, "missing field" if value is _MISSING else "field is null")
        values[attr] = value
    extra_info = row.get("extra_info")
    if extra_info is not None and not isinstance(extra_info, dict):
        raise FieldError("extra_info", f"expected a mapping (or null), got {_type_name(extra_info)}")
    return PromptRecord(
        index=index,
        prompt=validate_prompt(values["prompt"], fields.prompt),
        data_source=validate_data_source(values["data_source"], fields.data_source),
        ground_truth=validate_ground_truth(values["ground_truth"], fields.ground_truth),
        extra_info=extra_info,
    )
