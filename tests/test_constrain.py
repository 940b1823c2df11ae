"""Typed answers in the engine: llguidance's token masks against brute force over the real
Qwen2 vocabulary, answers that always parse whatever the logits, the token budget, top-k
post builds, confidence, a cost per token that does not grow with the answer, and no more
graph calls than free-text decoding."""

from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npu.engine import Engine, GenerationOptions, Prompt
from npu.engine.constrain import FormatCache, FormatError, FormatTooLong
from npu.engine.grammars import answer_grammar
from npu.engine.yes_no import boolean_words
from npu.session import check_feed
from protocol.formats import parse_format
from tests.test_engine import (F32, HIDDEN, FakePost, FakeTopkPost, image, make_model, run, spec,  # noqa: F401
                               tokenizer_and_template)

BOOLEAN = parse_format({"type": "boolean"})
COUNT = parse_format({"type": "integer", "minimum": 0, "maximum": 12})
COLOUR = parse_format({"enum": ["red", "green", "blue", "yellow", "white"]})
DOOR = parse_format({"type": "object", "properties": {"open": {"type": "boolean"}, "people": COUNT, "colour": COLOUR},
                     "required": ["open"]})
LEVEL = parse_format({"type": "number", "minimum": -2.5, "maximum": 40})
FORMATS = [BOOLEAN, COUNT, COLOUR, DOOR, LEVEL]
QUESTION = "Is there a circle?"


def every_answer(schema: dict) -> set[bytes]:
    """Every answer a finite flat format admits, written as documented (protocol/formats.py)."""
    if schema.get("type") == "boolean":
        return {word.encode() for word in boolean_words(QUESTION)}
    if "enum" in schema:
        return {option.encode() for option in schema["enum"]}
    if schema.get("type") == "integer":
        return {str(i).encode() for i in range(schema["minimum"], schema["maximum"] + 1)}
    literal = {"boolean": [b"true", b"false"]}
    values = []
    for sub in schema["properties"].values():
        values.append(literal["boolean"] if sub.get("type") == "boolean" else
                      [json.dumps(o).encode() for o in sub["enum"]] if "enum" in sub else sorted(every_answer(sub)))
    keys = list(schema["properties"])
    return {b"{" + b", ".join(json.dumps(k).encode() + b": " + v for k, v in zip(keys, combo)) + b"}"
            for combo in itertools.product(*values)}


def brute_force_allowed(tokenizer, answers: set[bytes], prefix: bytes, stop_ids) -> set[int]:
    special = set(tokenizer.added_tokens)
    prefixes = {a[:n] for a in answers for n in range(len(prefix) + 1, len(a) + 1)}
    allowed = {token_id for token_id in range(tokenizer.vocab_size) if token_id not in special
               and prefix + tokenizer.token_bytes(token_id) in prefixes}
    return allowed | (set(stop_ids) if prefix in answers else set())


@pytest.mark.parametrize("schema, prefix", [
    (BOOLEAN, b""), (BOOLEAN, b"Y"), (COUNT, b""), (COUNT, b"1"), (COLOUR, b"gr"), (DOOR, b'{"open": true, "pe'),
    (DOOR, b'{"open": false, "people": 1'),
])
def test_the_mask_is_exactly_the_tokens_the_format_admits(tokenizer_and_template, schema, prefix):
    tokenizer, template = tokenizer_and_template
    compiled = FormatCache(tokenizer, sorted(template.stop_ids)).compile(schema, QUESTION)
    answer = compiled.start.deep_copy()
    assert answer.consume_tokens(tokenizer.encode(prefix.decode())), answer.get_error()
    from npu.engine.constrain import Masker

    allowed = set(Masker(compiled.vocab).allowed(answer).tolist())
    admitted = brute_force_allowed(tokenizer, every_answer(schema), prefix, template.stop_ids)
    # Where the rest is forced (a key, an option's tail) llguidance offers its canonical
    # spelling only; elsewhere every spelling. Never a token outside the format, and every
    # next byte an answer may take stays reachable.
    assert allowed <= admitted
    next_bytes = {a[len(prefix)] for a in every_answer(schema) if a.startswith(prefix) and len(a) > len(prefix)}
    assert {tokenizer.token_bytes(i)[0] for i in allowed if i not in template.stop_ids} == next_bytes
    assert (set(template.stop_ids) <= allowed) == (prefix in every_answer(schema))


def test_the_hand_written_trie_and_languages_are_gone():
    assert importlib.util.find_spec("npu.engine.format_language") is None
    import npu.engine.constrain as constrain

    assert not hasattr(constrain, "VocabularyIndex") and not hasattr(constrain, "CompiledFormat") or \
        not hasattr(constrain.CompiledFormat, "transitions")


