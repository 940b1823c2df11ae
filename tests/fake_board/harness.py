"""The fake board libraries (ax_sys.c, ax_engine.c) compiled, loaded, and given their graphs.

`build(out)` compiles libax_sys.so and libax_engine.so with gcc (each with its SONAME;
libax_engine.so needs libax_sys.so, found beside it by its RUNPATH). `FakeBoard(out)`
loads them and registers the engine's callbacks:

- a model file is what the Python stand-in reads today (tests/axengine_standin/axengine/
  _graphs.py, loaded here as a plain module, not as `axengine`): its spec's graph answers
  the engine's io-info (names, shapes, dtypes per shape group, in graph order) and its
  runs. A spec may carry `"model_type"` (MC20E: 0 half core, 1 full core; default 1) and
  `"test_graph": KEY` to run a graph a test registered in `FakeBoard.graphs[KEY]`.
- a run hands the callback pointers to the DEVICE copies of the inputs and outputs; the
  inputs are copied out, the graph runs, its results (checked against the declared shapes
  and dtypes) are written into the output device copies.

An exception inside a callback cannot cross C: it makes the call fail (the engine returns
an error) and is kept in `errors`, which the fixtures check after each test.

How pyaxengine finds the libraries (AXERA-TECH/pyaxengine 3554448, axengine/_providers.py
and _axe_capi.py): `ctypes.util.find_library("ax_engine")` / `("ax_sys")` / `("axcl_rt")`,
then `cffi.FFI().dlopen(<what find_library returned>)`. On Linux find_library answers the
library's SONAME ("libax_engine.so") when ldconfig, gcc (LIBRARY_PATH) or ld
(LD_LIBRARY_PATH) finds it; `library_env()` gives the variables that make gcc and ld find
the fakes, and because the libraries are loaded here first (RTLD_GLOBAL), the dynamic
loader answers pyaxengine's dlopen of that SONAME with them: no system directory is touched.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
GRAPHS_SOURCE = HERE.parent / "axengine_standin" / "axengine" / "_graphs.py"
SOURCES = {"libax_sys.so": ["ax_sys.c"], "libax_engine.so": ["ax_engine.c"]}

# AX_ENGINE_DATA_TYPE_T codes (pyaxengine's cdef) by numpy dtype name.
DTYPE_CODES = {"uint8": 1, "uint16": 2, "float32": 3, "int16": 4, "int8": 5, "int32": 6, "uint32": 7,
               "float64": 8, "bfloat16": 9}
FULL_CORE = 1


def gcc() -> str | None:
    return shutil.which("gcc")


def build(out: Path) -> Path:
    """Compile both libraries into `out` (warnings are errors); returns `out`."""
    compiler = gcc()
    if compiler is None:
        raise RuntimeError("gcc is not installed")
    out.mkdir(parents=True, exist_ok=True)
    common = [compiler, "-shared", "-fPIC", "-O1", "-g", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror",
              "-I", str(HERE)]
    subprocess.run([*common, "-o", str(out / "libax_sys.so"), "-Wl,-soname,libax_sys.so", str(HERE / "ax_sys.c"),
                    "-lpthread"], check=True, capture_output=True, text=True)
    subprocess.run([*common, "-o", str(out / "libax_engine.so"), "-Wl,-soname,libax_engine.so",
                    str(HERE / "ax_engine.c"), "-L", str(out), "-lax_sys", "-Wl,-rpath,$ORIGIN", "-lpthread"],
                   check=True, capture_output=True, text=True)
    return out


def library_env(out: Path) -> dict[str, str]:
    """What makes `ctypes.util.find_library` find the fakes in `out` (gcc's and ld's search paths)."""
    return {"LIBRARY_PATH": str(out), "LD_LIBRARY_PATH": str(out)}


def _load_graphs_module() -> Any:
    spec = importlib.util.spec_from_file_location("vlmd_fake_board_graphs", GRAPHS_SOURCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class SysStats:
    allocs: int
    frees: int
    alloc_bytes: int
    live_bytes: int
    flush_calls: int
    flushed_bytes: int
    invalidate_calls: int
    invalidated_bytes: int
    refused_calls: int
    inits: int
    deinits: int


@dataclass
class EngineStats:
    handles: int
    contexts: int
    destroyed: int
    runs: int
    refused_runs: int


def _struct(cls) -> type:
    return type(cls.__name__ + "C", (ctypes.Structure,), {"_fields_": [(f.name, ctypes.c_uint64) for f in fields(cls)]})


_SysStatsC, _EngineStatsC = _struct(SysStats), _struct(EngineStats)
_U8P = ctypes.POINTER(ctypes.c_void_p)
MODEL_TYPE_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_uint32)
LOAD_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint32)
RUN_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint32, _U8P, _U8P)
UNLOAD_FN = ctypes.CFUNCTYPE(None, ctypes.c_uint64)
# Every callback handed to C stays referenced for the process: sessions vlmd keeps open are
# destroyed (AX_ENGINE_DestroyHandle -> unload) as late as interpreter exit.
_KEPT: list = []


class FakeBoard:
    """The loaded fake libraries and the graphs of the models they have loaded."""

    def __init__(self, out: Path) -> None:
        self.dir = out
        self.sys = ctypes.CDLL(str(out / "libax_sys.so"), mode=ctypes.RTLD_GLOBAL)
        self.engine = ctypes.CDLL(str(out / "libax_engine.so"), mode=ctypes.RTLD_GLOBAL)
        self._graphs_module = _load_graphs_module()
        self.graphs: dict[str, Any] = {}  # test graphs by key (a spec's "test_graph")
        self.models: dict[int, Any] = {}  # engine model id -> graph
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.engine.FAKE_ENGINE_Layout.restype = ctypes.c_uint64
        self.engine.FAKE_ENGINE_Layout.argtypes = [ctypes.c_char_p]
        self.engine.FAKE_ENGINE_AddTensor.restype = ctypes.c_int32
        self.engine.FAKE_ENGINE_AddTensor.argtypes = [ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int32,
                                                      ctypes.c_char_p, ctypes.c_int32, ctypes.c_uint32,
                                                      ctypes.POINTER(ctypes.c_int32)]
        self.sys.FAKE_SYS_Host.restype = ctypes.c_void_p
        self.sys.FAKE_SYS_Host.argtypes = [ctypes.c_uint64]
        self.sys.FAKE_SYS_Device.restype = ctypes.c_void_p
        self.sys.FAKE_SYS_Device.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
        # Kept referenced: the C side holds these pointers for the process's life.
        self._callbacks = (MODEL_TYPE_FN(self._model_type), LOAD_FN(self._load), RUN_FN(self._run),
                           UNLOAD_FN(self._unload))
        _KEPT.append((self, self._callbacks))
        self.engine.FAKE_ENGINE_SetCallbacks(*self._callbacks)

    # ------------------------------------------------------------------ what tests read

    def layout(self, what: str) -> int:
        return int(self.engine.FAKE_ENGINE_Layout(what.encode()))

    def sys_stats(self) -> SysStats:
        raw = _SysStatsC()
        self.sys.FAKE_SYS_GetStats(ctypes.byref(raw))
        return SysStats(*(int(getattr(raw, f.name)) for f in fields(SysStats)))

    def engine_stats(self) -> EngineStats:
        raw = _EngineStatsC()
        self.engine.FAKE_ENGINE_GetStats(ctypes.byref(raw))
        return EngineStats(*(int(getattr(raw, f.name)) for f in fields(EngineStats)))

    def reset_sys_stats(self) -> None:
        self.sys.FAKE_SYS_ResetStats()

    def device_bytes(self, phys: int, nbytes: int) -> np.ndarray:
        """A view of the device copy of `nbytes` at physical address `phys`."""
        address = self.sys.FAKE_SYS_Device(phys, nbytes)
        if not address:
            raise ValueError(f"{nbytes} bytes at {phys:#x} are not in one CMM block")
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))

    def take_errors(self) -> list[BaseException]:
        with self._lock:
            errors, self.errors = self.errors, []
        return errors

    # ------------------------------------------------------------------ the callbacks

    def _spec(self, data: int, size: int) -> dict:
        return self._graphs_module.load_spec(ctypes.string_at(data, size))

    def _graph(self, spec: dict) -> Any:
        if "test_graph" in spec:
            if spec["test_graph"] not in self.graphs:
                raise RuntimeError("Failed to load model.")
            return self.graphs[spec["test_graph"]]
        return self._graphs_module.graph_for(spec)

    def _model_type(self, data: int, size: int) -> int:
        try:
            return int(self._spec(data, size).get("model_type", FULL_CORE))
        except RuntimeError:  # not a model file: the engine refuses it
            return -1
        except BaseException as exc:  # noqa: BLE001 - nothing may cross into C
            self.errors.append(exc)
            return -1

    def _load(self, model: int, data: int, size: int) -> int:
        try:
            graph = self._graph(self._spec(data, size))
        except RuntimeError:
            return -1
        except BaseException as exc:  # noqa: BLE001
            self.errors.append(exc)
            return -1
        try:
            for group in range(graph.num_groups):
                for is_output, specs in ((0, graph.inputs(group)), (1, graph.outputs(group))):
                    for spec in specs:
                        shape = (ctypes.c_int32 * len(spec.shape))(*spec.shape)
                        ret = self.engine.FAKE_ENGINE_AddTensor(model, group, is_output, spec.name.encode(),
                                                                DTYPE_CODES[np.dtype(spec.dtype).name],
                                                                len(spec.shape), shape)
                        if ret != 0:
                            raise RuntimeError(f"FAKE_ENGINE_AddTensor({spec}) failed: {ret:#x}")
        except BaseException as exc:  # noqa: BLE001
            self.errors.append(exc)
            return -1
        with self._lock:
            self.models[model] = graph
        return 0

    def _run(self, model: int, group: int, inputs, outputs) -> int:
        try:
            graph = self.models[model]
            feed = {}
            for i, spec in enumerate(graph.inputs(group)):
                feed[spec.name] = self._array(inputs[i], spec).copy()
            results = graph.run(feed, group)
            specs = graph.outputs(group)
            if len(results) != len(specs):
                raise RuntimeError(f"graph returned {len(results)} outputs for {len(specs)}")
            for i, (spec, result) in enumerate(zip(specs, results)):
                result = np.asarray(result)
                if result.dtype != np.dtype(spec.dtype) or tuple(result.shape) != tuple(spec.shape):
                    raise RuntimeError(f"graph output {spec.name}: {result.dtype}{list(result.shape)},"
                                       f" declared {np.dtype(spec.dtype)}{list(spec.shape)}")
                self._array(outputs[i], spec)[...] = result
            return 0
        except BaseException as exc:  # noqa: BLE001
            self.errors.append(exc)
            return -1

    @staticmethod
    def _array(address: int, spec: Any) -> np.ndarray:
        dtype = np.dtype(spec.dtype)
        nbytes = int(np.prod(spec.shape)) * dtype.itemsize
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))
        return raw.view(dtype).reshape(spec.shape)

    def _unload(self, model: int) -> None:
        with self._lock:
            self.models.pop(model, None)
