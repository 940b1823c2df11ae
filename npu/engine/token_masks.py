"""Token masks: a tokenizer as llguidance reads it, and one matcher's masks and witnesses.

`Vocabulary` (one per tokenizer and process, `vocabulary(...)`) gives llguidance the
tokenizer (every id's bytes, the special ids, the stop ids) and keeps what `Masker.finish`
prefers when it writes a witness. `Masker.allowed(matcher)` computes one token mask into
a preallocated buffer and returns the allowed ids; `finish` walks a copy of the matcher
to an accepting state. Knows nothing of formats, graphs or the engine loop.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np

from npu.engine.prompt import RequestError

STRUCTURE_BYTES = frozenset(b'"\\[]{},:')  # what a plain token (a word, digits, a literal) holds none of
# One vocabulary per tokenizer and process: llguidance reads ~150k tokens in a second or two.
_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_VOCABULARIES_LOCK = threading.Lock()


class FormatError(RequestError):
    """A format the engine cannot decode to (the message says why, naming the keyword)."""

    code = "bad_request"


class _TokenSource:
    """What llguidance's TokenizerWrapper reads: every id's bytes, the specials, an encoder."""

    def __init__(self, tokenizer: Any, pieces: list[bytes], stop_ids: Sequence[int]) -> None:
        self.tokens = pieces
        self.eos_token_id = min(stop_ids) if stop_ids else None
        self.bos_token_id = None
        self.special_token_ids = sorted(tokenizer.added_tokens)
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, parse_special=False)


class Vocabulary:
    """A tokenizer as llguidance sees it, with each token's bytes (`pieces`) and what
    `Masker.finish` prefers: byte lengths, single-byte tokens, plain and comma tokens."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int]) -> None:
        special = set(tokenizer.added_tokens)
        byte_level = getattr(tokenizer, "is_byte_level", False)
        self.pieces: list[bytes] = []
        for token_id in range(tokenizer.vocab_size):
            if token_id in special:
                self.pieces.append(tokenizer.added_tokens[token_id].encode("utf-8"))
            else:
                self.pieces.append(tokenizer.token_bytes(token_id) if byte_level
                                   else tokenizer.decode([token_id]).encode("utf-8"))
        self.size = len(self.pieces)
        self.stop_ids = sorted(stop_ids)
        wrapper = llguidance.TokenizerWrapper(_TokenSource(tokenizer, self.pieces, self.stop_ids))
        self.llg = llguidance.LLTokenizer(wrapper, n_vocab=self.size, eos_token=self.stop_ids)
        ordinary = [(i, p) for i, p in enumerate(self.pieces) if i not in special and p]
        self.lengths = np.zeros(self.size, np.int32)  # (vocab,) bytes per ordinary token, 0 for specials
        self.plain = np.zeros(self.size, bool)  # (vocab,) no JSON structure byte, quote or escape in it
        self.comma = np.zeros(self.size, bool)  # (vocab,) starts with a comma
        self.quote = np.zeros(self.size, bool)  # (vocab,) a quote, after spaces or not
        self.single: dict[int, int] = {}  # byte -> the id of the token that is just that byte
        for token_id, piece in ordinary:
            self.lengths[token_id] = len(piece)
            self.plain[token_id] = not any(byte in STRUCTURE_BYTES or byte < 0x20 for byte in piece)
            self.comma[token_id] = piece[0] == ord(",")
            self.quote[token_id] = piece.lstrip(b" ") == b'"'
            if len(piece) == 1:
                self.single.setdefault(piece[0], token_id)
        self.is_stop = np.zeros(self.size, bool)  # (vocab,)
        self.is_stop[[i for i in self.stop_ids if i < self.size]] = True
        self.num_words = (self.size + 31) // 32


def vocabulary(tokenizer: Any, stop_ids: Sequence[int]) -> Vocabulary:
    """The tokenizer's vocabulary, built on first use and shared by every engine of the process."""
    with _VOCABULARIES_LOCK:
        by_stops = _VOCABULARIES.setdefault(tokenizer, {})
        key = tuple(sorted(stop_ids))
        if key not in by_stops:
            by_stops[key] = Vocabulary(tokenizer, key)
        return by_stops[key]


