"""Tokenizer loading: `Tokenizer.from_dir` and the Qwen2 byte-level BPE it assembles.

`Tokenizer.from_dir` accepts the two layouts InternVL2 checkpoints and board packages ship:

- `tokenizer.json` (any `tokenizers` model: Qwen2 BPE, the demo model's WordLevel, ...);
- `vocab.json` + `merges.txt` (+ `added_tokens.json` and/or `tokenizer_config.json`'s
  `added_tokens_decoder`): the Qwen2 byte-level BPE is assembled here the way Qwen2's
  own tokenizer is (NFC, the Qwen2 regex split, ByteLevel without prefix space,
  ByteLevel decoder, no BOS).

Added tokens (`<|im_start|>`, `<img>`, `<IMG_CONTEXT>`, ...) are registered as special
tokens at the ids their files give, so they encode as single ids wherever they appear
in text (unless `encode(..., parse_special=False)`).

`decode` never skips special tokens: InternVL's grounding tags (`<ref>`, `<box>`) are
special yet belong in the answer; the engine stops *before* emitting a stop token.

The UTF-8-safe incremental detokenizer is npu/text/detokenizer.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

# Qwen2's pre-tokenizer split (the tiktoken cl100k pattern with single digits).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_U32_LIMIT = 1 << 32  # the backend takes ids as u32


class TokenizerError(ValueError):
    """A tokenizer directory that is missing files or holds inconsistent ones."""


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the
    other 68 bytes are shifted to code points 256.. in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + shifted)] = b
            shifted += 1
    return char_to_byte


_CHAR_TO_BYTE = _byte_level_alphabet()


class Tokenizer:
    """A `tokenizers.Tokenizer` with the few operations vlmd needs.

    Contract: `encode` adds no BOS/EOS and no post-processing; `decode(encode(t))` gives
    back `t` for the real Qwen2 files up to NFC normalisation; ids are never hard-coded,
    look them up with `token_id`.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        # `encode_special_tokens` is backend state: toggled for parse_special=False, so
        # every encode holds the lock (a clone would double the vocabulary's memory).
        self._encode_lock = threading.Lock()
        added = backend.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        # The backend's decode passes special tokens through the decoder but inserts
        # non-special added tokens verbatim; token_bytes mirrors that.
        self._verbatim = {i: t.content.encode("utf-8") for i, t in added.items() if not t.special}
        self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True),
                              max(self._added, default=-1) + 1)
        self.is_byte_level = isinstance(backend.decoder, decoders.ByteLevel)

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` if present, else `vocab.json` + `merges.txt` + added tokens.

        Added tokens listed in `added_tokens.json` / `tokenizer_config.json` but absent
        from `tokenizer.json` are added at their listed ids.
        """
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"tokenizer directory {path} does not exist")
        added = read_added_tokens(path)
        if (path / "tokenizer.json").is_file():
            backend = Backend.from_file(str(path / "tokenizer.json"))
            _add_missing_tokens(backend, added, path)
            return cls(backend)
        missing = [n for n in ("vocab.json", "merges.txt") if not (path / n).is_file()]
        if missing:
            raise TokenizerError(
                f"{path} has no tokenizer.json and lacks {', '.join(missing)}; a tokenizer "
                "directory needs tokenizer.json, or vocab.json + merges.txt (+ added_tokens.json)")
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        merges = _read_merges(path / "merges.txt")
        return cls(build_qwen2_bpe(vocab, merges, added))

    @classmethod
    def from_file(cls, tokenizer_json: str | Path) -> Tokenizer:
        return cls(Backend.from_file(str(tokenizer_json)))

    # -- encoding and decoding -----------------------------------------------------------

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Text -> ids. With `parse_special=False`, special-token strings in `text` are
        ordinary text (use it for user input, so a question cannot forge `<IMG_CONTEXT>`)."""
        with self._encode_lock:
            self._backend.encode_special_tokens = not parse_special
            try:
                return self._backend.encode(text, add_special_tokens=False).ids
            finally:
                self._backend.encode_special_tokens = False

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens included; ids outside the vocabulary are dropped."""
        return self._backend.decode([int(i) for i in ids if 0 <= i < _U32_LIMIT],
                                    skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def token(self, token_id: int) -> str | None:
        """The token string for an id (None outside the vocabulary)."""
        return self._backend.id_to_token(int(token_id)) if 0 <= token_id < _U32_LIMIT else None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token contributes to `decode` (byte-level tokenizers only).

        Ids outside the vocabulary contribute nothing, as in `decode`.
        """
        if not self.is_byte_level:
            raise TypeError("token_bytes needs a byte-level tokenizer")
        verbatim = self._verbatim.get(token_id)
        if verbatim is not None:
            return verbatim
        token = self.token(token_id)
        if token is None:
            return b""
        # Like the ByteLevel decoder: a token with any character outside the byte alphabet
        # (only special tokens can have one) is kept whole, as UTF-8.
        try:
            return bytes([_CHAR_TO_BYTE[c] for c in token])
        except KeyError:
            return token.encode("utf-8")

    @property
    def added_tokens(self) -> dict[int, str]:
        return dict(self._added)


# -- assembling the Qwen2 BPE ---------------------------------------------------------


def build_qwen2_bpe(vocab: dict[str, int], merges: list[tuple[str, str]],
                    added: dict[str, int]) -> Backend:
    """Qwen2's byte-level BPE from its vocabulary, merges and added tokens."""
    _check_added_ids(vocab, added)
    # Added tokens go into the model's vocabulary first, so registering them below reuses
    # their file ids instead of appending new ones.
    full_vocab = {**vocab, **added}
    backend = Backend(BPE(vocab=full_vocab, merges=merges, dropout=None, unk_token=None,
                          continuing_subword_prefix="", end_of_word_suffix="",
                          fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    ordered = sorted(added.items(), key=lambda item: item[1])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in ordered])
    return backend


def read_added_tokens(path: Path) -> dict[str, int]:
    """Added tokens from `added_tokens.json` and `tokenizer_config.json` (token -> id).

    Both files may list the same token; they must then agree on its id.
    """
    added: dict[str, int] = {}
    sources = []
    if (path / "added_tokens.json").is_file():
        sources.append(("added_tokens.json",
                        json.loads((path / "added_tokens.json").read_text(encoding="utf-8"))))
    if (path / "tokenizer_config.json").is_file():
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder") or {}
        sources.append(("tokenizer_config.json",
                        {entry["content"]: int(i) for i, entry in decoder.items()}))
    for name, tokens in sources:
        for token, token_id in tokens.items():
            if added.get(token, token_id) != token_id:
                raise TokenizerError(f"{path / name}: {token!r} has id {token_id}, "
                                     f"another file gives {added[token]}")
            added[token] = int(token_id)
    return added


def _check_added_ids(vocab: dict[str, int], added: dict[str, int]) -> None:
    by_id = {i: t for t, i in vocab.items()}
    for token, token_id in added.items():
        if token in vocab and vocab[token] != token_id:
            raise TokenizerError(f"added token {token!r} has id {token_id} but vocab.json "
                                 f"gives it {vocab[token]}")
        if by_id.get(token_id, token) != token:
            raise TokenizerError(f"added token {token!r} wants id {token_id}, which vocab.json "
                                 f"gives to {by_id[token_id]!r}")


def _add_missing_tokens(backend: Backend, added: dict[str, int], path: Path) -> None:
    for token, token_id in sorted(added.items(), key=lambda item: item[1]):
        have = backend.token_to_id(token)
        if have is None:
            if backend.get_vocab_size(with_added_tokens=True) != token_id:
                raise TokenizerError(f"{path}: cannot add {token!r} at id {token_id}: "
                                     "tokenizer.json lacks it and the id is not the next free one")
            backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        elif have != token_id:
            raise TokenizerError(f"{path}: {token!r} has id {have} in tokenizer.json "
                                 f"but {token_id} in the added-token files")


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line or (line_no == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{line_no}: a merge is two tokens separated by one "
                                 f"space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges
