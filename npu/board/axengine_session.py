"""`AxEngineSession`: one compiled `.axmodel` graph run through AXERA's `axengine`.

axengine (the pyaxengine wheel from AXERA's releases) exists only on a board or a
host with an AXCL card; it is imported when a session is opened, never at module
import, so development machines load this module fine.

What this module relies on, read from AXERA-TECH/pyaxengine (axengine/_session.py,
_base_session.py, _axe.py, _axclrt.py, _node.py, _providers.py, _utils.py):

- `InferenceSession(path_or_bytes, sess_options=None, providers=None,
  provider_options=None)`; `providers` is a name or a list; the AXCLRT provider reads
  `device_id` from the first `provider_options` dict.
- `get_available_providers()` lists what the installed libraries support, the PCIe
  provider first when /dev/axcl_host exists; importing axengine raises ImportError
  when there is none.
- `get_inputs(shape_group)` / `get_outputs(shape_group)` return `NodeArg(name, dtype,
  shape)`; dtype is a numpy dtype (bf16 as `ml_dtypes.bfloat16`), shape a tuple (AXE)
  or a list (AXCLRT). There is no public group count: a group past the last one
  raises (ValueError or IndexError, depending on how far past).
- `run(output_names, input_feed, run_options=None, shape_group=0)` returns a list of
  fresh arrays in graph order. It checks only that group 0's input names are present
  and asserts each fed array's shape and dtype; it memmoves every fed input into its
  CMM buffer on every call (so the bytes fed are the bytes copied), and with a subset
  of `output_names` it indexes outputs by the wrong list: always pass None.
- A session allocates its input/output buffers in CMM (AX_SYS_MemAllocCached) and its
  unload destroys the engine handle but never frees them, so a session re-created per
  load or per request leaks NPU memory: sessions are opened once per graph per process
  (`open_session`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from npu.session import BF16, SessionError, ShapeGroups, TensorSpec, check_feed

PROVIDER_BOARD = "AxEngineExecutionProvider"
PROVIDER_PCIE = "AXCLRTExecutionProvider"
# Short config names -> axengine provider names; "auto" takes axengine's own first choice.
PROVIDER_ALIASES = {"axengine": PROVIDER_BOARD, "axclrt": PROVIDER_PCIE, PROVIDER_BOARD: PROVIDER_BOARD,
                    PROVIDER_PCIE: PROVIDER_PCIE}
# More shape groups than any llm_build output has; stops the probe on a runtime that ignores shape_group.
MAX_SHAPE_GROUPS = 64


class AxEngineUnavailable(SessionError):
    """axengine cannot be imported here (not a board, or no provider installed)."""


def import_axengine() -> Any:
    """Import axengine or raise AxEngineUnavailable with what to install."""
    try:
        import axengine  # noqa: PLC0415 - optional, board-only dependency
    except ImportError as exc:
        raise AxEngineUnavailable(
            f"axengine is not importable ({exc}); on the board install AXERA's pyaxengine wheel,"
            " or use backend 'reference' on a development machine"
        ) from exc
    return axengine


def provider_arguments(provider: str, device_id: int, available: list[str]) -> tuple[list[str], list[dict] | None]:
    """Map a config provider choice to `(providers, provider_options)` for InferenceSession.

    `provider` is "auto", "axengine", "axclrt" or a full provider name. `device_id`
    selects the PCIe card and only applies to the AXCLRT provider.
    """
    if not available:
        raise AxEngineUnavailable("axengine reports no available execution provider")
    if provider == "auto":
        name = available[0]
    elif provider in PROVIDER_ALIASES:
        name = PROVIDER_ALIASES[provider]
    else:
        raise SessionError(f"unknown provider {provider!r}: use auto, axengine, axclrt,"
                           f" {PROVIDER_BOARD} or {PROVIDER_PCIE}")
    if name not in available:
        raise AxEngineUnavailable(f"provider {name} is not available here (axengine offers {available})")
    if device_id < 0:
        raise SessionError(f"device_id must be >= 0, got {device_id}")
    options = [{"device_id": int(device_id)}] if name == PROVIDER_PCIE else None
    return [name], options


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
        axengine = import_axengine()
        self.path = Path(path)
        self.name = name or self.path.stem
        providers, options = provider_arguments(provider, device_id, list(axengine.get_available_providers()))
        self.provider = providers[0]
        self.device_id = device_id
        try:
            self._session = axengine.InferenceSession(str(self.path), providers=providers, provider_options=options)
        except Exception as exc:  # axengine raises RuntimeError/ValueError/AssertionError alike
            raise SessionError(f"{self.name}: axengine could not load {self.path} with {self.provider}: {exc}") from exc
        self._inputs, self._outputs = read_shape_groups(self._session)

    def run(self, feed: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]:
        check_feed(self, feed, group)
        try:
            # output_names=None: a subset list makes axengine pick outputs by the wrong index.
            results = self._session.run(None, feed, shape_group=group)
        except Exception as exc:
            raise SessionError(f"{self.name} group {group}: axengine run failed: {exc}") from exc
        specs = self._outputs[group]
        if len(results) != len(specs):
            raise SessionError(f"{self.name} group {group}: axengine returned {len(results)} outputs,"
                               f" graph has {len(specs)}")
        return list(results)

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


def open_session_count() -> int:
    """How many axengine sessions this process has opened (for tests and `vlmd bench`)."""
    with _OPEN_LOCK:
        return len(_OPEN)
