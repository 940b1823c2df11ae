"""Graphs that cost nothing, at a real build's shapes: the engine's own work, measured alone.

`zero_cost_model(shape, precision, tokenizer_dir)` returns a `Model` whose sessions declare
the build's groups (decode, first chunk, each history group), a vision graph at its image
size and a post graph with the real vocabulary, and return preallocated outputs without
computing. Timing the engine on it measures the host's work per call: feeds, cache row
writes, embedding rows, the post output, sampling, detokenising. bench/decode_overhead.py
and bench/board_sim.py run on it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npu.families import family_named
from npu.model import Model
from npu.session import BF16, ShapeGroups, TensorSpec
from npu.text.template import ChatTemplate
from npu.text.tokenizer import Tokenizer

U32 = np.dtype(np.uint32)
U8 = np.dtype(np.uint8)


@dataclass(frozen=True)
class ZeroCostShape:
    """The dimensions a zero-cost model declares (Qwen2-0.5B's by default)."""

    kv_capacity: int = 1023
    prefill_chunk: int = 128
    history_lengths: tuple[int, ...] = ()
    image_size: int | None = None
    image_tokens: int = 0
    template: str = "Hermes-2"
    n_layers: int = 24
    hidden: int = 896
    kv_dim: int = 128
    vocab: int = 151655
    name: str = field(default="zero-cost", compare=False)
    family: str = "internvl"  # "qwen3_vl": patches vision input, deepstack outputs, (3, chunk) indices


class ZeroCostSession(ShapeGroups):
    """Declares a graph's groups and returns the same preallocated outputs on every run."""

    def __init__(self, name: str, inputs: list[list[TensorSpec]], outputs: list[list[TensorSpec]], fill=None):
        self.name = name
        self._inputs, self._outputs = inputs, outputs
        self._results = [[np.zeros(s.shape, s.dtype) for s in group] for group in outputs]
        if fill is not None:
            for group in self._results:
                fill(group)

    def run(self, feed, group=0):
        return self._results[group]


def layer_session(index: int, shape: ZeroCostShape, dtype) -> ZeroCostSession:
    kv = shape.kv_dim

    def group(rows: int, kv_rows: int, mask_cols: int):
        inputs = [TensorSpec("K_cache", (1, kv_rows, kv), dtype), TensorSpec("V_cache", (1, kv_rows, kv), dtype),
                  TensorSpec("indices", (3 if shape.family == "qwen3_vl" and rows > 1 else 1, rows), U32),
                  TensorSpec("input", (1, rows, shape.hidden), dtype),
                  TensorSpec("mask", (1, rows, mask_cols), dtype)]
        outputs = [TensorSpec("K_cache_out", (1, rows, kv), dtype), TensorSpec("V_cache_out", (1, rows, kv), dtype),
                   TensorSpec("output", (1, rows, shape.hidden), dtype)]
        return inputs, outputs

    chunk = shape.prefill_chunk
    groups = [group(1, shape.kv_capacity, shape.kv_capacity + 1)]
    if chunk:
        groups.append(group(chunk, 1, chunk))  # AXERA's placeholder K/V input for the first chunk
        groups += [group(chunk, history, history + chunk) for history in shape.history_lengths]
    return ZeroCostSession(f"layer{index}", [g[0] for g in groups], [g[1] for g in groups])


def post_session(shape: ZeroCostShape, dtype) -> ZeroCostSession:
    def fill(results):
        # Varied logits so the argmax scans real values; which token wins is irrelevant here.
        results[0][...] = np.random.default_rng(0).standard_normal(results[0].shape)

    return ZeroCostSession("post", [[TensorSpec("input", (1, 1, shape.hidden), dtype)]],
                           [[TensorSpec("output", (1, 1, shape.vocab), dtype)]], fill)


def vision_session(shape: ZeroCostShape, dtype) -> ZeroCostSession:
    size = shape.image_size
    if shape.family == "qwen3_vl":  # Qwen3-VL's graph: 16 px patches, 2x2 merge, 3 deepstack features (float32)
        names = ["hidden_states_out"] + [f"deepstack_feature_{j}" for j in range(3)]
        return ZeroCostSession("vision", [[TensorSpec("hidden_states", (1, (size // 16) ** 2, 512, 3), U8)]],
                               [[TensorSpec(n, (shape.image_tokens, shape.hidden), np.dtype(np.float32)) for n in names]])
    return ZeroCostSession("vision", [[TensorSpec("input", (1, size, size, 3), U8)]],
                           [[TensorSpec("output", (1, shape.image_tokens, shape.hidden), dtype)]])


class RowEmbeddings:
    """A small table indexed modulo its size: the copy of one row is what a mmap lookup does."""

    def __init__(self, hidden: int, dtype):
        self.table = np.random.default_rng(1).standard_normal((4096, hidden)).astype(dtype)  # (4096, hidden)

    def lookup(self, ids, out):
        if len(ids) == 1:
            out[0] = self.table[int(ids[0]) % len(self.table)]
        else:
            np.take(self.table, np.asarray(ids) % len(self.table), axis=0, out=out)


def internvl2_tokenizer(directory: Path, family: str = "internvl") -> Path:
    """The real InternVL2 tokenizer files (assembled offline by tests/tokenizer_files.py) in `directory`;
    for family "qwen3_vl" the Qwen2 vocabulary with Qwen3-VL's added tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
    from tests.tokenizer_files import QWEN3_VL_ADDED_TOKENS, write_internvl2_tokenizer  # noqa: PLC0415

    return write_internvl2_tokenizer(Path(directory), QWEN3_VL_ADDED_TOKENS if family == "qwen3_vl" else None)


def zero_cost_model(shape: ZeroCostShape, precision: str, tokenizer_dir: Path) -> Model:
    dtype = BF16 if precision == "bf16" else np.dtype(np.float32)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    family = family_named(shape.family)
    template = ChatTemplate.from_checkpoint({"template": shape.template}, tokenizer, family.image_tags)
    layers = [layer_session(i, shape, dtype) for i in range(shape.n_layers)]
    vision = vision_session(shape, dtype) if shape.image_size else None
    return Model(vision, layers, post_session(shape, dtype), RowEmbeddings(shape.hidden, dtype), tokenizer, template,
                 name=shape.name, backend="bench", precision=precision, family=family)
