"""The zero-copy data path: the engine works in the graphs' own CMM buffers, as the C++ runtimes do.

pyaxengine's public `run()` memmoves every fed input into its CMM buffer and flushes the
whole buffer on every call, then invalidates and copies every whole output (see
npu/board/axengine_session.py). AXERA's and M5Stack's C++ runtimes instead keep each
layer's KV cache inside that layer's K_cache/V_cache input buffer and write one K and one
V row per token (StackFlow d9084ba main_vlm/src/runner/LLM.hpp, the decode loop; ax-llm
c26dcbb src/runner/LLM.hpp). This module does the same through the private names of
pyaxengine 0.1.2 / 0.1.3 (read at 3554448, axengine/_axe.py and _axe_capi.py):

- `session._sess` (AXEngineSession): `_io[0].pInputs[i]` / `pOutputs[i]` with `phyAddr`,
  `pVirAddr`, `nSize` (one buffer per tensor index, shared by every shape group, sized
  for the largest), `_handle[0]`, `_context[0]`, `_shape_count`;
- module `axengine._axe`: `sys_lib.AX_SYS_MflushCache(phy, vir, size)`,
  `sys_lib.AX_SYS_MinvalidateCache(phy, vir, size)`,
  `engine_lib.AX_ENGINE_RunGroupIOSync(handle, context, group, io)`,
  `engine_lib.AX_ENGINE_RunSyncV2(handle, context, io)` and `engine_cffi` (`buffer`, `cast`).

What it does per step (`ZeroCopyStack.run`):

- the KV cache *is* the layers' K_cache/V_cache input buffers (`kv_storage()` hands
  `KVCache` numpy views of them); a history group reads the first rows of the same buffer;
- only layer 0's input rows, the `indices`, the decode mask's newly opened slots (the
  whole mask only after a reset or a prefill chunk) and, after each layer, its new K and
  V rows are written; only those bytes are flushed, widened to whole 64-byte cache lines
  (the Cortex-A53's L1 D-cache line, Arm Cortex-A53 MPCore TRM "L1 data memory system";
  the AX630C's cores); only the K/V rows and the last row read are invalidated;
- every layer reads the mask and indices of layer 0's buffers, and layer l+1 reads its
  `input` straight from layer l's `output` buffer (their `pInputs` entries point there),
  so hidden states never make a host round trip between layers.

The post graph runs through `ZeroCopySession`: its input row written and flushed, its
outputs invalidated for their own size only and returned as views (no copy).
Everything counts into `DeviceTraffic` (npu/board/traffic.py). Whether this path is used
is decided in npu/board/data_path.py, after proving it against the public path.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from npu.board.axengine_session import PROVIDER_BOARD, AxEngineSession
from npu.board.traffic import DeviceTraffic
from npu.engine.kv_cache import KVCache
from npu.engine.stack import Cancelled, add_rows
from npu.session import SessionError, ShapeGroups, check_feed
from npu.shapes import GraphShapes

CACHE_LINE = 64
KNOWN_VERSIONS = ("0.1.2", "0.1.3")
LIBRARY_NAMES = {"sys_lib": ("AX_SYS_MflushCache", "AX_SYS_MinvalidateCache"),
                 "engine_lib": ("AX_ENGINE_RunGroupIOSync", "AX_ENGINE_RunSyncV2"), "engine_cffi": ("buffer", "cast")}


class ZeroCopyUnavailable(Exception):
    """The zero-copy path cannot run here; the message says why (logged once, then the public path)."""


@dataclass(frozen=True)
class Libraries:
    sys_lib: Any
    engine_lib: Any
    ffi: Any


def find_libraries(module: Any) -> Libraries:
    """`axengine._axe`'s cffi handles, or ZeroCopyUnavailable naming the missing one."""
    axe = sys.modules.get(f"{module.__name__}._axe") or getattr(module, "_axe", None)
    if axe is None:
        raise ZeroCopyUnavailable("pyaxengine's board module axengine._axe is not loaded")
    found = {}
    for handle, names in LIBRARY_NAMES.items():
        value = getattr(axe, handle, None)
        missing = [name for name in names if value is None or not hasattr(value, name)]
        if missing:
            raise ZeroCopyUnavailable(f"axengine._axe.{handle} lacks {', '.join(missing)}")
        found[handle] = value
    return Libraries(found["sys_lib"], found["engine_lib"], found["engine_cffi"])


