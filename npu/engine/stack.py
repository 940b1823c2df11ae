"""The layer stack: one step's rows through every decoder layer, their K/V rows into the cache.

A stack has one method,

    stack.run(group, feeds, num_rows, should_stop, added=None) -> the last real row's hidden state [1, 1, hidden]

`feeds[layer]` are the engine's prebuilt feed dicts of that group (layer 0's `input`,
`indices`, `mask`, and the cache's own K/V views); `num_rows` is how many of the group's
rows are real (a partial chunk is padded). The stack writes each layer's new K/V rows
with `cache.write(layer, ...)` at the cache position and never advances it: the engine
does, once per step. `should_stop()` is asked before every layer; True raises `Cancelled`.
`added` maps a layer index to (num_rows, hidden) rows the host adds to that layer's
output rows before the next layer reads them (a family's per-layer image features, e.g.
Qwen3-VL's deepstack; npu/families/); `add_rows` does the addition, in float32.

`SessionStack` is the generic stack: each layer through its session's `run`, the
previous layer's output fed as returned. A board data path may provide another stack
with the same contract (npu/board/zero_copy.py keeps the data in the NPU's buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from npu.engine.kv_cache import KVCache
from npu.session import Session


class Cancelled(Exception):
    """should_stop() returned True between two graph calls."""


class SessionStack:
    def __init__(self, layers: Sequence[Session], cache: KVCache, output_order: dict[int, tuple[int, int, int]]):
        self._layers, self._cache, self._output_order = list(layers), cache, output_order

    def run(self, group: int, feeds: list[dict[str, np.ndarray]], num_rows: int,
            should_stop: Callable[[], bool], added: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
        k_index, v_index, out_index = self._output_order[group]
        hidden = None
        for layer, (session, feed) in enumerate(zip(self._layers, feeds)):
            if should_stop():
                raise Cancelled
            if hidden is not None:
                feed["input"] = hidden  # the previous layer's output, fed as returned
            outputs = session.run(feed, group)
            self._cache.write(layer, outputs[k_index], outputs[v_index], num_rows)
            hidden = outputs[out_index]
            if added is not None and layer in added:
                hidden = add_rows(hidden, added[layer])
        return hidden[:, num_rows - 1:num_rows]  # (1, 1, hidden) contiguous view


def add_rows(hidden: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`hidden` (1, n, hidden) with `rows` (m <= n, hidden) added to its first m rows, computed in
    float32 and cast back to hidden's dtype (a new array: a session's output buffer is not written)."""
    out = hidden.copy()
    m = len(rows)
    out[0, :m] = (hidden[0, :m].astype(np.float32) + rows.astype(np.float32)).astype(hidden.dtype)
    return out
