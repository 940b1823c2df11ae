"""`AxEngineSession`: one compiled `.axmodel` graph run through AXERA's `axengine` (the public path).

axengine (the pyaxengine wheel from AXERA's releases) exists only on a board or a host
with an AXCL card; it is imported (quietly, npu/board/pyaxengine.py) when a session is
opened, never at module import, so development machines load this module fine.

What this module relies on, read from AXERA-TECH/pyaxengine at 3554448 (2026-03-24,
0.1.3.rc3: axengine/_session.py, _base_session.py, _axe.py, _axclrt.py, _node.py,
_providers.py):

- `InferenceSession(path_or_bytes, sess_options=None, providers=None,
  provider_options=None)`; `providers` is a name or a list; the AXCLRT provider reads
  `device_id` from the first `provider_options` dict.
- `get_inputs(shape_group)` / `get_outputs(shape_group)` return `NodeArg(name, dtype,
  shape)`; dtype is a numpy dtype (bf16 as `ml_dtypes.bfloat16`), shape a list. There is
  no public group count: a group past the last one raises (ValueError or IndexError,
  depending on how far past).
- `run(output_names, input_feed, run_options=None, shape_group=0)` returns a list of
  arrays in graph order (views of its buffers before 0.1.3, copies since). It checks only
  that group 0's input names are present and asserts each fed array's shape and dtype; it
  memmoves every fed input into that input's one CMM buffer (shared by every group, sized
  for the largest), flushes the whole buffer, and invalidates every whole output buffer;
  with a subset of `output_names` it indexes outputs by the wrong list (108722c): always
  pass None. 0.1.1's `run` has no shape_group (refused for multi-group graphs, see
  `check_groups`).
- `_io[0].pInputs` / `pOutputs` are C arrays of group 0's length (cffi pointers: no
  bounds check), which `run()` indexes by the position of each input in the requested
  group: a group with more inputs or outputs than group 0 would make it write past the
  array. The fake libax_engine and the stand-in cannot show what AXERA's does then; vlmd
  refuses such a graph when it opens it (`check_group_counts`).
- `open()` + `mmap.mmap(fileno, 0)` of the model file: an empty file raises ValueError
  ("cannot mmap an empty file"), so vlmd checks the size first and names the file.
- A session allocates its buffers in CMM (AX_SYS_MemAllocCached) and its unload destroys
  the engine handle but never frees them, so a session re-created per load or per
  request leaks NPU memory: sessions are opened once per graph per process
  (`open_session`).

`traffic` counts what pyaxengine does with device memory on each `run` (bytes memmoved
in, whole buffers flushed, whole outputs invalidated), from the buffer sizes it allocated.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from npu.board.pyaxengine import (
    PROVIDER_BOARD,
    PROVIDER_PCIE,
    AxEngineUnavailable,
    AxEngineUnsupported,
    check_groups,
    choose_provider,
    explain_load_error,
    import_axengine,
    quiet,
)
from npu.board.traffic import DeviceTraffic
from npu.session import BF16, SessionError, ShapeGroups, TensorSpec, check_feed

__all__ = ["PROVIDER_BOARD", "PROVIDER_PCIE", "AxEngineSession", "AxEngineUnavailable", "AxEngineUnsupported",
           "is_open", "open_session", "open_session_count", "provider_arguments", "read_shape_groups"]

# More shape groups than any llm_build output has; stops the probe on a runtime that ignores shape_group.
MAX_SHAPE_GROUPS = 64
provider_arguments = choose_provider  # the name earlier callers use


def _spec(node: Any) -> TensorSpec:
    dtype = node.dtype
    # Older wheels report dtype names as strings; "bfloat16" resolves once ml_dtypes is imported.
    dtype = BF16 if str(dtype) in ("bfloat16", "bf16") else np.dtype(dtype)
    return TensorSpec(str(node.name), tuple(int(d) for d in node.shape), dtype)


def read_shape_groups(session: Any) -> tuple[list[list[TensorSpec]], list[list[TensorSpec]]]:
    """Probe `get_inputs(g)` / `get_outputs(g)` for g = 0, 1, ... until the session refuses."""
    inputs: list[list[TensorSpec]] = []
    outputs: list[list[TensorSpec]] = []
    for group in range(MAX_SHAPE_GROUPS):
        try:
            group_inputs = [_spec(n) for n in session.get_inputs(group)]
            group_outputs = [_spec(n) for n in session.get_outputs(group)]
        except (ValueError, IndexError):
            break
        if group and group_inputs == inputs[0] and group_outputs == outputs[0]:
            break  # a runtime that ignores shape_group answers group 0 for every g
        inputs.append(group_inputs)
        outputs.append(group_outputs)
    if not inputs:
        raise SessionError("axengine session reports no shape group")
    return inputs, outputs


def check_group_counts(name: str, inputs: list[list[TensorSpec]], outputs: list[list[TensorSpec]]) -> None:
    """Every group must have group 0's number of inputs and outputs (pyaxengine's C arrays have that length)."""
    for kind, groups in (("inputs", inputs), ("outputs", outputs)):
        for group, specs in enumerate(groups):
            if len(specs) != len(groups[0]):
                raise AxEngineUnsupported(
                    f"{name}: shape group {group} has {len(specs)} {kind}, group 0 has {len(groups[0])}: pyaxengine"
                    f" allocates one buffer per tensor of group 0 and would index past them (a C array, unchecked)")


def _nbytes(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape)) * spec.dtype.itemsize


def _buffer_sizes(raw: Any, specs: list[list[TensorSpec]], kind: str) -> list[int]:
    """pyaxengine's buffer size per tensor index: its own nSize when visible, else the largest group's tensor."""
    try:
        buffers = getattr(raw._sess._io[0], f"p{kind}s")
        return [int(buffers[i].nSize) for i in range(len(specs[0]))]
    except (AttributeError, IndexError, TypeError):  # AXCLRT, or another layout: what the graph says
        return [max(_nbytes(group[i]) for group in specs) for i in range(len(specs[0]))]


class AxEngineSession(ShapeGroups):
    """The `Session` interface over one `axengine.InferenceSession`.

    Contract (npu/session.py): `run` takes every input of the group with its exact
    shape and dtype (checked here, with an error naming the tensor, before axengine's
    bare assert) and returns the outputs in `outputs(group)` order. Fed arrays are
    passed through untouched: a KV cache view is copied once, by axengine into CMM,
    never staged on the host first. Open sessions with `open_session`, not directly,
    so each graph gets one session per process.
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None, provider: str = "auto",
                 device_id: int = 0) -> None:
        self.runtime = import_axengine()
        self.path = Path(path)
        self.name = name or self.path.stem
        providers, options = choose_provider(provider, device_id, list(self.runtime.module.get_available_providers()))
        self.provider = providers[0]
        self.device_id = device_id
        try:
            empty = self.path.stat().st_size == 0
        except OSError as exc:
            raise AxEngineUnsupported(f"{self.name}: cannot read {self.path}: {exc.strerror or exc}") from exc
        if empty:
            raise AxEngineUnsupported(f"{self.name}: {self.path} is empty (0 bytes): the copy or download was cut"
                                      " short; copy the model's files to the board again")
        try:
            with quiet(self.name) as lines:
                self._session = self.runtime.module.InferenceSession(str(self.path), providers=providers,
                                                                     provider_options=options)
        except Exception as exc:  # axengine raises RuntimeError/ValueError/AssertionError alike
            self.runtime.record(lines)
            raise AxEngineUnsupported(f"{self.name}: {self.path} with {self.provider}:"
                                      f" {explain_load_error(self.runtime, self.name, exc)}") from exc
        self.runtime.record(lines)
        self._inputs, self._outputs = read_shape_groups(self._session)
        check_group_counts(self.name, self._inputs, self._outputs)
        check_groups(self.runtime, self.name, self.num_groups)
        self.public_runs = 0
        self.traffic = DeviceTraffic()
        in_sizes = _buffer_sizes(self._session, self._inputs, "Input")
        out_sizes = _buffer_sizes(self._session, self._outputs, "Output")
        self.buffer_bytes = sum(in_sizes) + sum(out_sizes)  # CMM this session's IO buffers take
        on_board = self.provider == PROVIDER_BOARD  # AXCLRT copies to the card: no host cache to maintain
        self._flushed_per_run = sum(in_sizes) if on_board else 0
        self._invalidated_per_run = sum(out_sizes) if on_board else 0

    def run(self, feed: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]:
        check_feed(self, feed, group)
        try:
            # output_names=None: a subset list makes axengine pick outputs by the wrong index.
            if self.runtime.shape_groups:
                results = self._session.run(None, feed, shape_group=group)
            else:
                results = self._session.run(None, feed)
        except Exception as exc:
            raise SessionError(f"{self.name} group {group}: axengine run failed: {exc}") from exc
        self.public_runs += 1
        self.traffic.written += sum(array.nbytes for array in feed.values())
        self.traffic.flushed += self._flushed_per_run
        self.traffic.invalidated += self._invalidated_per_run
        specs = self._outputs[group]
        if len(results) != len(specs):
            raise SessionError(f"{self.name} group {group}: axengine returned {len(results)} outputs,"
                               f" graph has {len(specs)}")
        return list(results)

    @property
    def raw(self) -> Any:
        """The axengine.InferenceSession (for the zero-copy path's checks)."""
        return self._session

    def __repr__(self) -> str:
        return f"AxEngineSession({self.name}, {self.path}, {self.provider}, groups={self.num_groups})"


_OPEN: dict[tuple[str, str, int], AxEngineSession] = {}
_OPEN_LOCK = threading.Lock()


def open_session(path: str | os.PathLike, name: str | None = None, provider: str = "auto",
                 device_id: int = 0) -> AxEngineSession:
    """Return the process's one session for `path` (opened on first use, kept for the process).

    axengine never frees a session's CMM buffers, so opening a graph again per model
    load or per request would leak NPU memory until the board runs out.
    """
    key = (str(Path(path).resolve()), provider, int(device_id))
    with _OPEN_LOCK:
        session = _OPEN.get(key)
        if session is None:
            session = AxEngineSession(path, name=name, provider=provider, device_id=device_id)
            _OPEN[key] = session
        return session


def is_open(path: str | os.PathLike, provider: str = "auto", device_id: int = 0) -> bool:
    """Whether this process already holds a session (and so its CMM) for `path`."""
    with _OPEN_LOCK:
        return (str(Path(path).resolve()), provider, int(device_id)) in _OPEN


def open_session_count() -> int:
    """How many axengine sessions this process has opened (for tests and `vlmd bench`)."""
    with _OPEN_LOCK:
        return len(_OPEN)