class CmmBuffer:
    """One CMM buffer: a byte view of its host mapping and cache maintenance on byte ranges."""

    def __init__(self, io_buffer: Any, libs: Libraries, traffic: DeviceTraffic) -> None:
        self.entry = io_buffer
        self.phys = int(io_buffer.phyAddr)
        self.size = int(io_buffer.nSize)
        self.address = int(libs.ffi.cast("uintptr_t", io_buffer.pVirAddr))
        self.bytes = np.frombuffer(libs.ffi.buffer(io_buffer.pVirAddr, self.size), np.uint8)  # (size,)
        self._base = libs.ffi.cast("char *", io_buffer.pVirAddr)  # + offset: cffi pointer arithmetic, no cast per call
        self._libs, self._traffic = libs, traffic

    def view(self, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        count = int(np.prod(shape))
        return self.bytes[offset:offset + count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def _span(self, offset: int, nbytes: int) -> tuple[int, int]:
        """(start, size) of the whole cache lines covering the bytes, clipped to the buffer."""
        skew = self.address % CACHE_LINE
        start = max((offset + skew) // CACHE_LINE * CACHE_LINE - skew, 0)
        return start, min(-(-(offset + nbytes + skew) // CACHE_LINE) * CACHE_LINE - skew, self.size) - start

    def flush(self, offset: int, nbytes: int) -> None:
        # Whole cache lines: a partial line's other bytes are written back too, harmlessly.
        start, size = self._span(offset, nbytes)
        if self._libs.sys_lib.AX_SYS_MflushCache(self.phys + start, self._base + start, size) != 0:
            raise SessionError(f"AX_SYS_MflushCache failed on {size} bytes at {self.phys + start:#x}")
        self._traffic.flushed += size

    def invalidate(self, offset: int, nbytes: int) -> None:
        start, size = self._span(offset, nbytes)
        if self._libs.sys_lib.AX_SYS_MinvalidateCache(self.phys + start, self._base + start, size) != 0:
            raise SessionError(f"AX_SYS_MinvalidateCache failed on {size} bytes at {self.phys + start:#x}")
        self._traffic.invalidated += size

    def write(self, array: np.ndarray, offset: int = 0) -> None:
        """Store `array`'s bytes at `offset` and flush them."""
        source = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self.bytes[offset:offset + source.size] = source
        self._traffic.written += source.size
        self.flush(offset, source.size)


@dataclass
class Timer:
    seconds: float = 0.0


class GraphBuffers:
    """One session's private handles and its input/output buffers, by tensor name."""

    def __init__(self, session: AxEngineSession, libs: Libraries, traffic: DeviceTraffic, timer: Timer) -> None:
        self.timer = timer
        if session.provider != PROVIDER_BOARD:
            raise ZeroCopyUnavailable(f"{session.name} runs on {session.provider}: the card's memory is not"
                                      " mapped into this process")
        sess = getattr(session.raw, "_sess", None)
        try:
            io, handle, context, count = sess._io, sess._handle[0], sess._context[0], int(sess._shape_count)
            inputs = [io[0].pInputs[i] for i in range(len(session.inputs(0)))]
            outputs = [io[0].pOutputs[i] for i in range(len(session.outputs(0)))]
        except (AttributeError, TypeError, IndexError) as exc:
            raise ZeroCopyUnavailable(f"{session.name}: pyaxengine's session lacks _io/_handle/_context ({exc})")
        self.session, self.libs, self._io, self._handle, self._context = session, libs, io, handle, context
        self._multi_group = count > 1
        self.inputs = {spec.name: CmmBuffer(b, libs, traffic) for spec, b in zip(session.inputs(0), inputs)}
        self.outputs = {spec.name: CmmBuffer(b, libs, traffic) for spec, b in zip(session.outputs(0), outputs)}
        for kind, specs, buffers in (("input", session.inputs, self.inputs), ("output", session.outputs, self.outputs)):
            for group in range(session.num_groups):
                for spec in specs(group):
                    needed = int(np.prod(spec.shape)) * spec.dtype.itemsize
                    if buffers[spec.name].size < needed:
                        raise ZeroCopyUnavailable(f"{session.name}: {kind} {spec.name} buffer holds"
                                                  f" {buffers[spec.name].size} bytes, group {group} needs {needed}")

    def execute(self, group: int) -> None:
        started = time.perf_counter()
        if self._multi_group:
            ret = self.libs.engine_lib.AX_ENGINE_RunGroupIOSync(self._handle, self._context, group, self._io)
        else:
            ret = self.libs.engine_lib.AX_ENGINE_RunSyncV2(self._handle, self._context, self._io)
        self.timer.seconds += time.perf_counter() - started
        if ret != 0:
            raise SessionError(f"{self.session.name} group {group}: libax_engine run failed ({ret:#x})")

    def point_input_at(self, name: str, target: CmmBuffer) -> None:
        """Make the NPU read input `name` from `target` (another graph's buffer)."""
        entry = self.inputs[name].entry
        entry.phyAddr, entry.pVirAddr, entry.nSize = target.entry.phyAddr, target.entry.pVirAddr, target.entry.nSize
        self.inputs[name] = target


class ZeroCopySession(ShapeGroups):
    """A graph run in place: fed inputs written and flushed (their bytes only), outputs
    invalidated for the group's size and returned as views, valid until the next run."""

    def __init__(self, buffers: GraphBuffers, traffic: DeviceTraffic) -> None:
        session = buffers.session
        self.buffers, self.name, self.traffic = buffers, session.name, traffic
        self._inputs = [session.inputs(g) for g in range(session.num_groups)]
        self._outputs = [session.outputs(g) for g in range(session.num_groups)]

    def run(self, feed: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]:
        check_feed(self, feed, group)
        for spec in self._inputs[group]:
            self.buffers.inputs[spec.name].write(feed[spec.name])
        self.buffers.execute(group)
        results = []
        for spec in self._outputs[group]:
            buffer = self.buffers.outputs[spec.name]
            result = buffer.view(spec.dtype, spec.shape)
            buffer.invalidate(0, result.nbytes)
            results.append(result)
        return results


class ZeroCopyRuntime:
    """The zero-copy path of one model's layer sessions (and post): buffers, aliasing, KV storage.

    One engine at a time owns the KV storage (`kv_storage()` claims it); a stack of an
    engine that lost it refuses to run rather than share the cache.
    """

    name = "zero-copy"

    def __init__(self, layers: list[AxEngineSession], post: AxEngineSession, shapes: GraphShapes,
                 libs: Libraries) -> None:
        self.traffic = DeviceTraffic()
        self.npu = Timer()  # seconds inside libax_engine's run calls (the NPU's time, synchronous)
        self.shapes = shapes
        self.layers = [GraphBuffers(layer, libs, self.traffic, self.npu) for layer in layers]
        self.post = ZeroCopySession(GraphBuffers(post, libs, self.traffic, self.npu), self.traffic)
        self.chained = [False] * len(self.layers)
        self._saved: list[tuple] = []  # (io entry, its original fields, graph, input name, original buffer)
        self._owner = 0
        self._lock = threading.Lock()
        self.reason = ""

    # ------------------------------------------------------------------ binding

    def bind(self) -> None:
        """Share layer 0's mask and indices buffers and chain output -> input where the buffers fit."""
        first = self.layers[0]
        for index, layer in enumerate(self.layers[1:], start=1):
            for name in ("mask", "indices"):
                self._point(layer, name, first.inputs[name])
            previous = self.layers[index - 1].outputs["output"]
            groups = range(layer.session.num_groups)
            same_dtype = all(layer.session.inputs(g)[_index(layer.session.inputs(g), "input")].dtype ==
                             self.layers[index - 1].session.outputs(g)[_index(layer.session.outputs(g), "output")].dtype
                             for g in groups)
            if same_dtype and previous.size >= layer.inputs["input"].size:
                self._point(layer, "input", previous)
                self.chained[index] = True

    def _point(self, layer: GraphBuffers, name: str, target: CmmBuffer) -> None:
        entry = layer.inputs[name].entry
        self._saved.append((entry, (entry.phyAddr, entry.pVirAddr, entry.nSize), layer, name, layer.inputs[name]))
        layer.point_input_at(name, target)

    def unbind(self) -> None:
        """Put every input pointer back where pyaxengine allocated it."""
        for entry, (phy, vir, size), layer, name, original in reversed(self._saved):
            entry.phyAddr, entry.pVirAddr, entry.nSize = phy, vir, size
            layer.inputs[name] = original
        self._saved.clear()
        self.chained = [False] * len(self.layers)

    # ------------------------------------------------------------------ what the engine asks for

    def storage(self, n_layers: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        s = self.shapes
        shape = (1, s.capacity, s.kv_dim)
        layers = self.layers[:n_layers]
        return ([g.inputs["K_cache"].view(s.kv_dtype, shape) for g in layers],
                [g.inputs["V_cache"].view(s.kv_dtype, shape) for g in layers])

    def kv_storage(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        with self._lock:
            self._owner += 1
        return self.storage()

    def layer_stack(self, cache: KVCache, shapes: GraphShapes) -> "ZeroCopyStack":
        return ZeroCopyStack(self, cache, self._owner)

    @property
    def owner(self) -> int:
        return self._owner

    def poison(self, n_layers: int, pattern: int) -> None:
        """Fill the first layers' and the post graph's float buffers with `pattern`, host and device alike."""
        graphs = [*self.layers[:n_layers], self.post.buffers]
        buffers = {id(b): b for g in graphs for b in (*g.inputs.values(), *g.outputs.values())}
        for name in ("indices",):  # an index past the cache would be a fault, not a wrong answer
            for g in graphs:
                buffers.pop(id(g.inputs.get(name)), None)
        for buffer in buffers.values():
            buffer.bytes.fill(pattern)
            buffer.flush(0, buffer.size)
        self.traffic.clear()

    def clear_kv(self) -> None:
        """Zero every layer's K/V buffers: the NPU reads the rows past the position too (masked)."""
        for layer in self.layers:
            for name in ("K_cache", "V_cache"):
                buffer = layer.inputs[name]
                buffer.bytes.fill(0)
                buffer.flush(0, buffer.size)
        self.traffic.clear()

    def check_owner(self, owner: int) -> None:
        if owner != self._owner:
            raise SessionError("another Engine now holds this model's device buffers (its KV cache lives there):"
                               " use one Engine per loaded model")

    def describe(self) -> dict[str, Any]:
        shared = len(self.layers) > 1 and self.layers[1].inputs["mask"] is self.layers[0].inputs["mask"]
        return {"data_path": self.name, "reason": self.reason,
                "chained_layers": sum(self.chained), "shared_mask_and_indices": shared}


def _index(specs, name: str) -> int:
    return [spec.name for spec in specs].index(name)


class ZeroCopyStack:
    """The layer stack on the layers' own buffers (the contract of npu/engine/stack.py)."""

    def __init__(self, runtime: ZeroCopyRuntime, cache: KVCache, owner: int) -> None:
        s = runtime.shapes
        self.runtime, self.cache, self.owner = runtime, cache, owner
        self.layers = runtime.layers[:cache.n_layers]
        self._row_bytes = s.kv_dim * s.kv_dtype.itemsize
        self._hidden_bytes = s.hidden * s.act_dtype.itemsize
        self._mask_bytes = s.mask_dtype.itemsize
        self._mask_state: tuple[int, int] | None = None  # (cache.resets, position) the decode mask mirrors
        self._rows_state: int | None = None  # cache.resets whose rows were flushed
        first = self.layers[0]
        self._masks = [first.inputs["mask"]] if len(runtime.layers) > 1 and runtime.layers[1].inputs["mask"] is \
            first.inputs["mask"] else [g.inputs["mask"] for g in self.layers]
        self._indices = [first.inputs["indices"]] if len(self._masks) == 1 else [g.inputs["indices"] for g in self.layers]
        self._views = [[{spec.name: g.outputs[spec.name].view(spec.dtype, spec.shape)
                         for spec in g.session.outputs(group)} for group in range(g.session.num_groups)]
                       for g in self.layers]
        self._parts = [(g, g.outputs["K_cache_out"], g.outputs["V_cache_out"], g.inputs["K_cache"], g.inputs["V_cache"])
                       for g in self.layers]

    def run(self, group: int, feeds: list[dict[str, np.ndarray]], num_rows: int,
            should_stop: Callable[[], bool], added: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
        self.runtime.check_owner(self.owner)
        first = feeds[0]
        self.layers[0].inputs["input"].write(first["input"])
        for buffer in self._indices:
            buffer.write(first["indices"])
        if group == 0:
            self._sync_decode_mask()
        else:
            for buffer in self._masks:
                buffer.write(first["mask"])
            self._mask_state = None
        self._sync_rows()
        cache, rows = self.cache, num_rows * self._row_bytes
        at = cache.position * self._row_bytes
        chained = self.runtime.chained
        for index, (layer, k_out, v_out, k_in, v_in) in enumerate(self._parts):
            if should_stop():
                raise Cancelled
            through_host = added is not None and index - 1 in added  # the host adds rows to its input
            if index and (not chained[index] or through_host):  # this link's buffers differ: through the host
                output = self._views[index - 1][group]["output"]
                self.layers[index - 1].outputs["output"].invalidate(0, output.nbytes)
                layer.inputs["input"].write(add_rows(output, added[index - 1]) if through_host else output)
            layer.execute(group)
            views = self._views[index][group]
            k_out.invalidate(0, rows)
            v_out.invalidate(0, rows)
            cache.write(index, views["K_cache_out"], views["V_cache_out"], num_rows)
            k_in.flush(at, rows)
            v_in.flush(at, rows)
        self.runtime.traffic.written += 2 * rows * len(self._parts)
        last = self.layers[-1]
        last.outputs["output"].invalidate((num_rows - 1) * self._hidden_bytes, self._hidden_bytes)
        hidden = self._views[-1][group]["output"][:, num_rows - 1:num_rows]
        if added is not None and len(self.layers) - 1 in added:  # the last layer's rows: added on the host
            hidden = add_rows(hidden, added[len(self.layers) - 1][num_rows - 1:num_rows])
        return hidden

    def _sync_decode_mask(self) -> None:
        """Mirror the cache's decode mask into the mask buffer(s): the slots opened since the last
        step, or all of it after a reset, a restore or a prefill chunk."""
        cache, state = self.cache, self._mask_state
        mask = cache.decode_mask.reshape(-1)
        if state is None or state[0] != cache.resets or state[1] > cache.position:
            for buffer in self._masks:
                buffer.write(mask)
        elif cache.position > state[1]:
            opened = mask[state[1]:cache.position]
            for buffer in self._masks:
                buffer.write(opened, state[1] * self._mask_bytes)
        self._mask_state = (cache.resets, cache.position)

    def _sync_rows(self) -> None:
        """After a reset or restore, the rows the cache holds (a restored prefix) reach the device."""
        cache = self.cache
        if self._rows_state == cache.resets:
            return
        if cache.position:
            for layer in self.layers:
                for name in ("K_cache", "V_cache"):
                    layer.inputs[name].flush(0, cache.position * self._row_bytes)
            self.runtime.traffic.written += 2 * len(self.layers) * cache.position * self._row_bytes
        self._rows_state = cache.resets