class Masker:
    """Token masks of one matcher into one preallocated buffer; counts the masks computed."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self._words = np.zeros(vocab.num_words, np.int32)  # (num_words,) one bit per token id
        self._bit_offsets = np.arange(32, dtype=np.int64)  # (32,)
        self.num_masks = 0

    def allowed(self, matcher: llguidance.LLMatcher) -> np.ndarray:
        """The ids the matcher allows next, ascending (empty once it is in error)."""
        matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self.num_masks += 1
        if matcher.is_error():
            raise FormatError(f"format: {matcher.get_error()}")
        nonzero = np.flatnonzero(self._words)  # (k,) words holding an allowed id
        if len(nonzero) * 8 > len(self._words):  # dense (inside a string): every bit at once
            ids = np.flatnonzero(np.unpackbits(self._words.view(np.uint8), bitorder="little"))
        else:  # sparse: only the words that hold one
            bits = np.unpackbits(self._words[nonzero].view(np.uint8), bitorder="little").reshape(-1, 32)  # (k, 32)
            rows, columns = np.nonzero(bits)
            ids = nonzero[rows] * 32 + self._bit_offsets[columns]
        return ids[ids < self.vocab.size] if len(ids) and ids[-1] >= self.vocab.size else ids

    def finish(self, matcher: llguidance.LLMatcher, limit: int, in_string: bool = False) -> list[int] | None:
        """Tokens that complete the matcher's answer (a copy walks them), chosen to end soon:
        the end when allowed; inside a JSON string its closing quote, else the longest plain
        token; outside, a `}`, a `]`, a comma token, an opening quote (spaces before it in the
        same token), a space (only a fixed separator allows one), the smallest digit, the longest plain token
        (a number, a literal, a word), in that order, else the longest allowed token. None
        when none is found within `limit` tokens. `in_string`: the answer so far ends inside
        a JSON string."""
        walker = matcher.deep_copy()
        path: list[int] = []
        state = (in_string, False)
        while len(path) <= limit:
            ids = self.allowed(walker)
            if len(ids) == 0:
                return None
            if self.vocab.is_stop[ids].any():
                return path
            token = self._finishing_token(ids, state[0])
            if not walker.consume_token(token):
                return None
            path.append(token)
            state = string_state(self.vocab.pieces[token], state)
        return None

    def _finishing_token(self, ids: np.ndarray, in_string: bool) -> int:
        vocab = self.vocab
        allowed = set(ids.tolist()) if len(ids) < 64 else None

        def single(byte: str) -> int | None:
            token_id = vocab.single.get(ord(byte))
            if token_id is None:
                return None
            return token_id if (token_id in allowed if allowed is not None else _contains(ids, token_id)) else None

        def longest(where: np.ndarray) -> int | None:
            pool = ids[where[ids]]
            return int(pool[np.argmax(vocab.lengths[pool])]) if len(pool) else None

        choices = [lambda: single('"'), lambda: longest(vocab.plain)] if in_string else \
            [lambda: single("}"), lambda: single("]"), lambda: longest(vocab.comma), lambda: longest(vocab.quote),
             lambda: single(" "), *(lambda digit=digit: single(digit) for digit in "0123456789"),
             lambda: longest(vocab.plain)]
        for choice in choices:
            token = choice()
            if token is not None:
                return token
        return int(ids[np.argmax(vocab.lengths[ids])])


def string_state(piece: bytes, state: tuple[bool, bool]) -> tuple[bool, bool]:
    """(inside a JSON string, after a backslash there) once `piece` is written."""
    in_string, escaped = state
    for byte in piece:
        if escaped:
            escaped = False
        elif in_string and byte == 0x5C:  # backslash
            escaped = True
        elif byte == 0x22:  # quote
            in_string = not in_string
    return in_string, escaped


def _contains(sorted_ids: np.ndarray, token_id: int) -> bool:
    at = int(np.searchsorted(sorted_ids, token_id))
    return at < len(sorted_ids) and int(sorted_ids[at]) == token_id
