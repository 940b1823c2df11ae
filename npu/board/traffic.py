"""Device-memory traffic: what the host writes into the NPU's buffers, flushes and invalidates.

`DeviceTraffic` counts, per data path, the bytes the host stores into CMM buffers
(`written`), the bytes named by `AX_SYS_MflushCache` (`flushed`: host cache lines
written back for the NPU) and by `AX_SYS_MinvalidateCache` (`invalidated`: lines
dropped so the host reads what the NPU wrote).

`cpp_decode_traffic(shapes)` is the same per decode token for the C++ runtimes, computed
from their source at a model's shapes:

- M5Stack StackFlow `main_vlm` (d9084ba; src/runner/LLM.hpp class `LLM`, the decode loop,
  and src/runner/ax_model_runner/legacy/ax_model_runner_ax650.cpp): per layer it memcpys
  `indices` (4 B), the whole decode mask ((capacity + 1) x 2 B), the token's hidden row
  and, after the run, the new K and V rows into the K_cache/V_cache input buffers; the
  inputs are allocated uncached (`AX_ENGINE_ABST_DEFAULT` -> `AX_SYS_MemAlloc`), so
  nothing is flushed; `inference(grpid)` invalidates every output of the group, and the
  loop invalidates K_cache_out, V_cache_out and output once more; the post graph's
  input row is written and its logits invalidated twice the same way.
- AXERA ax-llm (c26dcbb, src/runner/LLM.hpp and ax_model_runner_ax650.cpp): the same
  writes into uncached inputs; `inference(grpid)` does not invalidate, the loop does,
  once per output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BF16_BYTES = 2
INDEX_BYTES = 4


@dataclass
class DeviceTraffic:
    written: int = 0
    flushed: int = 0
    invalidated: int = 0

    def add(self, other: "DeviceTraffic") -> None:
        self.written += other.written
        self.flushed += other.flushed
        self.invalidated += other.invalidated

    def clear(self) -> None:
        self.written = self.flushed = self.invalidated = 0

    def copy(self) -> "DeviceTraffic":
        return DeviceTraffic(self.written, self.flushed, self.invalidated)

    def minus(self, earlier: "DeviceTraffic") -> "DeviceTraffic":
        return DeviceTraffic(self.written - earlier.written, self.flushed - earlier.flushed,
                             self.invalidated - earlier.invalidated)

    def per(self, steps: int) -> dict[str, int]:
        return {"written": self.written // steps, "flushed": self.flushed // steps,
                "invalidated": self.invalidated // steps}


def model_traffic(model: Any) -> DeviceTraffic:
    """Everything a model's board sessions and data path have counted so far."""
    total = DeviceTraffic()
    seen: set[int] = set()
    parts = [model.vision, *model.layers, model.post, getattr(model, "data_path", None)]
    for part in parts:
        traffic = getattr(part, "traffic", None)
        if traffic is not None and id(traffic) not in seen:
            seen.add(id(traffic))
            total.add(traffic)
    return total


def cpp_decode_traffic(n_layers: int, hidden: int, capacity: int, kv_dim: int, vocab: int,
                       runtime: str = "stackflow") -> DeviceTraffic:
    """Bytes per decode token of the C++ runtime named (`stackflow` or `ax-llm`); bf16 tensors."""
    row, kv_row = hidden * BF16_BYTES, kv_dim * BF16_BYTES
    per_layer_written = INDEX_BYTES + (capacity + 1) * BF16_BYTES + row + 2 * kv_row
    per_layer_invalidated = 2 * kv_row + row
    logits = vocab * BF16_BYTES
    times = {"stackflow": 2, "ax-llm": 1}[runtime]  # each output invalidated twice in StackFlow's loop
    return DeviceTraffic(written=n_layers * per_layer_written + row, flushed=0,
                         invalidated=times * (n_layers * per_layer_invalidated + logits))
