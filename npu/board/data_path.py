"""Which data path a board model runs on: zero-copy where it proves itself, else pyaxengine's run().

`select_data_path(layers, post, shapes, requested)` answers with a `ZeroCopyRuntime`
(npu/board/zero_copy.py) or a `PublicPath`, each with `describe()` for `vlmd model
inspect`, `vlmd bench` and the logs:

- `requested="public"`: the public path, always.
- `requested="auto"` (the default): zero-copy when the graphs run on the board's own NPU,
  pyaxengine is a version whose private buffers vlmd was written against (0.1.2, 0.1.3),
  every private name is there, the buffers are as large as the groups need and the
  self-check below passes; otherwise the public path, with the reason logged once.
- `requested="zero-copy"`: the same checks, but a failure is a `ModelError` (a forced
  path that is not proven could answer differently from the public one).

The self-check (`prove`) runs, before any request, one partial prefill chunk and two
decode steps through layers 0 and 1 (so the shared mask and indices buffers and the
layer-to-layer chaining are exercised too) and the post graph, both ways on the same
random inputs, and requires bit-identical K/V rows, hidden states and logits. The
zero-copy run goes first, on buffers poisoned with a wrong pattern (written and flushed),
so a missing flush or invalidate cannot pass by reading the public run's leftovers.
Afterwards the K/V buffers are zeroed: rows past the cache position are read by the NPU
(masked) and must hold finite values, and pyaxengine does not clear what it allocates.

The decision is made once per set of sessions per process (sessions live as long).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from npu.board.axengine_session import AxEngineSession
from npu.board.zero_copy import KNOWN_VERSIONS, ZeroCopyRuntime, ZeroCopyStack, ZeroCopyUnavailable, find_libraries
from npu.engine.kv_cache import KVCache
from npu.engine.prefill import chunk_mask
from npu.errors import ModelError
from npu.session import MASK_BLOCKED, SessionError
from npu.shapes import GraphShapes

log = logging.getLogger(__name__)

DATA_PATHS = ("auto", "zero-copy", "public")
POISON = 0x3F  # bf16 0x3F3F ~ 0.75: finite, and wrong everywhere it is left over
SEED = 20260324


@dataclass
class PublicPath:
    """pyaxengine's own `run()` for every graph; `reason` says why this path."""

    reason: str
    name: str = "public"
    traffic: Any = None

    def kv_storage(self) -> None:
        return None

    def layer_stack(self, cache: KVCache, shapes: GraphShapes) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"data_path": self.name, "reason": self.reason}


_DECISIONS: dict[tuple[int, ...], ZeroCopyRuntime | str] = {}
_LOCK = threading.Lock()


def select_data_path(layers: list[AxEngineSession], post: AxEngineSession, shapes: GraphShapes,
                     requested: str = "auto") -> ZeroCopyRuntime | PublicPath:
    if requested not in DATA_PATHS:
        raise ModelError(f"unknown data path {requested!r}: use one of {', '.join(DATA_PATHS)}")
    if requested == "public":
        return PublicPath("model.data_path = public")
    key = tuple(id(session) for session in (*layers, post))
    with _LOCK:
        decision = _DECISIONS.get(key)
        if decision is None:
            decision = _decide(layers, post, shapes)
            _DECISIONS[key] = decision
            if isinstance(decision, str):
                log.info("board data path: public (%s)", decision)
            else:
                log.info("board data path: zero-copy (%s)", decision.reason)
    if isinstance(decision, ZeroCopyRuntime):
        return decision
    if requested == "zero-copy":
        raise ModelError(f"model.data_path = zero-copy, but it cannot run here: {decision}")
    return PublicPath(decision)


def _decide(layers: list[AxEngineSession], post: AxEngineSession, shapes: GraphShapes) -> ZeroCopyRuntime | str:
    runtime = layers[0].runtime
    if runtime.version not in KNOWN_VERSIONS:
        return (f"pyaxengine {runtime.version or 'of unknown version'}: vlmd reads the private buffers of"
                f" pyaxengine {' and '.join(KNOWN_VERSIONS)} only")
    try:
        zero_copy = ZeroCopyRuntime(layers, post, shapes, find_libraries(runtime.module))
        zero_copy.bind()
        mismatch = prove(zero_copy, layers, post, shapes)
    except (ZeroCopyUnavailable, SessionError) as exc:
        if "zero_copy" in locals():
            zero_copy.unbind()
        return str(exc)
    if mismatch:
        zero_copy.unbind()
        return f"self-check against the public path failed: {mismatch}"
    zero_copy.reason = (f"proven at load: a prefill chunk and two decode steps of layers 0-{min(2, len(layers)) - 1}"
                        " and the post graph bit-identical to pyaxengine's run()")
    return zero_copy


# ------------------------------------------------------------------ the self-check


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.5).astype(np.float32).astype(dtype)


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _steps(shapes: GraphShapes) -> tuple[int, list[int]]:
    """Rows of the partial first chunk (0 without prefill groups) and the decode positions after it."""
    size = max(shapes.chunk - 1, 1) if shapes.chunk else 0
    positions = [p for p in (size, size + 1) if p < shapes.capacity]
    return size, positions


