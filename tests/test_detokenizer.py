"""IncrementalDetokenizer: deltas never split a character and concatenate to `decode`."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npu.text.detokenizer import IncrementalDetokenizer
from npu.text.tokenizer import Tokenizer

FIXTURE_SETTINGS = settings(max_examples=150, deadline=None,
                            suppress_health_check=[HealthCheck.function_scoped_fixture])
REPLACEMENT = "\ufffd"
MULTIBYTE_TEXT = "中文字符测试 😀👍🏽🇫🇷 ünïcödé ∑∫ 𝄞 ありがとう"


def stream(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    """Push every id; the per-push deltas and the flushed tail."""
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(i) for i in ids], detok.flush()


def byte_token_ids(tokenizer: Tokenizer, data: bytes) -> list[int]:
    """One single-byte token per byte (what a byte-level BPE falls back to)."""
    by_byte = {tokenizer.token_bytes(i): i for i in range(512)}  # the 256 byte tokens come first
    missing = [b for b in data if bytes([b]) not in by_byte]
    assert not missing, f"no single-byte token for {missing}"
    return [by_byte[bytes([b])] for b in data]


def test_emoji_split_into_bytes_waits_for_its_last_byte(internvl2_tokenizer):
    ids = byte_token_ids(internvl2_tokenizer, "a😀".encode())
    deltas, tail = stream(internvl2_tokenizer, ids)
    assert deltas == ["a", "", "", "", "😀"]
    assert tail == ""


def test_truncated_character_flushes_as_replacement(internvl2_tokenizer):
    ids = byte_token_ids(internvl2_tokenizer, "x中".encode()[:-1])
    deltas, tail = stream(internvl2_tokenizer, ids)
    assert deltas == ["x", "", ""]
    assert tail == REPLACEMENT == internvl2_tokenizer.decode(ids)[1:]


def test_detokenizer_is_reusable_after_flush(internvl2_tokenizer):
    detok = IncrementalDetokenizer(internvl2_tokenizer)
    ids = internvl2_tokenizer.encode("first")
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "first"
    ids = internvl2_tokenizer.encode("second")
    assert detok.push_many(ids) + detok.flush() == "second"


def test_special_tokens_stream_as_text(internvl2_tokenizer):
    ids = internvl2_tokenizer.encode("<ref>cat</ref><box>[[1, 2, 3, 4]]</box>")
    deltas, tail = stream(internvl2_tokenizer, ids)
    assert "".join(deltas) + tail == "<ref>cat</ref><box>[[1, 2, 3, 4]]</box>"
    assert deltas[0] == "<ref>"


@FIXTURE_SETTINGS
@given(text=st.text(alphabet=st.sampled_from(MULTIBYTE_TEXT), max_size=30), data=st.data())
def test_valid_text_streams_without_replacement_chars(internvl2_tokenizer, text, data):
    """Real text cut into arbitrary byte tokens: no delta holds a broken character."""
    # Each character as the BPE encodes it alone, or as one token per byte.
    ids = []
    for ch in text:
        as_bytes = data.draw(st.booleans())
        ids += byte_token_ids(internvl2_tokenizer, ch.encode()) if as_bytes else internvl2_tokenizer.encode(ch)
    deltas, tail = stream(internvl2_tokenizer, ids)
    assert not any(REPLACEMENT in d for d in deltas)
    assert "".join(deltas) + tail == text


def _random_ids(tokenizer: Tokenizer):
    multibyte = tokenizer.encode(MULTIBYTE_TEXT)
    specials = list(tokenizer.added_tokens)
    return st.lists(st.one_of(
        st.integers(0, 255),                               # single bytes, often invalid alone
        st.sampled_from(multibyte),                        # CJK / emoji pieces
        st.integers(0, tokenizer.vocab_size - 1),          # anything
        st.sampled_from(specials),
        st.integers(tokenizer.vocab_size, tokenizer.vocab_size + 100),  # beyond the vocab
        st.sampled_from([-1, 2**32, 10**12]),                           # not ids at all
    ), max_size=40)


@FIXTURE_SETTINGS
@given(data=st.data())
def test_deltas_concatenate_to_decode_bytelevel(internvl2_tokenizer, data):
    ids = data.draw(_random_ids(internvl2_tokenizer))
    deltas, tail = stream(internvl2_tokenizer, ids)
    assert "".join(deltas) + tail == internvl2_tokenizer.decode(ids)


@FIXTURE_SETTINGS
@given(data=st.data())
def test_deltas_concatenate_to_decode_wordlevel(demo_tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, demo_tokenizer.vocab_size - 1), max_size=30))
    deltas, tail = stream(demo_tokenizer, ids)
    assert "".join(deltas) + tail == demo_tokenizer.decode(ids)


@FIXTURE_SETTINGS
@given(data=st.data())
def test_deltas_concatenate_to_decode_byte_fallback(byte_fallback_tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, byte_fallback_tokenizer.vocab_size - 1), max_size=30))
    deltas, tail = stream(byte_fallback_tokenizer, ids)
    assert "".join(deltas) + tail == byte_fallback_tokenizer.decode(ids)


def test_byte_fallback_waits_for_whole_characters(byte_fallback_tokenizer):
    ids = byte_fallback_tokenizer.encode("ab 😀中")
    deltas, tail = stream(byte_fallback_tokenizer, ids)
    assert not any(REPLACEMENT in d for d in deltas)
    assert "".join(deltas) + tail == "ab 😀中"


def test_wordlevel_deltas_carry_the_joining_spaces(demo_tokenizer):
    ids = demo_tokenizer.encode("the cat is on the mat .")
    deltas, tail = stream(demo_tokenizer, ids)
    assert deltas[:3] == ["the", " cat", " is"]
    assert "".join(deltas) + tail == demo_tokenizer.decode(ids)


def test_bytelevel_push_never_decodes_history(internvl2_tokenizer, monkeypatch):
    detok = IncrementalDetokenizer(internvl2_tokenizer)
    monkeypatch.setattr(internvl2_tokenizer, "decode",
                        lambda ids: pytest.fail("byte-level push must not re-decode"))
    ids = internvl2_tokenizer.encode(MULTIBYTE_TEXT * 20)
    assert detok.push_many(ids) + detok.flush() == MULTIBYTE_TEXT * 20


@pytest.mark.parametrize("which", ["demo_tokenizer", "byte_fallback_tokenizer"])
def test_window_mode_decodes_a_bounded_window(request, which, monkeypatch):
    tokenizer = request.getfixturevalue(which)
    detok = IncrementalDetokenizer(tokenizer)
    real_decode = tokenizer.decode
    sizes = []

    def counting_decode(ids):
        sizes.append(len(ids))
        return real_decode(ids)

    monkeypatch.setattr(tokenizer, "decode", counting_decode)
    ids = tokenizer.encode("the cat is on the mat . " * 200 if which == "demo_tokenizer"
                           else "ab 你é😀 " * 200)
    text = detok.push_many(ids) + detok.flush()
    assert text == real_decode(ids)
    assert len(ids) > 1000 and max(sizes) <= 8


def test_odd_added_tokens_stream_like_decode(internvl2_tokenizer_dir):
    """The ByteLevel decoder maps a token through the byte alphabet only when every
    character is in it (`Ġ` -> space) and keeps any other token whole; non-special added
    tokens skip the decoder. Streaming must render each exactly as `decode` does."""
    from tokenizers import AddedToken

    tokenizer = Tokenizer.from_dir(internvl2_tokenizer_dir)  # a private copy to extend
    tokenizer._backend.add_tokens([AddedToken("Ġplain 中", special=False)])
    tokenizer._backend.add_special_tokens([AddedToken("<ĠspecialĠ 中>", special=True),
                                           AddedToken("<ĠmappedĠ>", special=True)])
    tokenizer = Tokenizer(tokenizer._backend)
    extra = [tokenizer.token_id(t) for t in ("Ġplain 中", "<ĠspecialĠ 中>", "<ĠmappedĠ>")]
    hello = tokenizer.encode("Hello 😀")
    for ids in ([extra[0], *hello, extra[1]], [*hello[:-1], extra[2], hello[-1], extra[0]]):
        deltas, tail = stream(tokenizer, ids)
        assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert tokenizer.decode(extra) == "Ġplain 中<ĠspecialĠ 中>< mapped >"
