"""npu/engine/format_language.py and yes_no.py: what each format admits, checked against brute force."""

from __future__ import annotations

import itertools
import json
import re
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from npu.engine.format_language import FiniteLanguage, NumberLanguage, compile_language
from npu.engine.yes_no import boolean_words, question_language

ALPHABET = b"-0123456789."


def brute_force_numbers(low: int | float, high: int | float, fraction_digits: int, max_len: int) -> set[bytes]:
    """Every string of at most `max_len` bytes the number grammar and range admit."""
    pattern = re.compile(rb"-?(0|[1-9][0-9]*)" + (rb"(\.[0-9]{1,%d})?" % fraction_digits if fraction_digits else b""))
    found = set()
    for length in range(1, max_len + 1):
        for chars in itertools.product(ALPHABET, repeat=length):
            text = bytes(chars)
            if pattern.fullmatch(text):
                value = Fraction(text.decode())
                if Fraction(repr(low)) <= value <= Fraction(repr(high)) and not (text.startswith(b"-") and value == 0):
                    found.add(text)
    return found


def test_brute_force_admits_what_json_writes():
    assert brute_force_numbers(-12, 3, 0, 3) == {str(i).encode() for i in range(-12, 4)}


@given(low=st.integers(-120, 120), span=st.integers(0, 150))
@settings(max_examples=25, deadline=None)
def test_integer_language_matches_brute_force(low, span):
    high = low + span
    language = NumberLanguage(low, high, 0)
    admitted = {str(i).encode() for i in range(low, high + 1)}
    prefixes = {a[:n] for a in admitted for n in range(len(a) + 1)}
    for length in range(0, 4):
        for chars in itertools.product(ALPHABET, repeat=length):
            prefix = bytes(chars)
            assert language.viable(prefix) == (prefix in prefixes), prefix
            assert language.complete(prefix) == (prefix in admitted), prefix
            if prefix in prefixes:
                tail = language.shortest_completion(prefix)
                assert prefix + tail in admitted
                assert len(tail) == min(len(a) - len(prefix) for a in admitted if a.startswith(prefix))


@given(low=st.sampled_from([-2.5, -1, -0.3, 0, 0.1, 1.5]), span=st.sampled_from([0, 0.2, 1, 2.35, 7]))
@settings(max_examples=8, deadline=None)
def test_number_language_matches_brute_force(low, span):
    high = float(Fraction(repr(low)) + Fraction(repr(span)))
    language = NumberLanguage(low, high, 1)
    admitted = brute_force_numbers(low, high, 1, 4)
    prefixes = {a[:n] for a in admitted for n in range(len(a) + 1)}
    for length in range(0, 5):
        for chars in itertools.product(ALPHABET, repeat=length):
            prefix = bytes(chars)
            assert language.viable(prefix) == (prefix in prefixes), (prefix, low, high)
            assert language.complete(prefix) == (prefix in admitted), (prefix, low, high)


def test_number_bounds_are_exact_decimals_and_values_are_json_numbers():
    language = NumberLanguage(0.1, 0.3, 6)
    assert language.complete(b"0.1") and language.complete(b"0.3") and not language.complete(b"0.300001")
    assert language.value(b"0.25") == 0.25 and language.value(b"0.2") == 0.2
    integers = NumberLanguage(-5, 5, 0)
    assert integers.value(b"-5") == -5 and not integers.viable(b"-0") and not integers.viable(b"1.")
    assert NumberLanguage(123456789, 999999999, 0).shortest_completion(b"") == b"123456789"


def test_object_language_admits_exactly_the_json_objects_in_key_order():
    language = compile_language({"type": "object", "properties": {
        "door": {"type": "boolean"}, "people": {"type": "integer", "minimum": 0, "maximum": 12},
        "colour": {"enum": ["red", "dark \"red\""]}}})
    answer = b'{"door": false, "people": 12, "colour": "dark \\"red\\""}'
    assert language.complete(answer)
    assert language.value(answer) == {"door": False, "people": 12, "colour": 'dark "red"'}
    assert list(language.value(answer)) == ["door", "people", "colour"]
    for cut in range(len(answer)):
        assert language.viable(answer[:cut]) and not language.complete(answer[:cut])
        assert language.complete(answer[:cut] + language.shortest_completion(answer[:cut]))
    for wrong in (b'{"people"', b'{"door": true, "people": 13', b'{"door": yes', b'{"door": true}',
                  b'{"door": true, "people": 1, "colour": "blue"}', b'{"door":true'):
        assert not language.viable(wrong), wrong
    assert json.loads(b'{"door": true, "people": 0, "colour": "red"}')  # the spacing is JSON's own


def test_enum_and_boolean_languages_know_which_answers_mean_the_same():
    enum = compile_language({"enum": ["red", "reddish"]})
    assert isinstance(enum, FiniteLanguage)
    assert enum.complete(b"red") and enum.viable(b"redd") and enum.same_value(b"red") == [b"red"]
    boolean = compile_language({"type": "boolean"}, "Is there a cat?")
    assert boolean.value(b"Yes") is True and boolean.value(b"NO") is False
    assert sorted(boolean.same_value(b"yes")) == [b"YES", b"Yes", b"yes"]


def test_boolean_words_follow_the_question_language():
    assert question_language("Is there a circle?") == "en"
    assert question_language("Gibt es einen Kreis im Bild?") == "de"
    assert question_language("Est-ce qu'il y a un cercle ?") == "fr"
    assert question_language("¿Hay un círculo en la imagen?") == "es"
    assert question_language("图中有圆吗？") == "zh"
    assert question_language("円はありますか？") == "ja"
    assert question_language("Есть ли круг?") == "ru"
    german = boolean_words("Gibt es einen Kreis im Bild?")
    assert german["Ja"] is True and german["nein"] is False and german["yes"] is True  # English always
    assert boolean_words("图中有圆吗？")["没有"] is False