def check_answer(schema: dict, done) -> None:
    """The final's value is the text parsed, and within the format."""
    assert done.finish_reason == "stop" and "value" in done.extra, done
    value, text = done.extra["value"], done.text
    if schema.get("type") == "boolean":
        assert isinstance(value, bool) and text.lower() in ("yes", "no") and value == (text.lower() == "yes")
    elif "enum" in schema:
        assert text == value and value in schema["enum"]
    elif schema["type"] == "object":
        assert json.loads(text) == value and list(value) == list(schema["properties"])
        for key, sub in schema["properties"].items():
            check_answer(sub, _Done(json.dumps(value[key]) if "enum" not in sub else value[key], value[key], sub))
    else:
        assert json.loads(text) == value and schema["minimum"] <= value <= schema["maximum"]
        assert isinstance(value, int) or schema["type"] == "number"
    assert 0.0 <= done.extra["confidence"] <= 1.0


class _Done:
    """A property of an object answer, checked like a top-level answer."""

    def __init__(self, text, value, schema):
        words = {True: "yes", False: "no"}
        self.text = words[value] if schema.get("type") == "boolean" else text
        self.finish_reason, self.extra = "stop", {"value": value, "confidence": 1.0}


@given(seed=st.integers(0, 10_000), which=st.integers(0, len(FORMATS) - 1), temperature=st.sampled_from([0.0, 1.5]))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_typed_answers_always_parse_whatever_the_logits(make_model, tokenizer_and_template, seed, which, temperature):
    tokenizer, _ = tokenizer_and_template
    model = make_model(post=FakePost(tokenizer.vocab_size, F32, seed=seed))
    schema = FORMATS[which]
    _, done = run(Engine(model), Prompt("How is the door?"), max_tokens=64, format=schema, temperature=temperature,
                  seed=seed)
    check_answer(schema, done)


def test_the_question_is_asked_with_the_format_hint(make_model):
    engine = Engine(make_model())
    plain = engine.count_prompt_tokens(Prompt("Is there a circle?"))
    _, done = run(engine, Prompt("Is there a circle?"), format=BOOLEAN)
    hint = len(engine.model.tokenizer.encode(" Answer yes or no.", parse_special=False))
    assert done.prompt_tokens == plain + hint


def test_a_tight_budget_still_ends_in_an_answer(make_model, tokenizer_and_template):
    tokenizer, template = tokenizer_and_template
    # the tightest budget: the shortest answer the engine knows (its witness, 17-19 tokens)
    tight = len(FormatCache(tokenizer, sorted(template.stop_ids)).compile(DOOR, "How is it?").witness)
    assert tight <= 20
    for seed in range(8):
        _, done = run(Engine(make_model(post=FakePost(tokenizer.vocab_size, F32, seed=seed))), Prompt("How is it?"),
                      max_tokens=tight, format=DOOR)
        check_answer(DOOR, done)
        assert done.completion_tokens <= tight
    three_digits = {"type": "integer", "minimum": 100, "maximum": 999}
    three_digits = parse_format(three_digits)
    _, done = run(Engine(make_model()), Prompt("How many?"), max_tokens=3, format=three_digits)
    assert done.completion_tokens == 3 and 100 <= done.extra["value"] <= 999
    with pytest.raises(FormatTooLong, match="takes 3 tokens but only 2 are left"):
        run(Engine(make_model()), Prompt("How many?"), max_tokens=2, format=three_digits)


@pytest.mark.parametrize("schema", FORMATS)
def test_a_typed_answer_costs_no_more_graph_calls_than_the_same_answer_decoded_freely(make_model, tokenizer_and_template,
                                                                                     schema):
    tokenizer, template = tokenizer_and_template
    typed_model = make_model(post=FakePost(tokenizer.vocab_size, F32, seed=3))
    typed_ids, typed = run(Engine(typed_model), Prompt("What is it?"), max_tokens=64, format=schema)
    check_answer(schema, typed)
    # The same answer decoded without a format: the same tokens forced, then the stop token.
    stop = min(template.stop_ids)
    forced = {call: token for call, token in enumerate([*typed_ids, stop])}
    free_model = make_model(post=FakePost(tokenizer.vocab_size, F32, seed=3, forced=forced))
    hinted = Prompt("What is it? " + _hint(schema))
    free_ids, free = run(Engine(free_model), hinted, max_tokens=64)
    assert free_ids == typed_ids and free.text == typed.text
    assert typed_model.post.calls <= free_model.post.calls
    assert len(typed_model.layers[0].calls) <= len(free_model.layers[0].calls)
    assert typed_model.post.calls + typed.timings["format_forced_tokens"] <= free_model.post.calls


