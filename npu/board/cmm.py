"""Device memory (CMM) on an AXERA board: how much is free, what a model needs, who holds it.

The NPU's buffers and every graph's weights live in CMM, a carve-out of the board's DRAM
that the kernel reports in `/proc/ax_proc/mem_cmm_info`. Its last line holds the totals,
e.g. ` total size=3145728KB(3072MB),used=18876KB(18MB + 444KB),remain=3126852KB(3053MB +
452KB),partition_number=1,block_number=13`; M5Stack's StackFlow parses the same line
(projects/llm_framework/main_sys/src/event_loop.cpp `get_mem_cmm_info`, and
main_vlm/src/runner/utils/ax_cmm_utils.hpp `get_remaining_cmm_size`, which greps for
"total size" and reads `remain=(\\d+)KB`; StackFlow d9084ba).

- `ax_proc_dir()`: `$VLMD_AX_PROC` or `/proc/ax_proc`; it exists exactly on a board whose
  AXERA kernel modules are loaded (so it also says "the board's NPU is here").
- `read_cmm_info()` -> `CmmInfo(total_kb, used_kb, remain_kb)` or None (not a board, or a
  file this parser does not understand).
- `estimate_model_kb(graph_files, io_bytes)`: the graph files' sizes (weights are copied
  into CMM when a graph is loaded) plus the IO buffers, in KiB; or the package's own
  `cmm_size` (M5Stack mode files declare it in KiB, e.g. 1674992 for
  internvl3-1B-448-ax630c).
- `check_fits(needed_kb, info, source)` raises `CmmError` naming the likely holder:
  M5Stack's StackFlow services keep their CMM for as long as they run once they have
  loaded a model (`running_holders()` names the ones running; unit names from
  StackFlow's tools/llm_pack.py, which installs `llm-<unit>.service` running
  `/opt/m5stack/bin/llm_<unit>-<version>`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from npu.errors import ModelError

AX_PROC_ENV = "VLMD_AX_PROC"
DEFAULT_AX_PROC = "/proc/ax_proc"
CMM_INFO = "mem_cmm_info"
# StackFlow units that load NPU models (and so hold CMM) or camera frame buffers.
STACKFLOW_NPU_UNITS = ("llm-vlm", "llm-llm", "llm-yolo", "llm-camera", "llm-depth-anything", "llm-whisper",
                       "llm-melotts", "llm-cosy-voice", "llm-asr", "llm-kws", "llm-tts", "llm-vad")
_TOTALS = re.compile(r"total size=(?P<total>\d+)KB.*?used=(?P<used>\d+)KB.*?remain=(?P<remain>\d+)KB")
_UNIT_COMM = re.compile(r"^llm_(?P<unit>[a-z_]+?)(?:-\d[\d.]*)?$")


class CmmError(ModelError):
    """The model does not fit in the free device memory; the message names what to stop."""


@dataclass(frozen=True)
class CmmInfo:
    total_kb: int
    used_kb: int
    remain_kb: int

    def describe(self) -> dict[str, int]:
        return {"total_kb": self.total_kb, "used_kb": self.used_kb, "remain_kb": self.remain_kb}


def ax_proc_dir() -> Path:
    return Path(os.environ.get(AX_PROC_ENV) or DEFAULT_AX_PROC)


def board_npu_present() -> bool:
    """True on an AXERA board (its kernel modules publish /proc/ax_proc), False on a PCIe host or a PC."""
    return ax_proc_dir().is_dir()


def parse_cmm_info(text: str) -> CmmInfo | None:
    """The totals line of mem_cmm_info (the last one that has them), or None."""
    for line in reversed(text.splitlines()):
        match = _TOTALS.search(line)
        if match:
            return CmmInfo(int(match["total"]), int(match["used"]), int(match["remain"]))
    return None


def read_cmm_info() -> CmmInfo | None:
    try:
        text = (ax_proc_dir() / CMM_INFO).read_text(errors="replace")
    except OSError:
        return None
    return parse_cmm_info(text)


def estimate_model_kb(graph_files: Iterable[Path], io_bytes: int = 0) -> int:
    """KiB a model takes in CMM: its graph files (weights and code) and its IO buffers."""
    total = sum(path.stat().st_size for path in graph_files if path.is_file()) + io_bytes
    return -(-total // 1024)


def running_holders(proc_root: Path = Path("/proc")) -> list[str]:
    """StackFlow units whose processes run now (from /proc/<pid>/comm), e.g. ["llm-vlm"]."""
    units = set()
    try:
        entries = list(proc_root.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        match = _UNIT_COMM.match(comm)
        if match:
            unit = "llm-" + match["unit"].replace("_", "-")
            if unit != "llm-sys":  # the manager itself loads no model
                units.add(unit)
    return sorted(units)


def check_fits(needed_kb: int, info: CmmInfo | None, source: str, holders: list[str] | None = None) -> None:
    """Raise CmmError when `needed_kb` (from `source`) exceeds the free CMM; None info = not a board."""
    if info is None or needed_kb <= info.remain_kb:
        return
    holders = running_holders() if holders is None else holders
    if holders:
        who = (f"running now: {', '.join(holders)}; stop them with `systemctl stop {' '.join(holders)}`"
               " (and `systemctl disable` to keep them stopped)")
    else:
        who = ("M5Stack's StackFlow services keep CMM once they have loaded a model: stop them with"
               f" `systemctl stop {' '.join(STACKFLOW_NPU_UNITS[:3])}` (see `systemctl list-units 'llm-*'`),"
               " or stop any other program using the NPU")
    raise CmmError(f"the model needs about {_size(needed_kb)} of device memory (CMM, {source}) but only"
                   f" {_size(info.remain_kb)} of {_size(info.total_kb)} are free; {who}")


def _size(kib: int) -> str:
    return f"{kib // 1024} MiB" if kib >= 10 * 1024 else f"{kib} KiB"
