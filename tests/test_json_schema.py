"""Any JSON Schema as structured output, on the real Qwen2 vocabulary: Frigate's review
schema (built as Frigate builds it, from a pydantic model) and a nested one compile and
every answer validates whatever the logits; json_object; a keyword the engine cannot
compile is refused naming it; the cost per answer token is one token mask, however long
the answer (issue 21: the 16-number object)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npu.engine import Engine, GenerationOptions, Prompt
from npu.engine.constrain import FormatError
from protocol.formats import parse_format
from tests.schemas import ReviewMetadata, frigate_review_schema, nested_schema
from tests.test_engine import F32, FakePost, make_model, run, tokenizer_and_template  # noqa: F401

NESTED = nested_schema()  # $defs/$ref, arrays, anyOf, nullable, pattern, additionalProperties false
FRIGATE = frigate_review_schema([])
FRIGATE_WITH_CONCERNS = frigate_review_schema(["a person at the gate"])


def test_frigate_schema_is_what_its_model_says():
    assert FRIGATE["required"] == ["observations", "scene", "title", "shortSummary", "confidence",
                                   "potential_threat_level"]
    assert FRIGATE["properties"]["observations"]["items"] == {"maxLength": 200, "minLength": 20, "type": "string"}
    assert "$defs" in NESTED and "anyOf" in json.dumps(NESTED)
    for schema in (FRIGATE, FRIGATE_WITH_CONCERNS, NESTED):
        jsonschema.Draft202012Validator.check_schema(schema)
        assert parse_format(schema) == {"json_schema": schema}  # MQTT's format takes it as it is


@given(seed=st.integers(0, 10_000), which=st.sampled_from(["frigate", "concerns", "nested", "object"]),
       temperature=st.sampled_from([0.0, 1.0]))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_answers_validate_against_the_schema_whatever_the_logits(make_model, tokenizer_and_template, seed, which,
                                                                   temperature):
    tokenizer, _ = tokenizer_and_template
    schema = {"frigate": FRIGATE, "concerns": FRIGATE_WITH_CONCERNS, "nested": NESTED, "object": {"type": "object"}}
    schema = schema[which]
    model = make_model(capacity=1300, post=FakePost(tokenizer.vocab_size, F32, seed=seed))
    _, done = run(Engine(model), Prompt("Describe the review."), max_tokens=1200, json_schema=schema,
                  temperature=temperature, seed=seed)
    if done.finish_reason == "length":  # random logits may fill an unbounded list or dict until the budget ends
        assert "value" not in done.extra and which in ("nested", "object", "concerns")  # unbounded lists, dicts
        return
    assert done.finish_reason == "stop", done
    value = json.loads(done.text)
    jsonschema.validate(value, schema)
    assert done.extra["value"] == value and 0.0 <= done.extra["confidence"] <= 1.0
    if which == "frigate":
        ReviewMetadata.model_validate(value)
    # the fixed separators and no other whitespace outside strings
    outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', done.text).replace(", ", ",").replace(": ", ":")
    assert not re.search(r"\s", outside), done.text


def test_the_json_schema_option_adds_no_hint(make_model):
    engine = Engine(make_model())
    plain = engine.count_prompt_tokens(Prompt("Describe it."))
    _, done = run(engine, Prompt("Describe it."), json_schema={"type": "object"}, max_tokens=40)
    assert done.prompt_tokens == plain


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "object", "properties": {"x": {"not": {"type": "string"}}}}, '"not"'),
    ({"type": "object", "properties": {"x": {"$ref": "https://example.com/a.json"}}}, "https://example.com/a.json"),
    ({"type": "string", "pattern": "a(b"}, "unclosed group"),
])
def test_a_schema_the_engine_cannot_compile_is_refused_naming_the_keyword(make_model, schema, keyword):
    model = make_model()
    with pytest.raises(FormatError) as refused:
        run(Engine(model), Prompt("Describe it."), json_schema=schema)
    assert refused.value.code == "bad_request" and keyword in refused.value.message
    assert model.post.calls == 0 and not model.layers[0].calls  # refused before any graph call
    with pytest.raises(FormatError, match="^format: "):
        run(Engine(model), Prompt("Describe it."), format=parse_format(schema))


def sixteen_numbers(count: int) -> dict:
    return parse_format({"type": "object", "properties": {f"p{i}": {"type": "number"} for i in range(count)}})


@pytest.mark.parametrize("count", [4, 16])
def test_each_answer_token_costs_one_token_mask_however_long_the_answer(make_model, tokenizer_and_template, count):
    """Issue 21 item 4: the hand-written languages recomputed a shortest completion for every
    remaining property and candidate token, so the cost per token grew with the answer."""
    tokenizer, _ = tokenizer_and_template
    model = make_model(capacity=600, post=FakePost(tokenizer.vocab_size, F32, seed=5))
    _, done = run(Engine(model), Prompt("Measure."), max_tokens=500, format=sixteen_numbers(count))
    assert done.finish_reason == "stop" and len(done.extra["value"]) == count
    # one mask per answer state: the start, and one after each token (the last one shows only the end)
    assert done.timings["format_masks"] == done.completion_tokens + 1


def test_json_schema_and_format_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        GenerationOptions(format={"type": "boolean"}, json_schema={"type": "object"})
