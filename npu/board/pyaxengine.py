"""pyaxengine as it is installed: imported quietly, its version and abilities read once.

Facts from AXERA-TECH/pyaxengine's history (tags and commits):

- The version lives only in the wheel's metadata (setup.py `version=`; no `__version__`):
  0.1.1 (tag 0.1.1rc0, dd98eb9), 0.1.2 (5a53f3f, which added shape groups in 6bc2ac8:
  `run(..., shape_group=0)`), 0.1.3 (tags 0.1.3rc0 .. 0.1.3.rc3 = 3554448, the 2026-03
  head). 0.1.1's `run(output_names, input_feed, run_options=None)` has no shape_group, so
  a decoder layer's prefill groups cannot run: `shape_groups` is read from the signature.
- Boards whose libax_engine predates AX620E SDK 3.12 / AX650 SDK 2.18 report bf16 tensors
  as "unknown" and pyaxengine's `_transform_dtype` raises "Unsupported data type '0'." when
  a session opens (pyaxengine README since 0c655ac: update the SDK, or only
  libax_engine.so).
- It prints to stdout with Python's `print`: `[INFO] Available providers` on import (the
  2026-03 head; silenced only on the `frigate` branch, 007283a), `[INFO] Chip type`,
  `VNPU type` and `Engine version` when the board engine first loads, `[INFO] Using
  provider`, `Model type`, `Compiler version` (and `SOC Name` on AXCLRT) per session,
  `[WARNING] ...` lines. `quiet()` captures them at the file-descriptor level (the C
  libraries may print too), so none reach vlmd's stdout (`vlmd ask --json`, JSON logs);
  each line goes to the `npu.board.pyaxengine` logger at debug level.
- A full-core model is refused when the NPU runs in virtual-NPU mode (_axe.py at
  3554448, `AXEngineSession.__init__`): pyaxengine initialises the NPU in the mode
  `AX_ENGINE_GetVNPUAttr` reports, i.e. the mode of whichever program on the board
  initialised it first, and on MC20E (AX630C) allows only half-core models in
  VNPUType.ENABLED; on MC50 (AX650) only single-core models in ENABLED and no triple-core
  model in BIG_LITTLE / LITTLE_BIG. Its ValueError ("Model type '...' is not allowed when
  vnpu is inited as ...") names neither the cause nor the cure: `explain_load_error` does.
- `get_available_providers()` lists the PCIe provider first whenever libaxcl_rt exists
  (before 3554448) or when /dev/axcl_host exists (since): vlmd's `auto` does not follow
  it but takes the board's own NPU when /proc/ax_proc is there (`choose_provider`).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from npu.board.cmm import board_npu_present, running_holders
from npu.session import SessionError

log = logging.getLogger(__name__)

PROVIDER_BOARD = "AxEngineExecutionProvider"
PROVIDER_PCIE = "AXCLRTExecutionProvider"
# Short config names -> axengine provider names.
PROVIDER_ALIASES = {"axengine": PROVIDER_BOARD, "axclrt": PROVIDER_PCIE, PROVIDER_BOARD: PROVIDER_BOARD,
                    PROVIDER_PCIE: PROVIDER_PCIE}
FIRST_WITH_SHAPE_GROUPS = "0.1.2"
UNKNOWN_DTYPE = "Unsupported data type"
BF16_ADVICE = ("update the board's BSP/SDK to AX620E SDK >= 3.12 (AX630C: M5Stack Module LLM, LLM630) or AX650"
               " SDK >= 2.18, or only its libax_engine.so (pyaxengine's README)")

# pyaxengine 3554448 _axe.py: f"Model type '{model_type}' is not allowed when vnpu is inited as {vnpu_type}."
_VNPU_REFUSAL = re.compile(r"Model type '(?:ModelType\.)?(?P<model>\w+)' is not allowed when vnpu is inited as"
                           r" (?:VNPUType\.)?(?P<vnpu>\w+)")

_capture_lock = threading.Lock()


class AxEngineUnavailable(SessionError):
    """axengine cannot be imported here (not a board, or no provider installed)."""


class AxEngineUnsupported(SessionError):
    """The installed pyaxengine or libax_engine cannot run these graphs; the message says what to update."""


@dataclass
class AxEngineRuntime:
    """The imported module and what it can do."""

    module: Any
    version: str | None  # the wheel's version, None when no metadata is installed
    shape_groups: bool  # InferenceSession.run takes shape_group
    printed: list[str] = field(default_factory=list)  # every line it printed so far

    @property
    def engine_version(self) -> str | None:
        """libax_engine's version, from its `[INFO] Engine version: ...` line (board provider only)."""
        for line in self.printed:
            if "Engine version:" in line:
                return line.split("Engine version:", 1)[1].strip()
        return None

    def describe(self) -> dict[str, Any]:
        return {"pyaxengine": self.version, "shape_groups": self.shape_groups, "engine_version": self.engine_version,
                "providers": list(self.module.get_available_providers())}

    def record(self, lines: list[str]) -> None:
        self.printed.extend(lines)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no libc symbol table (unusual platforms): Python's own capture still works
        pass


