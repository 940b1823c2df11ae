"""libax_sys and libax_engine, emulated behind cffi-like handles (stand-in for axengine/_axe_capi.py).

The real module dlopens libax_sys.so / libax_engine.so through cffi and exports
`sys_lib`, `engine_lib` and `engine_cffi`; pyaxengine's `_axe.py` (and vlmd's zero-copy
path) call through them. Here they are ctypes/numpy emulations shaped the same way:

- `engine_cffi`: `new`, `cast("void *" | "char *" | "uintptr_t", ...)`, `buffer(ptr, size)`
  (a writable buffer over the host mapping), `memmove`, `NULL`. A pointer refuses `int()`
  like a cffi pointer does; `cast("uintptr_t", p)` gives its address; `char *` + n moves n bytes.
- CMM: `AX_SYS_MemAllocCached` hands out blocks with two copies of their bytes, the host
  mapping (what `pVirAddr` points at: real process memory, what numpy views see) and the
  "device" memory (what the NPU reads and writes, found by `phyAddr`). Only
  `AX_SYS_MflushCache` moves host bytes to the device and only `AX_SYS_MinvalidateCache`
  moves device bytes to the host, each over whole 64-byte cache lines (the Cortex-A53's
  L1 D-cache line: Arm Cortex-A53 MPCore TRM, "L1 data memory system"), so a write
  without its flush, or a read without its invalidate, gives the NPU or the host stale
  bytes: wrong tokens, not a silent pass. A flush whose `phyAddr` and `pVirAddr` name
  different places, or that runs past its block, fails (-1).
- `AX_ENGINE_RunGroupIOSync(handle, context, group, io)` / `AX_ENGINE_RunSyncV2(handle,
  context, io)`: read each input from the device memory at `io[0].pInputs[i].phyAddr`
  (the group's size from the start of the buffer, which must be at least that big), run
  the graph, write each output to the device memory at `pOutputs[i].phyAddr`. Any
  `phyAddr` works, as on the board, so buffers may be shared between sessions.
- `STATS` counts what the board would do: sessions, runs, bytes memmoved by `run()`,
  bytes flushed and invalidated (as asked by each call) and the calls, plus the seconds
  spent in the emulated NPU and in the emulated cache maintenance (for benchmarks that
  separate the host's own work from the library's).
"""

from __future__ import annotations

import bisect
import ctypes
import os
import time
from dataclasses import dataclass, fields

import numpy as np

CACHE_LINE = 64
ERROR = -1
_RUN_FAILED = 0x800B0001  # a nonzero AX_S32, as libax_engine returns on failure


@dataclass
class Stats:
    sessions_created: int = 0
    runs: int = 0
    bytes_in: int = 0  # memmoved into CMM by InferenceSession.run
    bytes_flushed: int = 0
    bytes_invalidated: int = 0
    flush_calls: int = 0
    invalidate_calls: int = 0
    npu_seconds: float = 0.0
    cache_op_seconds: float = 0.0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())


STATS = Stats()


# ------------------------------------------------------------------ cffi-like values


class VoidPointer:
    """A cdata 'void *'."""

    __slots__ = ("address",)

    def __init__(self, address: int) -> None:
        self.address = int(address)

    def __int__(self) -> int:
        raise TypeError("int() not supported on cdata 'void *'")

    def __bool__(self) -> bool:
        return self.address != 0

    def __eq__(self, other) -> bool:
        return isinstance(other, VoidPointer) and other.address == self.address

    def __hash__(self) -> int:
        return hash(self.address)

    def __repr__(self) -> str:
        return f"<cdata 'void *' {self.address:#x}>"


class CharPointer(VoidPointer):
    """A cdata 'char *': adding an int moves it by that many bytes."""

    __slots__ = ()

    def __add__(self, offset: int) -> "CharPointer":
        return CharPointer(self.address + int(offset))

    def __repr__(self) -> str:
        return f"<cdata 'char *' {self.address:#x}>"


