"""Tokenizer fixtures: the real InternVL2-1B file set, the transformers oracle, and small
tokenizer.json models built in-test (a demo-style WordLevel, a SentencePiece-style BPE
with byte fallback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE, WordLevel

from npu.text.tokenizer import Tokenizer
from tests.tokenizer_files import require_qwen2_vocab, write_internvl2_tokenizer

# The demo model's kind of special tokens (ChatML and InternVL's image tags).
DEMO_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
DEMO_WORDS = ["<unk>", "a", "cat", "dog", "on", "the", "mat", "is", "what", "this", "?", ".",
              "system", "user", "assistant", "you", "are", "helpful"]


@pytest.fixture(scope="session")
def internvl2_tokenizer_dir(tmp_path_factory) -> Path:
    """vocab.json + merges.txt + added_tokens.json + tokenizer_config.json, no tokenizer.json."""
    require_qwen2_vocab()
    return write_internvl2_tokenizer(tmp_path_factory.mktemp("internvl2_tokenizer"))


@pytest.fixture(scope="session")
def internvl2_tokenizer(internvl2_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(internvl2_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_qwen2_tokenizer(internvl2_tokenizer_dir):
    """transformers' Qwen2 tokenizer on the same files: the encoding oracle (offline)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(internvl2_tokenizer_dir),
                                                      local_files_only=True)


def build_demo_wordlevel(directory: Path, with_decoder: bool = False,
                         specials: list[str] | None = None) -> Path:
    """A small WordLevel tokenizer.json over whitespace-split words with ChatML and image
    specials (or `specials`). Without a decoder, `decode` joins tokens with spaces."""
    vocab = {w: i for i, w in enumerate(DEMO_WORDS)}
    backend = Backend(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_decoder:
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in (DEMO_SPECIALS if specials is None else specials)])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    return directory


def build_byte_fallback_bpe(directory: Path) -> Path:
    """A SentencePiece-style BPE (InternLM2/Phi-3 kind): `▁` for spaces, `<0xNN>` byte
    tokens for anything outside its tiny vocabulary, and the matching decoder chain."""
    pieces = ["<unk>", "▁", "a", "b", "c", "▁a", "ab", "▁ab", "é", "你"]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b")]
    backend = Backend(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                          fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|im_start|>", "<|im_end|>")])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(build_demo_wordlevel(tmp_path_factory.mktemp("demo_tokenizer")))


@pytest.fixture(scope="session")
def byte_fallback_tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(build_byte_fallback_bpe(tmp_path_factory.mktemp("bf_tokenizer")))


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False))