@contextlib.contextmanager
def quiet(source: str) -> Iterator[list[str]]:
    """Capture what is printed inside the block (Python's stdout and fd 1); log it at debug.

    The list yielded is filled when the block ends. Process-wide (file descriptor 1), so
    it is held under a lock; vlmd opens graphs at model load, before it serves.
    """
    lines: list[str] = []
    with _capture_lock:
        sys.stdout.flush()
        python_out = io.StringIO()
        try:
            saved_fd = os.dup(1)
        except OSError:
            saved_fd = None
        sink = tempfile.TemporaryFile()
        try:
            if saved_fd is not None:
                os.dup2(sink.fileno(), 1)
            with contextlib.redirect_stdout(python_out):
                yield lines
        finally:
            _flush_c_stdio()
            if saved_fd is not None:
                os.dup2(saved_fd, 1)
                os.close(saved_fd)
            sink.seek(0)
            text = python_out.getvalue() + sink.read().decode("utf-8", errors="replace")
            sink.close()
            lines.extend(line.rstrip() for line in text.splitlines() if line.strip())
            for line in lines:
                log.debug("pyaxengine (%s): %s", source, line)


_RUNTIME: AxEngineRuntime | None = None
_RUNTIME_LOCK = threading.Lock()


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("axengine")
    except importlib.metadata.PackageNotFoundError:
        return None


def _takes_shape_group(module: Any) -> bool:
    try:
        return "shape_group" in inspect.signature(module.InferenceSession.run).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def import_axengine() -> AxEngineRuntime:
    """Import axengine once (quietly) and read what it is; AxEngineUnavailable when it cannot be."""
    global _RUNTIME
    module = sys.modules.get("axengine")
    with _RUNTIME_LOCK:
        if _RUNTIME is not None and _RUNTIME.module is module:
            return _RUNTIME
        try:
            with quiet("import") as lines:
                import axengine  # noqa: PLC0415 - optional, board-only dependency
        except ImportError as exc:
            raise AxEngineUnavailable(
                f"axengine is not importable ({exc}); on the board install AXERA's pyaxengine wheel,"
                " or use backend 'reference' on a development machine") from exc
        _RUNTIME = AxEngineRuntime(axengine, _installed_version(), _takes_shape_group(axengine), list(lines))
        return _RUNTIME


def check_groups(runtime: AxEngineRuntime, name: str, num_groups: int) -> None:
    """A graph with prefill groups needs a pyaxengine whose run() selects the group."""
    if num_groups > 1 and not runtime.shape_groups:
        version = runtime.version or "of unknown version"
        raise AxEngineUnsupported(
            f"pyaxengine {version} has no shape groups (its InferenceSession.run takes no shape_group) but {name}"
            f" has {num_groups}: install pyaxengine >= {FIRST_WITH_SHAPE_GROUPS} (AXERA-TECH/pyaxengine releases)")


def explain_load_error(runtime: AxEngineRuntime, name: str, exc: BaseException) -> str:
    """What a failed InferenceSession means, and what to do about it."""
    if UNKNOWN_DTYPE in str(exc):
        engine = runtime.engine_version or "unknown"
        return (f"this board's libax_engine (engine version {engine}) cannot report bf16 tensors (pyaxengine: {exc}):"
                f" {BF16_ADVICE}")
    refused = _VNPU_REFUSAL.search(str(exc))
    if refused:
        return explain_vnpu(refused["model"], refused["vnpu"], str(exc))
    return f"axengine could not load it: {exc}"


def explain_vnpu(model_type: str, vnpu: str, original: str, holders: list[str] | None = None) -> str:
    """Why a model of `model_type` cores cannot run in NPU mode `vnpu`, and what to do."""
    holders = running_holders() if holders is None else holders
    who = (f"running now: {', '.join(holders)}; stop them with `systemctl stop {' '.join(holders)}`" if holders else
           "M5Stack's StackFlow services (`systemctl list-units 'llm-*'`) or any other program using the NPU")
    return (f"the NPU was initialised in virtual-NPU mode ({vnpu}) by another program on this board, and a"
            f" {model_type.lower()}-core model cannot run in that mode (pyaxengine: {original}); the mode is the one"
            f" of the first program that initialised the NPU: stop the other NPU users ({who}), then load the model"
            " again (if the mode stays, reboot the board before starting vlmd), or use a build of the model compiled"
            " for the virtual NPU (half-core on AX630C, single-core on AX650)")


def choose_provider(provider: str, device_id: int, available: list[str],
                    board_npu: bool | None = None) -> tuple[list[str], list[dict] | None]:
    """Map a config provider choice to `(providers, provider_options)` for InferenceSession.

    `auto` takes the board's own NPU when it is present (/proc/ax_proc), else the PCIe
    card, whatever order pyaxengine lists them in. `device_id` selects the card and only
    applies to the AXCLRT provider.
    """
    if not available:
        raise AxEngineUnavailable("axengine reports no available execution provider")
    if provider == "auto":
        board_npu = board_npu_present() if board_npu is None else board_npu
        if PROVIDER_BOARD in available and (board_npu or PROVIDER_PCIE not in available):
            name = PROVIDER_BOARD
        elif PROVIDER_PCIE in available:
            name = PROVIDER_PCIE
        else:
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
