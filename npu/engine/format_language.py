"""What a format admits, as a language of byte strings that the decoder walks byte by byte.

A language answers, for any prefix of an answer (UTF-8 bytes): can it still become an
admitted answer (`viable`), is it one already (`complete`), which bytes may come next (a
superset, `next_bytes`), how few bytes finish it (`shortest_completion`), what JSON value
an answer stands for (`value`) and which answers stand for the same value (`same_value`).

- `FiniteLanguage`: a fixed set of strings, each with its value: a boolean's yes/no words
  (npu.engine.yes_no), an enum's options, JSON `true`/`false` and quoted options inside
  an object.
- `NumberLanguage`: `-?(0|[1-9][0-9]*)` and, for numbers, `(\\.[0-9]{1,6})?` within
  [minimum, maximum], checked exactly (fractions, not floats); no leading zeros, no
  exponent, no negative zero.
- `ObjectLanguage`: `{"k1": v1, "k2": v2}` with the keys in order and exactly this spacing.

`compile_language(schema, question)` builds one from a normalised format (see
protocol/formats.py for the subset). Pure: knows nothing of tokens or the engine.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from math import ceil
from typing import Any

from npu.engine.yes_no import boolean_words

MAX_FRACTION_DIGITS = 6
NUMBER_BYTES = b"-0123456789."
_MAX_MEMO = 10_000  # prefixes whose viability a number language remembers


class FiniteLanguage:
    """A fixed set of answers (bytes -> value)."""

    def __init__(self, answers: dict[bytes, Any]) -> None:
        if not answers or b"" in answers:
            raise ValueError("a finite language needs at least one non-empty answer")
        self.answers = dict(answers)
        self._next: dict[bytes, set[int]] = {}
        for answer in self.answers:
            for end in range(len(answer)):
                self._next.setdefault(answer[:end], set()).add(answer[end])
        self._shortest: dict[bytes, bytes] = {}

    def viable(self, prefix: bytes) -> bool:
        return prefix in self._next or prefix in self.answers

    def complete(self, prefix: bytes) -> bool:
        return prefix in self.answers

    def next_bytes(self, prefix: bytes) -> set[int]:
        return self._next.get(prefix, set())

    def shortest_completion(self, prefix: bytes) -> bytes | None:
        if prefix not in self._shortest:
            tails = [a[len(prefix):] for a in self.answers if a.startswith(prefix)]
            self._shortest[prefix] = min(tails, key=lambda t: (len(t), t)) if tails else None
        return self._shortest[prefix]

    def value(self, answer: bytes) -> Any:
        return self.answers[answer]

    def same_value(self, answer: bytes) -> list[bytes]:
        wanted = self.answers[answer]
        return [a for a, v in self.answers.items() if v == wanted and type(v) is type(wanted)]

    def prefix_free_end(self, text: bytes) -> int | None:
        """Inside an object: the length of the answer `text` starts with (answers are
        prefix-free there: quoted strings, true/false), else None."""
        for answer in self.answers:
            if text.startswith(answer):
                return len(answer)
        return None


_PARTIAL_RE = re.compile(rb"-?(?:(0|[1-9][0-9]*)(\.([0-9]*))?)?")


class NumberLanguage:
    """Integers (`fraction_digits` 0) or decimals within [minimum, maximum]."""

    def __init__(self, minimum: int | float, maximum: int | float, fraction_digits: int = 0) -> None:
        self.low, self.high = _exact(minimum), _exact(maximum)
        if self.low > self.high:
            raise ValueError(f"minimum {minimum} is greater than maximum {maximum}")
        self.fraction_digits = fraction_digits
        self.integer = fraction_digits == 0
        self._max_digits = len(str(int(max(abs(self.low), abs(self.high))))) + 1
        self._viable: dict[bytes, bool] = {}

    # -- the sets of values a prefix can still become --------------------------------------

    def _parse(self, prefix: bytes) -> tuple[bool, str, str | None] | None:
        """(negative, integer digits, fraction digits or None) of a well-formed prefix."""
        match = _PARTIAL_RE.fullmatch(prefix)
        if match is None:
            return None
        digits, point, fraction = match.group(1), match.group(2), match.group(3)
        if point is not None and (self.integer or len(fraction) > self.fraction_digits):
            return None
        return prefix.startswith(b"-"), (digits or b"").decode(), None if point is None else fraction.decode()

    def _magnitude_range(self, negative: bool) -> tuple[Fraction, Fraction] | None:
        """The magnitudes allowed for this sign (closed), None when the sign is impossible."""
        if negative:
            low, high = max(-self.high, Fraction(0)), -self.low
        else:
            low, high = max(self.low, Fraction(0)), self.high
        return (low, high) if low <= high else None

    def _fits(self, negative: bool, start: Fraction, end: Fraction, step: Fraction) -> Fraction | None:
        """The smallest magnitude on the grid start + k*step within [start, end) that is
        allowed (zero is not, with a minus sign); None when there is none."""
        allowed = self._magnitude_range(negative)
        if allowed is None:
            return None
        low = max(start, allowed[0])
        if negative and low == 0:
            low = step if start == 0 else low
        first = start + ceil((low - start) / step) * step
        return first if first < end and first <= allowed[1] else None

    def _completions(self, prefix: bytes, first_only: bool = False) -> list[tuple[int, Fraction]] | None:
        """(bytes to add, a reachable magnitude) per way of finishing `prefix` (only the
        first found with `first_only`); None when the prefix is malformed."""
        parsed = self._parse(prefix)
        if parsed is None:
            return None
        negative, digits, fraction = parsed
        out = []
        if not digits:  # "" or "-": a first digit comes ("" may also take the sign)
            for lead in ("0123456789" if prefix else ("-", *"0123456789")):
                for added, magnitude in self._completions(prefix + lead.encode(), first_only) or ():
                    out.append((added + 1, magnitude))
                    if first_only:
                        return out
            return out
        point_steps = range(0, self.fraction_digits + 1)
        if fraction is None:
            extra_digits = range(0, self._max_digits + 1) if digits != "0" else range(0, 1)
            for extra in extra_digits:
                base = int(digits) * 10**extra
                for decimals in point_steps:  # 0: no point; else "." and that many digits
                    step = Fraction(1, 10**decimals)
                    found = self._fits(negative, Fraction(base), Fraction(base + 10**extra), step)
                    if found is not None:
                        out.append((extra + (decimals + 1 if decimals else 0), found))
                        break
                if out and first_only:
                    return out
            return out
        known = Fraction(int(digits)) + (Fraction(int(fraction), 10**len(fraction)) if fraction else 0)
        for decimals in range(max(len(fraction), 1), self.fraction_digits + 1):
            found = self._fits(negative, known, known + Fraction(1, 10**len(fraction)), Fraction(1, 10**decimals))
            if found is not None:
                out.append((decimals - len(fraction), found))
                break
        return out

    # -- the language interface -------------------------------------------------------------

    def viable(self, prefix: bytes) -> bool:
        known = self._viable.get(prefix)
        if known is None:
            if len(self._viable) >= _MAX_MEMO:
                self._viable.clear()
            known = self._viable[prefix] = bool(self._completions(prefix, first_only=True))
        return known

    def complete(self, prefix: bytes) -> bool:
        parsed = self._parse(prefix)
        if parsed is None or not parsed[1] or parsed[2] == "":
            return False
        value = _exact(self.value(prefix))
        return self.low <= value <= self.high and not (parsed[0] and value == 0)

    def next_bytes(self, prefix: bytes) -> bytes:
        return NUMBER_BYTES

    def shortest_completion(self, prefix: bytes) -> bytes | None:
        if self.complete(prefix):
            return b""
        best = None
        for byte in NUMBER_BYTES:
            candidate = prefix + bytes([byte])
            ways = self._completions(candidate)
            if ways:
                added = 1 + min(n for n, _ in ways)
                if best is None or added < best[0]:
                    best = (added, candidate)
        if best is None:
            return None
        return best[1][len(prefix):] + self.shortest_completion(best[1])

    def value(self, answer: bytes) -> int | float:
        text = answer.decode()
        return int(text) if self.integer or "." not in text else float(text)

    def same_value(self, answer: bytes) -> list[bytes]:
        return [answer]

    def number_end(self, text: bytes) -> int:
        """Inside an object: how many leading bytes of `text` are number characters."""
        end = 0
        while end < len(text) and text[end] in NUMBER_BYTES:
            end += 1
        return end


class ObjectLanguage:
    """`{"k1": v1, "k2": v2}`: literal pieces and value languages, in order."""

    def __init__(self, properties: dict[str, FiniteLanguage | NumberLanguage]) -> None:
        self.parts: list[bytes | FiniteLanguage | NumberLanguage] = []
        for index, (key, language) in enumerate(properties.items()):
            lead = b"{" if index == 0 else b", "
            self.parts += [lead + json.dumps(key, ensure_ascii=False).encode() + b": ", language]
        self.parts.append(b"}")
        self.keys = list(properties)

    def _walk(self, prefix: bytes) -> tuple[int, bytes] | None:
        """(index of the part `prefix` ends in, the bytes of it written so far); None when
        the prefix cannot start an answer. Index len(parts) = the answer is complete."""
        position = 0
        for index, part in enumerate(self.parts):
            rest = prefix[position:]
            if isinstance(part, bytes):
                if rest.startswith(part):
                    position += len(part)
                    continue
                return (index, rest) if part.startswith(rest) else None
            if isinstance(part, NumberLanguage):
                end = part.number_end(rest)
                if end == len(rest):
                    return (index, rest) if part.viable(rest) else None
                if not part.complete(rest[:end]):
                    return None
                position += end
                continue
            end = part.prefix_free_end(rest)
            if end is None:
                return (index, rest) if part.viable(rest) else None
            position += end
        return (len(self.parts), b"") if position == len(prefix) else None

    def viable(self, prefix: bytes) -> bool:
        return self._walk(prefix) is not None

    def complete(self, prefix: bytes) -> bool:
        return self._walk(prefix) == (len(self.parts), b"")

    def next_bytes(self, prefix: bytes) -> set[int] | bytes:
        walked = self._walk(prefix)
        if walked is None or walked[0] == len(self.parts):
            return set()
        index, written = walked
        part = self.parts[index]
        if isinstance(part, bytes):
            return {part[len(written)]}
        following = self.parts[index + 1]
        if part.complete(written) and isinstance(part, NumberLanguage):
            return set(part.next_bytes(written)) | {following[0]}
        return set(part.next_bytes(written))

    def shortest_completion(self, prefix: bytes) -> bytes | None:
        walked = self._walk(prefix)
        if walked is None:
            return None
        index, written = walked
        tail = b""
        for position in range(index, len(self.parts)):
            part = self.parts[position]
            done = written if position == index else b""
            if isinstance(part, bytes):
                tail += part[len(done):]
            else:
                piece = part.shortest_completion(done)
                if piece is None:
                    return None
                tail += piece
        return tail

    def value(self, answer: bytes) -> dict[str, Any]:
        return json.loads(answer.decode())

    def same_value(self, answer: bytes) -> list[bytes]:
        return [answer]


Language = FiniteLanguage | NumberLanguage | ObjectLanguage


def compile_language(schema: dict[str, Any], question: str = "") -> Language:
    """The language of a normalised format; a boolean's words follow `question`'s language."""
    if "enum" in schema:
        return FiniteLanguage({option.encode(): option for option in schema["enum"]})
    kind = schema.get("type")
    if kind == "boolean":
        return FiniteLanguage({word.encode(): value for word, value in boolean_words(question).items()})
    if kind in ("integer", "number"):
        return _number(schema)
    if kind == "object":
        return ObjectLanguage({key: _property(sub) for key, sub in schema["properties"].items()})
    raise ValueError(f"unsupported format {schema!r}")


def _number(schema: dict[str, Any]) -> NumberLanguage:
    digits = 0 if schema["type"] == "integer" else MAX_FRACTION_DIGITS
    return NumberLanguage(schema["minimum"], schema["maximum"], digits)


def _property(schema: dict[str, Any]) -> FiniteLanguage | NumberLanguage:
    """A property's language inside an object: JSON literals, not words."""
    if "enum" in schema:
        return FiniteLanguage({json.dumps(option, ensure_ascii=False).encode(): option for option in schema["enum"]})
    if schema.get("type") == "boolean":
        return FiniteLanguage({b"true": True, b"false": False})
    if schema.get("type") in ("integer", "number"):
        return _number(schema)
    raise ValueError(f"unsupported property format {schema!r} (objects hold booleans, numbers and enums)")


def _exact(value: int | float | Fraction) -> Fraction:
    """A bound as an exact fraction: 0.1 means one tenth, not the float nearest to it."""
    return value if isinstance(value, Fraction) else Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
