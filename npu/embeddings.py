"""Board-format token embeddings: export from a checkpoint, and the one mmap reader.

The board ships `model.embed_tokens.weight.bfloat16.bin`: raw little-endian bf16,
row-major [vocab, hidden], no header. Every backend (board, reference) reads token
rows from such a file through `Embeddings`; for a Hugging Face checkpoint,
`cached_embeddings_file` exports it once into a cache directory keyed by the
checkpoint's path and its weight files' sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from npu.reference.checkpoint import checkpoint_files, load_checkpoint
from npu.session import BF16

EMBEDDINGS_FILE = "model.embed_tokens.weight.bfloat16.bin"
_EXPORT_ROWS = 8192  # rows converted per step, so export never holds a float32 copy of the table


class EmbeddingsError(ValueError):
    """An embeddings file that does not fit the model, or a token id outside the vocabulary."""


class Embeddings:
    """Read-only mmap of a board-format embeddings file [vocab, hidden] bf16."""

    def __init__(self, path: str | Path, vocab: int, hidden: int):
        self.path = Path(path)
        self.vocab, self.hidden = vocab, hidden
        expected = vocab * hidden * BF16.itemsize
        size = self.path.stat().st_size
        if size != expected:
            raise EmbeddingsError(
                f"{self.path}: {size} bytes, expected {expected}"
                f" (= vocab {vocab} x hidden {hidden} x 2: raw bf16, no header)"
            )
        self.table = np.memmap(self.path, dtype=BF16, mode="r", shape=(vocab, hidden))  # (vocab, hidden)

    def lookup(self, ids: Sequence[int] | np.ndarray, out: np.ndarray) -> np.ndarray:
        """Fill out[i] with the row of ids[i]; `out` is [len(ids), hidden], bf16 or float32."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if out.shape != (len(ids), self.hidden):
            raise EmbeddingsError(f"out has shape {list(out.shape)}, expected [{len(ids)}, {self.hidden}]")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab):
            bad = ids[(ids < 0) | (ids >= self.vocab)][0]
            raise EmbeddingsError(f"token id {int(bad)} is outside the vocabulary 0..{self.vocab - 1}")
        if out.dtype == BF16:
            np.take(self.table, ids, axis=0, out=out)
        else:
            for row, token_id in enumerate(ids):
                out[row] = self.table[token_id]
        return out


def export_embeddings(checkpoint_dir: str | Path, out_path: str | Path) -> Path:
    """Write the checkpoint's input embeddings in board format; returns `out_path`.

    Written to a temporary name first and renamed, so a reader never sees half a file.
    """
    _, weights = load_checkpoint(Path(checkpoint_dir))
    table = weights["embed"]  # (vocab, hidden), stored dtype
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + f".{os.getpid()}.partial")
    with open(partial, "wb") as handle:
        for start in range(0, table.shape[0], _EXPORT_ROWS):
            rows = np.asarray(table[start : start + _EXPORT_ROWS], dtype=BF16)  # (<=8192, hidden)
            handle.write(rows.tobytes())  # host order; every supported host is little-endian
    os.replace(partial, out_path)
    return out_path


def cache_dir() -> Path:
    """$VLMD_CACHE_DIR, else ~/.cache/vlmd (read at call time)."""
    configured = os.environ.get("VLMD_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "vlmd"


def cached_embeddings_path(checkpoint_dir: str | Path, directory: str | Path | None = None) -> Path:
    """Where `cached_embeddings_file` keeps a checkpoint's export (whether or not it exists yet)."""
    checkpoint_dir = Path(checkpoint_dir).resolve()
    digest = hashlib.sha256(str(checkpoint_dir).encode())
    for path in checkpoint_files(checkpoint_dir):
        stat = path.stat()
        digest.update(f"|{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return Path(directory or cache_dir()) / "embeddings" / digest.hexdigest()[:24] / EMBEDDINGS_FILE


def cached_embeddings_file(checkpoint_dir: str | Path, directory: str | Path | None = None) -> Path:
    """The board-format embeddings of a HF checkpoint, exported once into the cache."""
    target = cached_embeddings_path(checkpoint_dir, directory)
    if not target.is_file():
        export_embeddings(Path(checkpoint_dir).resolve(), target)
    return target
