"""Token embeddings as packages ship them: export from a checkpoint, and the one mmap reader.

Two formats:

- `model.embed_tokens.weight.bfloat16.bin` (AXERA's C++ runtimes, M5Stack packages):
  raw little-endian bf16, row-major [vocab, hidden], no header;
- `model.embed_tokens.weight.npy` (AXERA's Python runners, e.g. AXERA-TECH/InternVL3-2B.axera
  python/infer.py `np.load(f"{axmodel_path}/model.embed_tokens.weight.npy")`): a NumPy
  array [vocab, hidden], float32 there. It is memory-mapped (np.load mmap_mode="r") and
  only the rows looked up are converted, never the whole table.

Every backend (board, reference) reads token rows through `Embeddings`; for a Hugging
Face checkpoint, `cached_embeddings_file` exports the .bin once into a cache directory
keyed by the checkpoint's path and its weight files' sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from npu.reference.checkpoint import checkpoint_files, load_checkpoint, read_config
from npu.reference.idefics3 import is_idefics3_config, load_idefics3_checkpoint
from npu.session import BF16, dtype_name

EMBEDDINGS_FILE = "model.embed_tokens.weight.bfloat16.bin"
_EXPORT_ROWS = 8192  # rows converted per step, so export never holds a float32 copy of the table


class EmbeddingsError(ValueError):
    """An embeddings file that does not fit the model, or a token id outside the vocabulary."""


def open_table(path: str | Path, hidden: int) -> np.ndarray:
    """The file's [rows, hidden] table, memory-mapped read-only: a .npy array as stored, any
    other file as raw bf16 rows. EmbeddingsError when it cannot be [rows, hidden]."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            table = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise EmbeddingsError(f"{path}: not a readable .npy array ({exc})") from exc
        if table.ndim != 2 or table.shape[1] != hidden or not np.issubdtype(table.dtype, np.floating):
            raise EmbeddingsError(f"{path}: {dtype_name(table.dtype)} {list(table.shape)}, expected a float"
                                  f" [vocab, {hidden}] table")
        return table
    size = path.stat().st_size
    row_bytes = hidden * BF16.itemsize
    if size == 0 or size % row_bytes:
        raise EmbeddingsError(f"{path}: {size} bytes is not a whole number of bf16 rows of hidden {hidden}"
                              " (raw bf16 [vocab, hidden], no header)")
    return np.memmap(path, dtype=BF16, mode="r", shape=(size // row_bytes, hidden))  # (vocab, hidden)


class Embeddings:
    """Read-only mmap of an embeddings file [vocab, hidden] (raw bf16 .bin, or .npy)."""

    def __init__(self, path: str | Path, vocab: int, hidden: int):
        self.path = Path(path)
        self.vocab, self.hidden = vocab, hidden
        self.table = open_table(self.path, hidden)  # (rows, hidden)
        if self.table.shape[0] != vocab:
            raise EmbeddingsError(f"{self.path}: {self.table.shape[0]} rows of hidden {hidden}, expected vocab {vocab}")

    def lookup(self, ids: Sequence[int] | np.ndarray, out: np.ndarray) -> np.ndarray:
        """Fill out[i] with the row of ids[i]; `out` is [len(ids), hidden], bf16 or float32."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if out.shape != (len(ids), self.hidden):
            raise EmbeddingsError(f"out has shape {list(out.shape)}, expected [{len(ids)}, {self.hidden}]")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab):
            bad = ids[(ids < 0) | (ids >= self.vocab)][0]
            raise EmbeddingsError(f"token id {int(bad)} is outside the vocabulary 0..{self.vocab - 1}")
        if out.dtype == self.table.dtype:
            np.take(self.table, ids, axis=0, out=out)
        else:  # converted row by row, straight from the mapped file
            for row, token_id in enumerate(ids):
                np.copyto(out[row], self.table[token_id], casting="unsafe")
        return out


def export_embeddings(checkpoint_dir: str | Path, out_path: str | Path) -> Path:
    """Write the checkpoint's input embeddings in board format; returns `out_path`.

    Written to a temporary name first and renamed, so a reader never sees half a file.
    """
    load = load_idefics3_checkpoint if is_idefics3_config(read_config(Path(checkpoint_dir))) else load_checkpoint
    _, weights = load(Path(checkpoint_dir))
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
