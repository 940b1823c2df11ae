"""What a format admits, as an llguidance grammar, and what an admitted answer stands for.

Two kinds of format reach the engine:

- the flat subset, normalised by protocol/formats.py (`{"type": "boolean"}`, bounded
  `integer` / `number`, `{"enum": [...]}`, a flat `object` of those). Its answers keep
  their documented form: a boolean is a yes/no word of the question's language
  (npu.engine.yes_no), an enum is the bare option, a number is bare JSON (a `number` has
  at most MAX_FRACTION_DIGITS digits after the point, no exponent), an object is
  `{"k1": v1, "k2": v2}` with every property in the order given and exactly that spacing;
- any other JSON Schema (`{"json_schema": schema}` from protocol/formats.py, or the
  engine's `json_schema` option): the answer is JSON that validates against it, written
  with the same fixed separators (`", "`, `": "`) and no other whitespace: a small model
  left free wanders in whitespace. For the same reason its numbers are written with at
  most MAX_FRACTION_DIGITS digits after the point and, unless the schema bounds them,
  within +-MAX_NUMBER (`bounded_numbers`): a small model left free writes "0.3333..."
  until the token budget ends it, and the answer would not parse. Every answer still
  validates against the schema as given.

`answer_grammar(...)` returns an `AnswerGrammar`: the grammar text llguidance compiles
(a Lark grammar for the words and options, JSON Schema for everything else) and how to
read an answer: `value(text)` (the JSON value it stands for) and `same_value(text)`
(every answer standing for the same value: "Yes" and "yes" are one answer).

Pure: knows nothing of tokens, tokenizers or the engine; llguidance is only asked to
turn a schema or a Lark text into its grammar string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance

from npu.engine.yes_no import boolean_words

MAX_FRACTION_DIGITS = 6  # a flat `number` answer's digits after the point (protocol/formats.py says the same)
MAX_NUMBER = 1e15  # an unbounded number's bounds in a general schema (the flat subset's default too)
ITEM_SEPARATOR = ", "
KEY_SEPARATOR = ": "
# llguidance's JSON options: fixed separators, no free whitespace anywhere.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR, "key_separator": KEY_SEPARATOR}


@dataclass(frozen=True)
class AnswerGrammar:
    """A format's grammar (`grammar`: llguidance's serialised form) and its answers' meaning."""

    grammar: str
    kind: str  # "boolean", "integer", "number", "enum", "object" (the flat subset) or "json"
    words: tuple[tuple[str, bool], ...] = ()  # a boolean's words and their values

    def value(self, text: str) -> Any:
        """The JSON value of a complete answer."""
        if self.kind == "boolean":
            return dict(self.words)[text]
        if self.kind == "enum":
            return text
        return json.loads(text)

    def same_value(self, text: str) -> list[str]:
        """Every answer that stands for the same value as `text` (itself included)."""
        if self.kind == "boolean":
            wanted = dict(self.words)[text]
            return [word for word, value in self.words if value == wanted]
        return [text]


def answer_grammar(normalised: dict[str, Any] | None = None, question: str = "",
                   json_schema: dict[str, Any] | None = None) -> AnswerGrammar:
    """The grammar of a normalised format (protocol/formats.py), or of any JSON Schema.
    A boolean's words follow `question`'s language. Raises ValueError for a format that
    is neither (a bug upstream: formats are validated where requests enter)."""
    if json_schema is not None:
        return AnswerGrammar(_json(json_schema), "json")
    if normalised is None:
        raise ValueError("no format")
    if "json_schema" in normalised:
        return AnswerGrammar(_json(normalised["json_schema"]), "json")
    if "enum" in normalised:
        return AnswerGrammar(_lark_choice(normalised["enum"]), "enum")
    kind = normalised.get("type")
    if kind == "boolean":
        words = tuple(boolean_words(question).items())
        return AnswerGrammar(_lark_choice([word for word, _ in words]), "boolean", words)
    if kind in ("integer", "number"):
        return AnswerGrammar(_json(_number(normalised)), kind)
    if kind == "object":
        properties = {key: _property(sub) for key, sub in normalised["properties"].items()}
        schema = {"type": "object", "properties": properties, "required": list(properties),
                  "additionalProperties": False}
        return AnswerGrammar(_json(schema), "object")
    raise ValueError(f"unsupported format {normalised!r}")


def _json(schema: dict[str, Any]) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(bounded_numbers(schema), overrides=JSON_OPTIONS)


def bounded_numbers(node: Any) -> Any:
    """A copy of a JSON Schema whose numbers are written in finitely many digits: every schema
    admitting `number` gets `multipleOf` 10^-MAX_FRACTION_DIGITS unless it has one, and every
    `number` or `integer` without a bound gets +-MAX_NUMBER. Property names are never read as
    keywords (`properties`' values are schemas, walked as such)."""
    if isinstance(node, list):
        return [bounded_numbers(item) for item in node]
    if not isinstance(node, dict):
        return node
    copy = {key: bounded_numbers(value) for key, value in node.items()}
    kinds = node.get("type")
    kinds = {kinds} if isinstance(kinds, str) else set(kinds) if isinstance(kinds, list) else set()
    if "number" in kinds and "multipleOf" not in node:
        copy["multipleOf"] = 10.0 ** -MAX_FRACTION_DIGITS
    if kinds & {"number", "integer"}:
        if "maximum" not in node and "exclusiveMaximum" not in node:
            copy["maximum"] = MAX_NUMBER
        if "minimum" not in node and "exclusiveMinimum" not in node:
            copy["minimum"] = -MAX_NUMBER
    return copy


def _lark_choice(options: list[str]) -> str:
    """A grammar admitting exactly these strings, bare (JSON string escapes are Lark's too)."""
    alternatives = " | ".join(json.dumps(option, ensure_ascii=False) for option in options)
    return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")


def _number(schema: dict[str, Any]) -> dict[str, Any]:
    bounded = {"type": schema["type"], "minimum": schema["minimum"], "maximum": schema["maximum"]}
    if schema["type"] == "number":
        # llguidance writes a bounded number without an exponent; multipleOf 10^-6 caps the
        # digits after the point at six, as the flat subset has always said.
        bounded["multipleOf"] = 10.0 ** -MAX_FRACTION_DIGITS
    return bounded


def _property(schema: dict[str, Any]) -> dict[str, Any]:
    """A property inside a flat object: JSON literals (true/false, quoted options), not words."""
    if "enum" in schema:
        return {"enum": list(schema["enum"])}
    if schema.get("type") == "boolean":
        return {"type": "boolean"}
    if schema.get("type") in ("integer", "number"):
        return _number(schema)
    raise ValueError(f"unsupported property format {schema!r} (objects hold booleans, numbers and enums)")
