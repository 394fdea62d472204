"""String normalisation of final math answers.

Two answers whose normalised forms are equal are graded correct without any symbolic work.
The rules follow the usual competition-math conventions (MATH / DAPO style graders): strip
dollar signs, ``\\text{}`` wrappers, ``\\left``/``\\right``, spacing macros, units and degree
marks, a leading ``x =``, thousands separators, and canonicalise simple fractions and decimals.

All regexes below are linear (no nested quantifiers); inputs are additionally capped by the
caller (answers longer than ``max_answer_chars`` are never normalised).
"""

from __future__ import annotations

import re

from .extract import find_last_boxed

__all__ = ["normalize_answer"]

_SPACING_MACROS = ("\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad")
_DROP_MACROS = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|biggl|biggr|bigg|Bigg|displaystyle)(?![a-zA-Z])")
_DFRAC = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_LEQ = re.compile(r"\\leq(?![a-zA-Z])")
_GEQ = re.compile(r"\\geq(?![a-zA-Z])")
_NEQ = re.compile(r"\\neq(?![a-zA-Z])")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\circ(?![a-zA-Z])|°")
_TEXT_MACROS = ("\\text", "\\textbf", "\\textit", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname")
_UNIT_WORDS = (
    "units?|degrees?|deg|cm|mm|km|m|meters?|metres?|centimeters?|inches|inch|in|feet|foot|ft|"
    "yards?|miles?|mph|seconds?|sec|s|minutes?|min|hours?|hrs?|days?|weeks?|years?|"
    "dollars?|cents?|pounds?|lbs?|kg|g|grams?|liters?|litres?|ml|cm\\^2|m\\^2|sq\\s*units?|"
    "square\\s*(?:units?|feet|meters?|inches|centimeters?)|cubic\\s*(?:units?|feet|meters?|inches|centimeters?)|"
    "ways|people|students|points?|marbles|apples|coins"
)
_NUMBER_WITH_UNIT = re.compile(r"(-?[0-9.,/]*[0-9])\s*(?:" + _UNIT_WORDS + r")\.?", re.IGNORECASE)
_LEADING_ASSIGN = re.compile(r"([a-zA-Z]|\\[a-zA-Z]+)(?:_\{?[a-zA-Z0-9]+\}?)?=")
_SQRT_SHORT = re.compile(r"\\sqrt([0-9a-zA-Z])")
_FRAC_TWO_DIGITS = re.compile(r"\\frac([0-9a-zA-Z])([0-9a-zA-Z])")
_FRAC_FIRST_SHORT = re.compile(r"\\frac([0-9a-zA-Z])(?=\{)")
_FRAC_SECOND_SHORT = re.compile(r"\\frac(\{[^{}]*\})([0-9a-zA-Z])")
_LEADING_DOT = re.compile(r"(?<![0-9])\.([0-9])")
_THOUSANDS = re.compile(r"-?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")
_PLAIN_FRACTION = re.compile(r"(-?)([0-9]+)/([0-9]+)")
_FRAC_NEG = re.compile(r"\\frac\{-([0-9]+)\}\{([0-9]+)\}")
_DECIMAL = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?")
_WORDS = re.compile(r"[A-Za-z ]+")


def _unwrap_macros(s: str, macros: tuple[str, ...]) -> str:
    """Replace every ``\\macro{content}`` by ``content`` (brace-matched, escapes respected)."""
    for macro in macros:
        start = 0
        while True:
            pos = s.find(macro + "{", start)
            if pos < 0:
                break
            open_pos = pos + len(macro)
            depth, i, close = 0, open_pos, -1
            while i < len(s):
                ch = s[i]
                if ch == "\\":
                    i += 2
                    continue
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        close = i
                        break
                i += 1
            if close < 0:  # unbalanced: drop just the macro name
                s = s[:pos] + s[open_pos:]
                start = pos
                continue
            s = s[:pos] + s[open_pos + 1 : close] + s[close + 1 :]
            start = pos
    return s


def _canonical_decimal(s: str) -> str | None:
    """'+007.50' -> '7.5', '-0.0' -> '0', '3.' -> '3'; None if ``s`` is not a plain decimal."""
    m = _DECIMAL.fullmatch(s)
    if m is None or not (m.group(2) or m.group(3)):
        return None
    sign, int_part, frac_part = m.group(1), m.group(2).lstrip("0") or "0", (m.group(3) or "").rstrip("0")
    out = int_part + ("." + frac_part if frac_part else "")
    if sign == "-" and out != "0":
        out = "-" + out
    return out


def normalize_answer(answer: str) -> str:
    """Canonical string form of a final answer (see module docstring)."""
    if not isinstance(answer, str):
        return ""
    s = answer.strip()
    if "\\boxed" in s or "\\fbox" in s:
        inner, _ = find_last_boxed(s, None)
        if inner is not None:
            s = inner.strip()

    s = s.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    s = s.replace("\\$", "").replace("$", "")
    for macro in _SPACING_MACROS:
        s = s.replace(macro, " ")
    s = s.replace("\\ ", " ").replace("~", " ")
    s = s.replace("\\left.", "").replace("\\right.", "")
    s = _DROP_MACROS.sub("", s)
    s = _DFRAC.sub(r"\\frac", s)
    s = _LEQ.sub(r"\\le", s)
    s = _GEQ.sub(r"\\ge", s)
    s = _NEQ.sub(r"\\ne", s)
    s = s.replace("\\varnothing", "\\emptyset")
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _unwrap_macros(s, _TEXT_MACROS)
    s = s.strip()

    # Units after a number: "5 cm", "12 dollars", "3 sq units".
    m = _NUMBER_WITH_UNIT.fullmatch(s)
    if m is not None:
        s = m.group(1)

    s = "".join(s.split())  # drop all whitespace

    # "x=3", "k = 5", "\theta=30" -> right-hand side (only for a single '=' and a simple name).
    if s.count("=") == 1:
        m = _LEADING_ASSIGN.match(s)
        if m is not None and m.end() < len(s):
            s = s[m.end() :]

    while s.endswith(".") and not s.endswith("\\ldots.") and len(s) > 1:
        s = s[:-1]
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = _FRAC_TWO_DIGITS.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_FIRST_SHORT.sub(r"\\frac{\1}", s)
    s = _FRAC_SECOND_SHORT.sub(r"\\frac\1{\2}", s)
    s = _LEADING_DOT.sub(r"0.\1", s)

    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")

    m = _PLAIN_FRACTION.fullmatch(s)
    if m is not None:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    m = _FRAC_NEG.fullmatch(s)
    if m is not None:
        s = f"-\\frac{{{m.group(1)}}}{{{m.group(2)}}}"

    dec = _canonical_decimal(s)
    if dec is not None:
        s = dec
    elif _WORDS.fullmatch(s):
        s = s.lower()
    return s
