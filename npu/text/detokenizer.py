"""`IncrementalDetokenizer`: a stream of token ids in, text deltas out, never a broken character.

For byte-level tokenizers each token's bytes go to an incremental UTF-8 decoder (exactly
O(1) per token); for any other decoder a small window (the last emitted chunk plus pending
ids) is decoded and its stable suffix emitted.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable

from npu.text.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# SentencePiece byte-fallback pieces; their decoder turns a whole run of them into text at
# once (an invalid run becomes one U+FFFD per byte), so a run is only decoded complete.
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class IncrementalDetokenizer:
    """Ids in, text deltas out; never a broken character.

    Contract: `push(id)` returns the text that became complete with this id (often "");
    `flush()` returns the rest (a truly broken tail becomes U+FFFD) and resets the
    detokenizer. The concatenation of every delta and the final flush equals
    `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._bytes_mode = tokenizer.is_byte_level
        self._reset()

    def _reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._window: list[int] = []  # last emitted chunk + pending ids (window mode)
        self._read_offset = 0         # window[:read_offset] is the last emitted chunk
        self._emitted_text = ""       # decode(window[:read_offset])

    def push(self, token_id: int) -> str:
        if self._bytes_mode:
            return self._utf8.decode(self._tokenizer.token_bytes(token_id), final=False)
        self._window.append(token_id)
        token = self._tokenizer.token(token_id)
        if token is not None and _BYTE_PIECE.fullmatch(token):
            return ""  # inside a run of byte pieces: the run decodes as a whole
        text = self._tokenizer.decode(self._window)
        if len(text) <= len(self._emitted_text) or text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still waiting for its bytes
        delta = text[len(self._emitted_text):]
        # Slide the window: keep only this chunk as left context for the next decode.
        del self._window[:self._read_offset]
        self._read_offset = len(self._window)
        self._emitted_text = self._tokenizer.decode(self._window)
        return delta

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in token_ids)

    def flush(self) -> str:
        if self._bytes_mode:
            tail = self._utf8.decode(b"", final=True)
        else:
            tail = self._tokenizer.decode(self._window)[len(self._emitted_text):]
        self._reset()
        return tail