def _hint(schema):
    from npu.engine.formats import format_hint

    return format_hint(schema)


class ScriptedPost:
    """Logits chosen per token id (everything else far below), the same at every call."""

    def __init__(self, vocab, scores: dict[int, float]):
        self.name, self.num_groups, self.calls = "post", 1, 0
        self.logits = np.full(vocab, -40.0, np.float32)
        for token_id, score in scores.items():
            self.logits[token_id] = score

    def inputs(self, group=0):
        return [spec("input", (1, 1, HIDDEN), F32)]

    def outputs(self, group=0):
        return [spec("output", (1, 1, len(self.logits)), F32)]

    def run(self, feed, group=0):
        check_feed(self, feed, 0)
        self.calls += 1
        return [self.logits.reshape(1, 1, -1).copy()]


def test_confidence_is_the_mass_of_the_chosen_value_among_the_allowed_answers(make_model, tokenizer_and_template):
    tokenizer, _ = tokenizer_and_template
    ids = {word: tokenizer.encode(word) for word in ("yes", "Yes", "no", "No")}
    assert all(len(v) == 1 for v in ids.values())
    scores = {ids["yes"][0]: 2.0, ids["Yes"][0]: 1.0, ids["no"][0]: 1.5, ids["No"][0]: -1.0}
    model = make_model(post=ScriptedPost(tokenizer.vocab_size, scores))
    _, done = run(Engine(model), Prompt("Is there a circle?"), format=BOOLEAN)
    assert done.text == "yes" and done.extra["value"] is True
    # every other allowed token (y, ye, Y, YES, n, N, NO, ...) sits at -40: negligible
    expected = (np.exp(2.0) + np.exp(1.0)) / (np.exp(2.0) + np.exp(1.0) + np.exp(1.5) + np.exp(-1.0))
    assert done.extra["confidence"] == pytest.approx(expected, abs=1e-5)
    assert model.post.calls == 1  # "yes" is complete and nothing longer is allowed: no second call


def test_boolean_answers_may_use_the_question_language(make_model, tokenizer_and_template):
    tokenizer, _ = tokenizer_and_template
    ja = tokenizer.encode("Ja")
    model = make_model(post=ScriptedPost(tokenizer.vocab_size, {ja[0]: 5.0}))
    _, done = run(Engine(model), Prompt("Gibt es einen Kreis im Bild?"), format=BOOLEAN)
    assert done.text == "Ja" and done.extra["value"] is True
    _, english = run(Engine(make_model(post=ScriptedPost(tokenizer.vocab_size, {ja[0]: 5.0}))),
                     Prompt("Is there a circle?"), format=BOOLEAN)
    assert english.text != "Ja" and isinstance(english.extra["value"], bool)


def test_top_k_post_builds_choose_among_the_allowed_top_k(make_model, tokenizer_and_template):
    tokenizer, _ = tokenizer_and_template
    for seed in range(6):
        model = make_model(post=FakeTopkPost(tokenizer.vocab_size, F32, k=40, seed=seed))
        _, done = run(Engine(model), Prompt("What colour?"), format=COLOUR)
        check_answer(COLOUR, done)
    # k=1: the single candidate is (almost surely) no colour: the answer is completed anyway, and says so
    model = make_model(post=FakeTopkPost(tokenizer.vocab_size, F32, k=1, seed=0))
    _, done = run(Engine(model), Prompt("What colour?"), format=COLOUR)
    check_answer(COLOUR, done)
    assert done.extra["value"] in COLOUR["enum"]
    assert any("none of the post graph's top-k tokens was allowed" in note for note in done.extra["notes"])
    assert done.extra["confidence"] == 0.0


def test_cancelled_typed_answers_have_no_value(make_model):
    engine = Engine(make_model())
    calls = iter(range(100))
    events = list(engine.generate(Prompt("How is it?"), _options(DOOR), should_stop=lambda: next(calls) > 6))
    assert events[-1].finish_reason == "cancelled" and "value" not in events[-1].extra


def _options(schema):
    from npu.engine import GenerationOptions

    return GenerationOptions(max_tokens=64, format=schema)


def test_every_word_of_a_value_counts_for_it():
    grammar = answer_grammar(BOOLEAN, "Is there a dog?")
    assert set(grammar.same_value("No")) == {"no", "No", "NO"} and grammar.value("NO") is False
