"""AXEngineSession (stand-in for axengine/_axe.py at 3554448, 0.1.3.rc3, and the releases in _release.py).

Shaped as the real one, so code that reaches into it finds the same names:

- module level: `sys_lib`, `engine_lib`, `engine_cffi` (from _axe_capi); importing the
  module initialises the engine and prints `[INFO] Chip type`, `[INFO] VNPU type`,
  `[INFO] Engine version` to stdout.
- per session: `_handle[0]`, `_context[0]`, `_shape_count`, `_inputs` / `_outputs`
  (NodeArg lists per group: numpy dtypes, shapes as lists), and `_io[0]` with
  `pInputs[i]` / `pOutputs[i]` (`phyAddr`, `pVirAddr`, `nSize`): ONE cached CMM buffer
  per input (output) index, shared by every shape group and sized for the largest
  group's tensor, allocated with `AX_SYS_MemAllocCached(..., align=128, "PyEngine")`.
  Creating a session prints `[INFO] Model type` and `[INFO] Compiler version`.
- `run(output_names, input_feed, run_options=None, shape_group=0)`: validates names
  (group 0's), checks the group, then for each fed array asserts its shape and dtype,
  memmoves its bytes into the input's buffer and flushes the WHOLE buffer (`nSize`);
  runs `AX_ENGINE_RunGroupIOSync` (more than one group) or `AX_ENGINE_RunSyncV2`;
  invalidates each output's whole buffer and returns its bytes (copied, from 0.1.3 on).
  Output order: `ranks = [output_names.index(n) for n in graph order]`, then output
  `i` for `i` in ranks: a subset of names raises ValueError, a permuted list returns
  the wrong tensors (0.1.3.rc3); older releases return the names asked, in graph order.
- With $VLMD_STANDIN_NO_BF16=1 the emulated libax_engine predates bf16 (AX620E SDK < 3.12,
  AX650 SDK < 2.18, per pyaxengine's README since 0c655ac): it reports bf16 tensors as
  AX_ENGINE_DT_UNKNOWN (0) and session creation fails with "Unsupported data type '0'.".
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._axe_capi import STATS, IoStruct, _Handle, engine_cffi, engine_lib, sys_lib
from ._base_session import Session, SessionOptions
from ._graphs import BF16, GraphSpec, graph_for, load_spec
from ._node import NodeArg
from ._release import RELEASE

__all__ = ["AXEngineSession"]

_DT_UNKNOWN = 0


def _transform_dtype(dtype: np.dtype) -> np.dtype:
    if np.dtype(dtype) == BF16 and os.environ.get("VLMD_STANDIN_NO_BF16") == "1":
        raise ValueError(f"Unsupported data type '{_DT_UNKNOWN}'.")
    return np.dtype(dtype)


def _initialize_engine() -> None:
    sys_lib.AX_SYS_Init()
    print("[INFO] Chip type: ChipType.MC20E")
    print("[INFO] VNPU type: VNPUType.DISABLED")
    print(f"[INFO] Engine version: {engine_lib.AX_ENGINE_GetVersion()}")


_initialize_engine()


def _as_specs(groups) -> list[list[GraphSpec]]:
    return [[GraphSpec(s.name, tuple(s.shape), np.dtype(s.dtype)) for s in group] for group in groups]


class AXEngineSession(Session):
    def __init__(self, path_or_bytes: Any, sess_options: SessionOptions | None = None,
                 provider_options: Any = None, **kwargs: Any) -> None:
        super().__init__()
        self._handle = engine_cffi.new("uint64_t **")
        self._context = engine_cffi.new("uint64_t **")
        self._io = engine_cffi.new("AX_ENGINE_IO_T *")
        graph = graph_for(load_spec(path_or_bytes))
        print("[INFO] Model type: 1 (full core)")
        self._shape_count = graph.num_groups
        inputs = _as_specs(graph.inputs(g) for g in range(self._shape_count))
        outputs = _as_specs(graph.outputs(g) for g in range(self._shape_count))
        self._handle[0] = _Handle(graph, inputs, outputs)
        self._context[0] = engine_cffi.cast("void *", id(self))
        print("[INFO] Compiler version: 3.4 standin")
        self._inputs = [[NodeArg(s.name, _transform_dtype(s.dtype), list(s.shape)) for s in g] for g in inputs]
        self._outputs = [[NodeArg(s.name, _transform_dtype(s.dtype), list(s.shape)) for s in g] for g in outputs]
        self._align = 128
        self._cmm_token = engine_cffi.new("AX_S8[]", b"PyEngine")
        io: IoStruct = self._io[0]
        io.nInputSize, io.nOutputSize = len(inputs[0]), len(outputs[0])
        io.pInputs = engine_cffi.new(f"AX_ENGINE_IO_BUFFER_T[{io.nInputSize}]")
        io.pOutputs = engine_cffi.new(f"AX_ENGINE_IO_BUFFER_T[{io.nOutputSize}]")
        for buffers, per_group in ((io.pInputs, inputs), (io.pOutputs, outputs)):
            for i, buffer in enumerate(buffers):
                buffer.nSize = max(group[i].nbytes for group in per_group)  # the largest group's tensor
                phy, vir = engine_cffi.new("AX_U64*"), engine_cffi.new("AX_VOID**")
                if sys_lib.AX_SYS_MemAllocCached(phy, vir, buffer.nSize, self._align, self._cmm_token) != 0:
                    raise RuntimeError("Failed to allocate memory for input.")
                buffer.phyAddr, buffer.pVirAddr = phy[0], vir[0]
        STATS.sessions_created += 1

    def _execute(self, shape_group: int) -> int:
        if self._shape_count > 1:
            return engine_lib.AX_ENGINE_RunGroupIOSync(self._handle[0], self._context[0], shape_group, self._io)
        return engine_lib.AX_ENGINE_RunSyncV2(self._handle[0], self._context[0], self._io)

    def _fill_inputs(self, input_feed: dict[str, np.ndarray], shape_group: int) -> None:
        io = self._io[0]
        for key, npy in input_feed.items():
            for i, one in enumerate(self.get_inputs(shape_group)):
                if one.name == key:
                    npy = self._check_input(key, npy, one)
                    engine_cffi.memmove(io.pInputs[i].pVirAddr, engine_cffi.cast("void *", npy.ctypes.data), npy.nbytes)
                    STATS.bytes_in += npy.nbytes
                    sys_lib.AX_SYS_MflushCache(io.pInputs[i].phyAddr, io.pInputs[i].pVirAddr, io.pInputs[i].nSize)
                    break

    def _read_output(self, i: int, shape_group: int, size: int | None = None) -> np.ndarray:
        io, spec = self._io[0], self.get_outputs(shape_group)[i]
        sys_lib.AX_SYS_MinvalidateCache(io.pOutputs[i].phyAddr, io.pOutputs[i].pVirAddr, io.pOutputs[i].nSize)
        nbytes = spec.dtype.itemsize * int(np.prod(spec.shape)) if size is None else size
        npy = np.frombuffer(engine_cffi.buffer(io.pOutputs[i].pVirAddr, nbytes), dtype=spec.dtype).reshape(spec.shape)
        return npy.copy() if RELEASE.copies_outputs else npy

    def _run(self, output_names, input_feed, shape_group: int) -> list[np.ndarray]:
        output_names = self._start_run(output_names, input_feed, shape_group)
        self._fill_inputs(input_feed, shape_group)
        if self._execute(shape_group) != 0:
            raise RuntimeError("Failed to run model.")
        picked = self._picked_outputs(output_names, shape_group, RELEASE.subset_outputs_fail)
        return [self._read_output(i, shape_group) for i in picked]

    if RELEASE.shape_groups:
        def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray], run_options=None,
                shape_group: int = 0) -> list[np.ndarray]:
            return self._run(output_names, input_feed, shape_group)
    else:
        def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray],
                run_options=None) -> list[np.ndarray]:
            # 0.1.1: group 0's checks, RunSyncV2, outputs viewed over the whole buffer.
            self._validate_input(input_feed)
            self._validate_output(output_names)
            names = output_names or [o.name for o in self.get_outputs()]
            self._fill_inputs(input_feed, 0)
            if engine_lib.AX_ENGINE_RunSyncV2(self._handle[0], self._context[0], self._io) != 0:
                raise RuntimeError("Failed to run model.")
            io = self._io[0]
            return [self._read_output(i, 0, io.pOutputs[i].nSize) for i, o in enumerate(self.get_outputs())
                    if o.name in names]
