"""The layer stack: one step's rows through every decoder layer, their K/V rows into the cache.

A stack has one method,

    stack.run(group, feeds, num_rows, should_stop) -> the last real row's hidden state [1, 1, hidden]

`feeds[layer]` are the engine's prebuilt feed dicts of that group (layer 0's `input`,
`indices`, `mask`, and the cache's own K/V views); `num_rows` is how many of the group's
rows are real (a partial chunk is padded). The stack writes each layer's new K/V rows
with `cache.write(layer, ...)` at the cache position and never advances it: the engine
does, once per step. `should_stop()` is asked before every layer; True raises `Cancelled`.

`SessionStack` is the generic stack: each layer through its session's `run`, the
previous layer's output fed as returned. A board data path may provide another stack
with the same contract (npu/board/zero_copy.py keeps the data in the NPU's buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from npu.engine.kv_cache import KVCache
from npu.session import Session


class Cancelled(Exception):
    """should_stop() returned True between two graph calls."""


class SessionStack:
    def __init__(self, layers: Sequence[Session], cache: KVCache, output_order: dict[int, tuple[int, int, int]]):
        self._layers, self._cache, self._output_order = list(layers), cache, output_order

    def run(self, group: int, feeds: list[dict[str, np.ndarray]], num_rows: int,
            should_stop: Callable[[], bool]) -> np.ndarray:
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
        return hidden[:, num_rows - 1:num_rows]  # (1, 1, hidden) contiguous view
