"""The configuration reference (docs/configuration.md), generated from the dataclasses.

    megatron-lpreg config-reference > docs/configuration.md

Each field's description is its comment in the source (the comment at the end of its line, or the
comment lines just above it), so the reference cannot drift from the code: a test regenerates it and
compares, and fails for a field without a description.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import tokenize
import typing

from megatron_lpreg import config as config_module
from megatron_lpreg.loss import config as loss_config_module
from megatron_lpreg.loss.config import PRESETS, LpRegConfig

__all__ = ["add_arguments", "field_comments", "reference", "run"]

_INTRO = """\
# Configuration reference

Generated from the dataclasses in `megatron_lpreg/config.py` and `megatron_lpreg/loss/config.py`
by `megatron-lpreg config-reference`; do not edit by hand.

A run configuration is a YAML file of these sections; it states only what differs from the
defaults, which are the published Lp-Reg settings. `key=value` arguments override it with dotted
keys (`grpo.steps=10`, `loss.rho=0.005`, `data.train_files=[a.jsonl,b.jsonl]`). Precedence:
defaults < `loss.preset` < the file < the command line. A misspelt key or a value of the wrong
type stops the run before any work, naming the file, the line and the key. The resolved
configuration is written to `run_dir/config.yaml`.
"""


def field_comments(cls) -> dict[str, str]:
    """Field name -> its comment: the one ending its line, else the comment lines right above it
    (a field a subclass redeclares takes the subclass's)."""
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_own_field_comments(klass, names))
    return comments


def _own_field_comments(cls, names: set[str]) -> dict[str, str]:
    source = inspect.getsource(cls)
    comments: dict[str, str] = {}
    pending: list[str] = []  # comment lines seen since the last statement
    line_tokens: list[tokenize.TokenInfo] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not line_tokens:
            pending.append(tok.string.lstrip("#").strip())
            continue
        if tok.type in (tokenize.NL, tokenize.NEWLINE):
            if line_tokens:
                first = line_tokens[0]
                is_field = (first.type == tokenize.NAME and first.string in names and len(line_tokens) > 1
                            and line_tokens[1].string == ":")
                trailing = [t.string.lstrip("#").strip() for t in line_tokens if t.type == tokenize.COMMENT]
                if is_field:
                    comments[first.string] = " ".join(trailing or pending)
                pending = []
            line_tokens = []
            continue
        if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING):
            continue
        line_tokens.append(tok)
    return comments


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _literal(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _literal(f.default_factory())
    return "required"


def _literal(value) -> str:
    """A value as it is written in the YAML."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    if isinstance(value, tuple):
        value = list(value)
    return str(value)


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("typing.", "").replace("|", "or").replace("  ", " ")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(cls, prefix: str, choices: dict[str, tuple]) -> list[str]:
    comments = field_comments(cls)
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            continue
        key = f"{prefix}{f.name}"
        meaning = comments.get(f.name, "")
        allowed = choices.get(key) or choices.get(f.name)
        if allowed:
            meaning = (meaning + ". " if meaning else "") + "One of: " + ", ".join(
                "null" if a is None else f"`{a}`" for a in allowed)
        rows.append(f"| `{key}` | {_cell(_type_name(f))} | `{_cell(_default(f))}` | {_cell(meaning)} |")
    return rows


def _presets() -> list[str]:
    rows = ["| `loss.preset` | fields it sets |", "| --- | --- |"]
    for name, fields in PRESETS.items():
        text = ", ".join(f"`{k}: {_literal(v)}`" for k, v in fields.items()) or "none: the defaults (Lp-Reg)"
        rows.append(f"| `{name}` | {text} |")
    return rows


# Every section of the run configuration, found from Config itself so a new section cannot be left out.
_SECTIONS = {cls.__name__: cls for cls in typing.get_type_hints(config_module.Config).values()
             if dataclasses.is_dataclass(cls)}


def reference() -> str:
    """The whole of docs/configuration.md."""
    top = config_module.Config
    lines = [_INTRO, "## Top level", ""]
    lines += _table(top, "", config_module._CHOICES)
    hints = typing.get_type_hints(top)
    for f in dataclasses.fields(top):
        section = hints[f.name]
        if not dataclasses.is_dataclass(section):  # run_dir: in the top-level table
            continue
        lines += ["", f"## `{f.name}`", ""]
        if issubclass(section, LpRegConfig):
            lines += ["The policy loss (`LpRegConfig`, docs/lp_reg.md). `loss.preset: NAME` starts from a baseline's "
                      "fields (table below); the section's other keys apply on top.", ""]
            lines += _table(section, "loss.", {**loss_config_module._CHOICES, "preset": tuple(PRESETS)})
            lines += ["", *_presets()]
        else:
            lines += _table(section, f"{f.name}.", config_module._CHOICES)
    return "\n".join(lines) + "\n"


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    print(reference(), end="")
    return 0
