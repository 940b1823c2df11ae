"""Typed answers: the sentence a format adds to the question (the demo model is trained on it)."""

from __future__ import annotations

import pytest

from npu.engine.formats import format_hint, with_hint


@pytest.mark.parametrize("schema, hint", [
    ({"type": "boolean"}, "Answer yes or no."),
    ({"type": "integer", "minimum": 0, "maximum": 9}, "Answer with a number."),
    ({"type": "number"}, "Answer with a number."),
    ({"enum": ["red", "green", "blue"]}, "Answer with one of: red, green, blue."),
    ({"type": "object", "properties": {"door": {"type": "boolean"}, "people": {"type": "integer"}}},
     "Answer in JSON with the keys: door, people."),
    ({"json_schema": {"type": "object", "properties": {"scene": {"type": "string"}}, "required": ["scene"]}},
     "Answer in JSON with the keys: scene."),
    ({"json_schema": {"type": "array", "items": {"type": "integer"}}}, "Answer in JSON."),
])
def test_each_format_has_its_fixed_hint(schema, hint):
    assert format_hint(schema) == hint
    assert with_hint("Is there a circle?  ", schema) == "Is there a circle? " + hint


def test_an_unknown_format_has_no_hint():
    with pytest.raises(ValueError, match="no hint"):
        format_hint({"type": "string"})
