"""Text that is safe to print on a terminal.

Run names, config values, trial ids, paths and error messages quoting them come from the user (or
from a shared config or run store) and can hold escape sequences: ``"\\x1b]0;...\\x07"`` retitles
the terminal, ``"\\x1b[2J"`` clears it, ``"\\x1b[31m"`` recolours everything after it. Every string
the CLI prints goes through :func:`safe`, which replaces control characters with a visible escape:
C0 (except newline and tab, which :func:`safe` keeps unless ``oneline``), DEL, C1 (U+0080..U+009F,
e.g. the 8-bit CSI U+009B) as ``\\xNN``, and the bidirectional overrides and isolates (U+202A..U+202E,
U+2066..U+2069, which reorder what is shown) as ``\\uNNNN``.
"""

from __future__ import annotations

import json
import re
from typing import Any

_CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[{_CONTROL}]")
_UNSAFE_ONELINE = re.compile(f"[{_CONTROL}\t\n]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def safe(value: object, *, oneline: bool = False) -> str:
    """``str(value)`` with control characters shown as ``\\xNN`` (``\\uNNNN`` for bidi controls).

    Newline and tab are kept, unless ``oneline`` (a table cell, a single-line field)."""
    return (_UNSAFE_ONELINE if oneline else _UNSAFE).sub(_escape, str(value))


def safe_json(obj: Any, *, indent: int | None = 2) -> str:
    """Strict JSON that is also safe on a terminal: ``ensure_ascii`` escapes every control character
    as ``\\uNNNN`` except DEL, escaped here (still valid JSON, unlike :func:`safe`'s ``\\x7f``)."""
    return json.dumps(obj, indent=indent, ensure_ascii=True).replace("\x7f", "\\u007f")
