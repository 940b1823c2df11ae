"""Typed answers: the instruction a requested answer format adds to the question.

A request may ask for an answer of a JSON-Schema subset (boolean, bounded integer or
number, enum of strings, a flat object of those) or of any other JSON Schema
(`{"json_schema": ...}`, protocol/formats.py). Decoding is constrained to that format;
the model is also told what is wanted, by one fixed sentence appended to the question
after a space, so a model (the demo model included, which is trained on exactly the flat
subset's sentences) answers in the form the constraint admits. The engine's own
`json_schema` option (an OpenAI client's response_format) adds no sentence: such clients
say in their prompt what they want.
"""

from __future__ import annotations

from typing import Any

BOOLEAN_HINT = "Answer yes or no."
NUMBER_HINT = "Answer with a number."


JSON_HINT = "Answer in JSON."


def format_hint(schema: dict[str, Any]) -> str:
    """The sentence appended to a question asked with `schema` (an already validated format)."""
    if "json_schema" in schema:
        properties = schema["json_schema"].get("properties")
        if schema["json_schema"].get("type") == "object" and isinstance(properties, dict) and properties:
            return "Answer in JSON with the keys: " + ", ".join(properties) + "."
        return JSON_HINT
    if "enum" in schema:
        return "Answer with one of: " + ", ".join(str(option) for option in schema["enum"]) + "."
    kind = schema.get("type")
    if kind == "boolean":
        return BOOLEAN_HINT
    if kind in ("integer", "number"):
        return NUMBER_HINT
    if kind == "object":
        return "Answer in JSON with the keys: " + ", ".join(schema.get("properties", {})) + "."
    raise ValueError(f"no hint for format {schema!r}")


def with_hint(question: str, schema: dict[str, Any]) -> str:
    """`question` as the model is asked it under `schema`: the question, a space, the hint."""
    return question.rstrip() + " " + format_hint(schema)
