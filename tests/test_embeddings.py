"""Board-format embeddings: exact bytes on export, mmap lookups equal the checkpoint rows."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu.reference.checkpoint import load_checkpoint
from npu.embeddings import (
    EMBEDDINGS_FILE,
    Embeddings,
    EmbeddingsError,
    cached_embeddings_file,
    export_embeddings,
)
from npu.session import BF16


@pytest.fixture(scope="module")
def exported(tiny_internvl_original, tmp_path_factory):
    out = tmp_path_factory.mktemp("embeddings") / EMBEDDINGS_FILE
    export_embeddings(tiny_internvl_original.path, out)
    return out


def test_export_is_raw_bf16_rows_without_header(tiny_internvl_original, exported):
    bp, weights = load_checkpoint(tiny_internvl_original.path)
    assert exported.stat().st_size == bp.vocab * bp.hidden * 2
    raw = np.fromfile(exported, dtype="<u2").reshape(bp.vocab, bp.hidden)  # (vocab, hidden) bf16 bits
    expected_bits = np.asarray(weights["embed"]).view(np.uint16)
    np.testing.assert_array_equal(raw, expected_bits)
    # the torch model's own table, bit for bit (row 151648 is <IMG_CONTEXT>)
    torch_rows = tiny_internvl_original.torch_model.model.language_model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(raw[[0, 151648, -1]].view(BF16).astype(np.float32), torch_rows[[0, 151648, -1]])
    assert not list(exported.parent.glob("*.partial"))


def test_both_namings_export_the_same_bytes(tiny_internvl_native, exported, tmp_path):
    native = export_embeddings(tiny_internvl_native.path, tmp_path / EMBEDDINGS_FILE)
    assert native.read_bytes() == exported.read_bytes()


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)])
def test_lookup_equals_checkpoint_rows(tiny_internvl_original, exported, dtype):
    bp, weights = load_checkpoint(tiny_internvl_original.path)
    table = Embeddings(exported, bp.vocab, bp.hidden)
    ids = [151644, 0, 42, 151648, 151648, bp.vocab - 1]
    out = np.empty((len(ids), bp.hidden), dtype)
    assert table.lookup(ids, out) is out
    np.testing.assert_array_equal(out.astype(np.float32), np.asarray(weights["embed"][ids], dtype=np.float32))


def test_lookup_rejects_bad_ids_and_buffers(tiny_internvl_original, exported):
    bp, _ = load_checkpoint(tiny_internvl_original.path)
    table = Embeddings(exported, bp.vocab, bp.hidden)
    with pytest.raises(EmbeddingsError, match="outside the vocabulary"):
        table.lookup([bp.vocab], np.empty((1, bp.hidden), BF16))
    with pytest.raises(EmbeddingsError, match="outside the vocabulary"):
        table.lookup([-1], np.empty((1, bp.hidden), BF16))
    with pytest.raises(EmbeddingsError, match="shape"):
        table.lookup([1, 2], np.empty((1, bp.hidden), BF16))
    with pytest.raises(EmbeddingsError, match="expected"):
        Embeddings(exported, bp.vocab + 1, bp.hidden)


def test_cached_export_is_reused_and_refreshed(tiny_qwen2, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMD_CACHE_DIR", str(tmp_path / "cache"))
    first = cached_embeddings_file(tiny_qwen2.path)
    assert first.is_relative_to(tmp_path / "cache") and first.name == EMBEDDINGS_FILE
    stamp = first.stat().st_mtime_ns
    assert cached_embeddings_file(tiny_qwen2.path) == first and first.stat().st_mtime_ns == stamp
    # a checkpoint whose weights change (new mtime) gets a fresh export
    weights = tiny_qwen2.path / "model.safetensors"
    info = weights.stat()
    try:
        os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
        assert cached_embeddings_file(tiny_qwen2.path) != first
    finally:
        os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=151654), min_size=0, max_size=40))
def test_lookup_is_row_selection(exported, ids):
    table = np.fromfile(exported, dtype=BF16).reshape(151655, -1)  # (vocab, hidden)
    out = np.empty((len(ids), table.shape[1]), np.float32)
    Embeddings(exported, 151655, table.shape[1]).lookup(ids, out)
    np.testing.assert_array_equal(out, table[ids].astype(np.float32))
