"""The two TOML jobs tomllib leaves out: where a key is written, and writing a config.

`toml_key_lines(text)` maps key paths to 1-based line numbers so config errors can point
at a line; `dump_toml(data)` writes the nested dict of an effective config (str, int,
float, bool, None as "") back as TOML that tomllib reads to the same values.
"""

from __future__ import annotations

import json
import re
from typing import Any

Key = tuple[str, ...]

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_ASSIGN = re.compile(rf"^\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*=")
_KEY_PART = re.compile(_KEY)
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key_lines(text: str) -> dict[Key, int]:
    """Map each table header and key assignment to its 1-based line (first wins).

    A line scanner, not a parser: good enough to point at the line of an error in a
    file tomllib has already accepted.
    """
    lines: dict[Key, int] = {}
    table: Key = ()
    in_multiline = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        if header := _HEADER.match(line):
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
        elif assign := _ASSIGN.match(line):
            lines.setdefault((*table, *_split_key(assign.group(1))), number)
            rest = line[assign.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_multiline = quote
    return lines


def line_for(key: Key, lines: dict[Key, int]) -> int | None:
    """The line of `key`, else of its nearest enclosing key (inline tables)."""
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            return lines[key[:n]]
    return None


def dump_toml(data: dict[str, Any]) -> str:
    """Nested dict of scalars (and lists of them, and tables inside lists, written inline)
    -> TOML text: each table's scalars, then its sub-tables."""
    out: list[str] = []
    _dump_table(data, (), out)
    return "\n".join(out).strip() + "\n"


def _dump_table(data: dict[str, Any], prefix: Key, out: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        out.append(f"\n[{'.'.join(_quote_key(p) for p in prefix)}]")
    for name, value in scalars.items():
        out.append(f"{_quote_key(name)} = {_scalar(value)}")
    for name, value in tables.items():
        _dump_table(value, (*prefix, name), out)


def _quote_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _string(name)  # match() lets "0\n" pass ($ before a newline)


def _scalar(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):  # e.g. [[watches]] entries, written as inline tables
        return "[" + ", ".join(_scalar(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_quote_key(k)} = {_scalar(v)}" for k, v in value.items()) + " }"
    return _string(str(value))


def _string(text: str) -> str:
    # JSON string escapes are valid TOML (but \uD800-style surrogate pairs are not, hence
    # ensure_ascii=False); DEL is a control character TOML wants escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _split_key(dotted: str) -> Key:
    return tuple(part.strip("\"'") for part in _KEY_PART.findall(dotted))
