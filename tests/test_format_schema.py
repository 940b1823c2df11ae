"""protocol/formats.py: the JSON-Schema subset a typed answer may ask for, and every refusal."""

from __future__ import annotations

import pytest

from protocol.formats import (MAX_SAFE_INTEGER, MAX_SCHEMA_CHARS, MAX_SCHEMA_DEPTH, FormatError, format_kind,
                              parse_flat_format, parse_format)


@pytest.mark.parametrize("schema, normalised", [
    ({"type": "boolean"}, {"type": "boolean"}),
    ({"type": "boolean", "title": "Door", "description": "is it open"}, {"type": "boolean"}),
    ({"type": "integer", "minimum": 0, "maximum": 9}, {"type": "integer", "minimum": 0, "maximum": 9}),
    ({"type": "integer", "minimum": 1.0}, {"type": "integer", "minimum": 1, "maximum": MAX_SAFE_INTEGER}),
    ({"type": "number", "maximum": 2.5}, {"type": "number", "minimum": -1e15, "maximum": 2.5}),
    ({"enum": ["red", "green"]}, {"enum": ["red", "green"]}),
    ({"type": "string", "enum": ["a b", "ä"]}, {"enum": ["a b", "ä"]}),
    ({"type": "object", "properties": {"door": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0}},
      "required": ["door"], "additionalProperties": False},
     {"type": "object", "properties": {"door": {"type": "boolean"},
                                       "n": {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INTEGER}},
      "required": ["door", "n"]}),
])
def test_supported_formats_are_normalised(schema, normalised):
    assert parse_format(schema) == normalised
    assert format_kind(normalised) in ("boolean", "integer", "number", "enum", "object")


@pytest.mark.parametrize("schema, message", [
    ({"type": 3}, "type: must be a string"),
    ({}, 'needs "type"'),
    ("boolean", "must be a JSON object (a schema), got a string"),
    ({"enum": []}, "enum: must list at least one option"),
    ({"enum": "red"}, "enum: must be a list of strings"),
    ({"enum": ["red", 3]}, "enum[1]: an option must be a string, got a number"),
    ({"enum": ["red", "red"]}, "enum: 'red' is listed twice"),
    ({"enum": ["", "x"]}, "enum[0]: an option must not be empty"),
    ({"enum": ["a\nb"]}, "enum[0]: an option must not hold control characters"),
    ({"enum": ["x" * 65]}, "enum[0]: an option is 65 characters, at most 64"),
    ({"enum": [str(i) for i in range(65)]}, "enum: 65 options, at most 64"),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum: 5 is greater than maximum 3"),
    ({"type": "number", "minimum": 2.5, "maximum": 2.4}, "minimum: 2.5 is greater than maximum 2.4"),
    ({"type": "integer", "minimum": 0.5}, "minimum: an integer format needs whole bounds"),
    ({"type": "integer", "maximum": True}, "maximum: must be a number, got a boolean"),
    ({"type": "integer", "maximum": 2**60}, "maximum: 1152921504606846976 is beyond"),
    ({"type": "number", "maximum": 1e300}, "maximum: 1e+300 is beyond"),
    ({"type": "object", "properties": None}, "properties: an object format needs properties"),
    ({"type": "object", "properties": {}}, "properties: must name at least one property"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 1}}},
     "properties.a.minimum: 3 is greater than maximum 1"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "properties.a.enum: must list at least one option"),
    ({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["b"]},
     "required: 'b' is not one of the properties"),
    ({"type": "boolean", "title": 5}, "title: must be a string"),
])
def test_bad_formats_are_refused_naming_the_keyword(schema, message):
    with pytest.raises(FormatError) as refused:
        parse_format(schema)
    assert message in str(refused.value)


# What the flat subset used to refuse is now a general JSON Schema: kept as given, the engine compiles it.
GENERAL = [
    {"type": "string"},
    {"type": "string", "minLength": 3, "maxLength": 20, "pattern": "^[a-z]+$"},
    {"type": "integer", "exclusiveMinimum": 0},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "boolean"}}}}},
    {"type": "object", "properties": {"a": {"type": "boolean"}}, "additionalProperties": True},
    {"type": ["string", "null"]},
    {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    {"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/p"}}},
    {"type": "object", "properties": {f"k{i}": {"type": "number"} for i in range(17)}},
]


@pytest.mark.parametrize("schema", GENERAL)
def test_other_json_schemas_are_kept_for_the_engine(schema):
    assert parse_format(schema) == {"json_schema": schema}
    assert format_kind(parse_format(schema)) == "json"
    with pytest.raises(FormatError, match="a watch's format is boolean"):
        parse_flat_format(schema)


def _nested(depth):
    schema = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("schema, message", [
    ({"type": ["string", "text"]}, "type: 'text' is not a JSON Schema type"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "properties.a.type: 'date' is not a JSON Schema type"),
    ({"type": "string", "description": "x" * MAX_SCHEMA_CHARS}, f"at most {MAX_SCHEMA_CHARS}"),
    (_nested(MAX_SCHEMA_DEPTH), f"nested more than {MAX_SCHEMA_DEPTH} levels deep"),
    ({"type": "number", "maximum": float("inf"), "minLength": 1}, "must be plain JSON"),
])
def test_general_schemas_are_checked_for_shape_and_size(schema, message):
    with pytest.raises(FormatError) as refused:
        parse_format(schema)
    assert message in str(refused.value)


def test_the_flat_subset_keeps_its_refusals_for_its_own_shapes():
    with pytest.raises(FormatError, match="minimum: 5 is greater than maximum 3"):
        parse_format({"type": "integer", "minimum": 5, "maximum": 3})
    assert parse_flat_format({"type": "boolean"}) == {"type": "boolean"}
