"""Extract the final answer -- the last ``\\boxed{...}`` -- from a model response.

Everything here is a linear scan: ``str.rfind`` to locate the last box marker and
one pass over the characters after it to match braces.  No backtracking regexes
touch the (untrusted, possibly megabytes long) response.
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_MAX_ANSWER_CHARS", "find_last_boxed", "last_boxed"]

#: Longest boxed answer that is graded at all; a longer one is treated as no answer (reward 0).
DEFAULT_MAX_ANSWER_CHARS = 1000

_MARKERS = ("\\boxed", "\\fbox")
# Only these three characters matter for brace matching; finditer jumps between them.
_BRACE_TOKENS = re.compile(r"[{}\\]")

# Statuses returned by find_last_boxed.
OK = "ok"
NO_BOX = "no_box"
TOO_LONG = "too_long"
UNCLOSED = "unclosed"


def _last_marker(text: str) -> tuple[int, int]:
    """Position and length of the last ``\\boxed``/``\\fbox`` not followed by a letter, or (-1, 0)."""
    best, best_len = -1, 0
    for marker in _MARKERS:
        end = len(text)
        while True:
            pos = text.rfind(marker, 0, end)
            if pos < 0:
                break
            after = pos + len(marker)
            # "\boxedfoo" is a different macro; keep looking further left (total work stays linear
            # because every rfind only scans the part left of the previous hit).
            if after < len(text) and text[after].isalpha():
                end = pos
                continue
            if pos > best:
                best, best_len = pos, len(marker)
            break
    return best, best_len


def _match_group(text: str, open_pos: int, limit: int | None) -> tuple[str | None, str]:
    """Content of the brace group opening at ``text[open_pos] == '{'``.

    Backslash-escaped characters (``\\{``, ``\\}``, ``\\\\``) do not count as group delimiters.
    At most ``limit`` content characters are scanned.
    """
    stop = len(text) if limit is None else min(len(text), open_pos + 2 + limit)
    depth = 0
    skip_until = -1
    for m in _BRACE_TOKENS.finditer(text, open_pos, stop):
        i = m.start()
        if i < skip_until:
            continue
        ch = text[i]
        if ch == "\\":
            skip_until = i + 2
        elif ch == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i], OK
    if stop < len(text):
        return None, TOO_LONG
    return None, UNCLOSED


def find_last_boxed(text: str, max_chars: int | None = DEFAULT_MAX_ANSWER_CHARS) -> tuple[str | None, str]:
    """Like :func:`last_boxed`, but also say why nothing was found.

    Returns ``(content, status)`` with status one of ``"ok"``, ``"no_box"`` (no marker at all),
    ``"too_long"`` (content longer than ``max_chars``) or ``"unclosed"`` (the last box is never
    closed, e.g. a truncated generation, or is followed by nothing usable).
    """
    if not isinstance(text, str):
        return None, NO_BOX
    pos, length = _last_marker(text)
    if pos < 0:
        return None, NO_BOX
    i = pos + length
    n = len(text)
    j = i
    while j < n and text[j] in " \t":
        j += 1
    if j < n and text[j] == "{":
        return _match_group(text, j, max_chars)
    if j > i and j < n:
        # "\boxed 42$" -- braceless form: the answer runs to the next '$' or newline.
        stop = n if max_chars is None else min(n, j + max_chars + 1)
        k = j
        while k < stop and text[k] not in "$\n":
            k += 1
        if k == stop and stop < n:
            return None, TOO_LONG
        content = text[j:k].strip()
        return (content, OK) if content else (None, UNCLOSED)
    return None, UNCLOSED


def last_boxed(text: str, max_chars: int | None = DEFAULT_MAX_ANSWER_CHARS) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\boxed ...`` / ``\\fbox{...}`` in ``text``.

    Nested braces are matched properly.  Returns ``None`` if there is no box, if the last box is
    never closed, or if its content is longer than ``max_chars`` (``None`` = no cap).
    """
    return find_last_boxed(text, max_chars)[0]