class Integer:
    """A cdata of an integer type (what `cast("uintptr_t", p)` returns)."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = int(value)

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __repr__(self) -> str:
        return f"<cdata 'uintptr_t' {self.value}>"


def _address(value) -> int:
    if isinstance(value, VoidPointer):
        return value.address
    if isinstance(value, Integer):
        return value.value
    if isinstance(value, (int, np.integer)):
        return int(value)
    raise TypeError(f"initializer for ctype 'void *' must be a cdata pointer, not {type(value).__name__}")


class IoBuffer:
    """AX_ENGINE_IO_BUFFER_T: the fields vlmd and pyaxengine use."""

    __slots__ = ("phyAddr", "pVirAddr", "nSize", "pStride", "nStrideSize")

    def __init__(self) -> None:
        self.phyAddr, self.pVirAddr, self.nSize, self.pStride, self.nStrideSize = 0, VoidPointer(0), 0, None, 0


class IoStruct:
    """AX_ENGINE_IO_T."""

    __slots__ = ("pInputs", "nInputSize", "pOutputs", "nOutputSize", "nBatchSize", "pIoSetting")

    def __init__(self) -> None:
        self.pInputs, self.nInputSize, self.pOutputs, self.nOutputSize = [], 0, [], 0
        self.nBatchSize, self.pIoSetting = 0, None


class FFI:
    NULL = VoidPointer(0)

    def new(self, ctype: str, init=None):
        ctype = ctype.replace(" ", "")
        if ctype == "AX_ENGINE_IO_T*":
            return [IoStruct()]
        if ctype.startswith("AX_ENGINE_IO_BUFFER_T["):
            return [IoBuffer() for _ in range(int(ctype[len("AX_ENGINE_IO_BUFFER_T["):-1]))]
        if ctype in ("uint64_t**", "AX_VOID**"):
            return [self.NULL]
        if ctype in ("AX_U64*", "AX_U32*"):
            return [0]
        if ctype in ("AX_S8[]", "char[]"):
            return bytes(init or b"")
        raise NotImplementedError(f"stand-in FFI.new({ctype!r})")

    def cast(self, ctype: str, value):
        ctype = ctype.replace(" ", "")
        if ctype in ("void*", "AX_VOID*"):
            return VoidPointer(_address(value))
        if ctype == "char*":
            return CharPointer(_address(value))
        if ctype in ("uintptr_t", "uint64_t", "AX_U64", "size_t"):
            return Integer(_address(value))
        raise NotImplementedError(f"stand-in FFI.cast({ctype!r})")

    def buffer(self, pointer, size: int) -> memoryview:
        return memoryview((ctypes.c_char * int(size)).from_address(_address(pointer))).cast("B")

    def memmove(self, dest, src, n: int) -> None:
        ctypes.memmove(_address(dest), _address(src), int(n))


engine_cffi = FFI()
sys_cffi = engine_cffi


# ------------------------------------------------------------------ CMM


class _Block:
    def __init__(self, phys: int, size: int, align: int) -> None:
        self.phys, self.size = phys, size
        self._raw = np.zeros(size + align, np.uint8)  # host memory, over-allocated to align pVirAddr
        start = (-self._raw.ctypes.data) % align
        self.host = self._raw[start:start + size]  # (size,) what the host's cache and pVirAddr see
        self.address = self.host.ctypes.data
        self.device = np.zeros(size, np.uint8)  # (size,) what the NPU sees


class _Cmm:
    def __init__(self) -> None:
        self._next_phys = 0x1_4000_0000
        self._by_phys: list[tuple[int, _Block]] = []
        self._by_virt: list[tuple[int, _Block]] = []

    def alloc(self, size: int, align: int) -> _Block:
        align = max(int(align), CACHE_LINE)
        phys = -(-self._next_phys // align) * align
        block = _Block(phys, int(size), align)
        self._next_phys = phys + block.size
        self._by_phys.append((phys, block))  # increasing: stays sorted
        bisect.insort(self._by_virt, (block.address, block), key=lambda entry: entry[0])
        return block

    @staticmethod
    def _find(index: list[tuple[int, _Block]], address: int) -> tuple[_Block, int] | None:
        at = bisect.bisect_right(index, address, key=lambda entry: entry[0]) - 1
        if at < 0:
            return None
        start, block = index[at]
        offset = address - start
        return (block, offset) if offset < block.size else None

    def by_phys(self, phys: int):
        return self._find(self._by_phys, int(phys))

    def by_virt(self, address: int):
        return self._find(self._by_virt, address)


CMM = _Cmm()


def _lines(block: _Block, offset: int, size: int) -> tuple[int, int]:
    """The cache lines [start, end) covering [offset, offset + size), clipped to the block."""
    line_start = (block.address + offset) // CACHE_LINE * CACHE_LINE - block.address
    line_end = -(-(block.address + offset + size) // CACHE_LINE) * CACHE_LINE - block.address
    return max(line_start, 0), min(line_end, block.size)


def _maintained(phy, vir, size):
    size = int(size)
    found = CMM.by_phys(phy)
    if found is None or size < 0:
        return None
    block, offset = found
    virt = CMM.by_virt(_address(vir))
    if virt is None or virt[0] is not block or virt[1] != offset or offset + size > block.size:
        return None
    return block, offset, size


class _SysLib:
    """libax_sys: init, CMM allocation and cache maintenance."""

    def AX_SYS_Init(self) -> int:
        return 0

    def AX_SYS_Deinit(self) -> int:
        return 0

    def AX_SYS_MemAllocCached(self, phy_out, vir_out, size, align, token) -> int:
        block = CMM.alloc(int(size), int(align))
        phy_out[0], vir_out[0] = block.phys, VoidPointer(block.address)
        return 0

    def AX_SYS_MemFree(self, phy, vir) -> int:
        return 0  # pyaxengine never frees its session buffers

    def AX_SYS_MflushCache(self, phy, vir, size) -> int:
        return _maintain(phy, vir, size, to_device=True)

    def AX_SYS_MinvalidateCache(self, phy, vir, size) -> int:
        return _maintain(phy, vir, size, to_device=False)


def _maintain(phy, vir, size, to_device: bool) -> int:
    """Copy whole cache lines host -> device (flush) or device -> host (invalidate)."""
    started = time.perf_counter()
    found = _maintained(phy, vir, size)
    if found is None:
        return ERROR
    block, offset, size = found
    start, end = _lines(block, offset, size)
    if to_device:
        block.device[start:end] = block.host[start:end]
        STATS.bytes_flushed += size
        STATS.flush_calls += 1
    else:
        block.host[start:end] = block.device[start:end]
        STATS.bytes_invalidated += size
        STATS.invalidate_calls += 1
    STATS.cache_op_seconds += time.perf_counter() - started
    return 0


class _Handle:
    """An engine handle (uint64_t *): the loaded graph and its per-group tensor specs."""

    def __init__(self, graph, inputs, outputs) -> None:
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class _EngineLib:
    """libax_engine: version, run. Model loading is done by the stand-in session itself."""

    def AX_ENGINE_GetVersion(self) -> str:
        # A made-up version string; the real one is the board's libax_engine build.
        return os.environ.get("VLMD_STANDIN_ENGINE_VERSION", "2.12.0s")

    def AX_ENGINE_RunSyncV2(self, handle, context, io) -> int:
        return self.AX_ENGINE_RunGroupIOSync(handle, context, 0, io)

    def AX_ENGINE_RunGroupIOSync(self, handle, context, group, io) -> int:
        started = time.perf_counter()
        try:
            return self._run(handle, int(group), io)
        finally:
            STATS.npu_seconds += time.perf_counter() - started

    @staticmethod
    def _device(buffer: IoBuffer, nbytes: int) -> np.ndarray | None:
        found = CMM.by_phys(buffer.phyAddr)
        if found is None or buffer.nSize < nbytes or found[1] + nbytes > found[0].size:
            return None
        block, offset = found
        return block.device[offset:offset + nbytes]

    def _run(self, handle, group: int, io) -> int:
        if not isinstance(handle, _Handle) or not 0 <= group < len(handle.inputs):
            return _RUN_FAILED
        io0 = io[0]
        if len(io0.pInputs) != len(handle.inputs[group]) or len(io0.pOutputs) != len(handle.outputs[group]):
            return _RUN_FAILED
        feed = {}
        for spec, buffer in zip(handle.inputs[group], io0.pInputs):
            memory = self._device(buffer, spec.nbytes)
            if memory is None:
                return _RUN_FAILED
            feed[spec.name] = memory.view(spec.dtype).reshape(spec.shape).copy()
        targets = []
        for spec, buffer in zip(handle.outputs[group], io0.pOutputs):
            memory = self._device(buffer, spec.nbytes)
            if memory is None:
                return _RUN_FAILED
            targets.append(memory)
        for memory, result in zip(targets, handle.graph.run(feed, group)):
            memory[:] = np.ascontiguousarray(result).reshape(-1).view(np.uint8)
        STATS.runs += 1
        return 0


sys_lib = _SysLib()
engine_lib = _EngineLib()