class _Inputs:
    """The same random chunk and tokens for both runs."""

    def __init__(self, shapes: GraphShapes) -> None:
        s, rng = shapes, np.random.default_rng(SEED)
        self.size, self.positions = _steps(s)
        if self.size:
            self.chunk = _random(rng, (1, s.chunk, s.hidden), s.act_dtype)  # (1, chunk, hidden)
            self.chunk[0, self.size:] = 0  # padding rows, as the engine feeds them
            # (index_rows, chunk): the positions in each row (1-D, or M-RoPE t/h/w for text rows)
            self.chunk_indices = np.tile(np.arange(s.chunk, dtype=np.uint32), (s.index_rows, 1))
            self.chunk_mask = chunk_mask(s, 0)
        self.tokens = [_random(rng, (1, 1, s.hidden), s.act_dtype) for _ in self.positions]  # each (1, 1, hidden)


def _public(layers: list[AxEngineSession], post: AxEngineSession, shapes: GraphShapes, data: _Inputs) -> dict:
    s, out = shapes, {}
    k_rows = [np.zeros((1, s.capacity, s.kv_dim), s.kv_dtype) for _ in layers]  # per layer (1, capacity, kv_dim)
    v_rows = [np.zeros((1, s.capacity, s.kv_dim), s.kv_dtype) for _ in layers]
    if data.size:
        placeholder = np.zeros(s.first_chunk_kv_shape, s.kv_dtype)
        hidden = data.chunk
        k_i, v_i, o_i = s.output_order[1]
        for l, layer in enumerate(layers):
            result = layer.run({"K_cache": placeholder, "V_cache": placeholder, "indices": data.chunk_indices,
                                "input": hidden, "mask": data.chunk_mask}, 1)
            k_rows[l][0, :data.size], v_rows[l][0, :data.size] = result[k_i][0, :data.size], result[v_i][0, :data.size]
            hidden = np.array(result[o_i])
        out["prefill hidden"] = hidden[:, data.size - 1]
    k_i, v_i, o_i = s.output_order[0]
    for step, (position, token) in enumerate(zip(data.positions, data.tokens)):
        mask = np.full((1, 1, s.capacity + 1), MASK_BLOCKED, np.float32)  # (1, 1, capacity + 1)
        mask[0, 0, :position] = 0
        mask[0, 0, -1] = 0
        hidden = token
        for l, layer in enumerate(layers):
            result = layer.run({"K_cache": k_rows[l], "V_cache": v_rows[l],
                                "indices": np.full((1, 1), position, np.uint32), "input": hidden,
                                "mask": mask.astype(s.mask_dtype)}, 0)
            k_rows[l][0, position], v_rows[l][0, position] = result[k_i][0, 0], result[v_i][0, 0]
            hidden = np.array(result[o_i])
        out[f"decode {step} hidden"] = hidden
    out["logits"] = np.array(post.run({s.post_input_name: hidden.astype(s.post_dtype)}, 0)[0])
    for l in range(len(layers)):
        out[f"layer {l} K rows"] = k_rows[l][0, :data.positions[-1] + 1].copy()
        out[f"layer {l} V rows"] = v_rows[l][0, :data.positions[-1] + 1].copy()
    return out


def _zero_copy(runtime: ZeroCopyRuntime, n_layers: int, shapes: GraphShapes, data: _Inputs) -> dict:
    s, out = shapes, {}
    cache = KVCache(n_layers, s.capacity, s.kv_dim, s.kv_dtype, s.mask_dtype, storage=runtime.storage(n_layers))
    stack = ZeroCopyStack(runtime, cache, runtime.owner)
    never = lambda: False  # noqa: E731

    def feeds(feed: dict) -> list[dict]:
        return [feed] + [{} for _ in range(n_layers - 1)]

    if data.size:
        hidden = stack.run(1, feeds({"input": data.chunk, "indices": data.chunk_indices, "mask": data.chunk_mask}),
                           data.size, never)
        cache.advance(data.size)
        out["prefill hidden"] = np.array(hidden[:, 0])
    for step, (position, token) in enumerate(zip(data.positions, data.tokens)):
        hidden = stack.run(0, feeds({"input": token, "indices": np.full((1, 1), position, np.uint32),
                                     "mask": cache.decode_mask}), 1, never)
        cache.advance(1)
        out[f"decode {step} hidden"] = np.array(hidden)
    post_in = np.array(hidden, dtype=s.post_dtype)
    out["logits"] = np.array(runtime.post.run({s.post_input_name: post_in}, 0)[0])
    for l in range(n_layers):
        out[f"layer {l} K rows"] = cache.keys[l][0, :cache.position].copy()
        out[f"layer {l} V rows"] = cache.values[l][0, :cache.position].copy()
    return out


def prove(runtime: ZeroCopyRuntime, layers: list[AxEngineSession], post: AxEngineSession,
          shapes: GraphShapes) -> str | None:
    """None when the zero-copy path gives the public path's bits; else what differed."""
    n_layers = min(2, len(layers))
    data = _Inputs(shapes)
    if not data.positions:
        return "the KV cache is too small to check a decode step"
    runtime.poison(n_layers, POISON)
    got = _zero_copy(runtime, n_layers, shapes, data)
    want = _public(layers[:n_layers], post, shapes, data)
    runtime.clear_kv()
    for name, expected in want.items():
        a, b = _bytes(got[name]), _bytes(expected)
        if a.shape != b.shape or not np.array_equal(a, b):
            count = int(np.count_nonzero(a != b)) if a.shape == b.shape else "all"
            return f"{name}: {count} of {b.size} bytes differ"
    return None
