"""Which pyaxengine release the stand-in behaves like, chosen by $VLMD_STANDIN_PYAXENGINE.

Each entry is a tag of AXERA-TECH/pyaxengine and what that release does differently,
read from its source (git tags and commits named below):

- "0.1.3.rc3" (default; 3554448, 2026-03-24, the 2026-03 head, setup.py version 0.1.3):
  `run(..., shape_group=0)`; outputs copied out of CMM; a subset of `output_names`
  fails indexing (`output_names.index(...)`, 108722c, 2025-12-04); `auto` lists the
  PCIe provider first only when /dev/axcl_host exists (3554448).
- "0.1.3.rc2" (64d8615, 2025-10-30, version 0.1.3): as above but a subset of
  `output_names` is honoured (outputs filtered by name) and `auto` lists the PCIe
  provider first whenever libaxcl_rt is found.
- "0.1.2rc0" (5a53f3f, 2025-03-03, version 0.1.2, the release that added shape groups in
  6bc2ac8): outputs are views of the CMM buffers, overwritten by the next run (copied
  from 87418a8, 2025-05-28, on).
- "0.1.1rc0" (dd98eb9, 2025-02-09, version 0.1.1): `run(output_names, input_feed,
  run_options=None)` has no `shape_group`: every run uses group 0's buffers and
  outputs are views sized by the whole buffer.

Read once at import, like the real package is what is installed: tests that emulate
another release import the stand-in afresh with the variable set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    tag: str
    version: str  # what setup.py says, so what `importlib.metadata.version("axengine")` reports
    shape_groups: bool
    copies_outputs: bool
    subset_outputs_fail: bool
    pcie_first_only_with_device: bool


RELEASES = {
    "0.1.3.rc3": Release("0.1.3.rc3", "0.1.3", True, True, True, True),
    "0.1.3.rc2": Release("0.1.3.rc2", "0.1.3", True, True, False, False),
    "0.1.2rc0": Release("0.1.2rc0", "0.1.2", True, False, False, False),
    "0.1.1rc0": Release("0.1.1rc0", "0.1.1", False, False, False, False),
}
DEFAULT = "0.1.3.rc3"


def current() -> Release:
    tag = os.environ.get("VLMD_STANDIN_PYAXENGINE", DEFAULT)
    if tag not in RELEASES:
        raise ImportError(f"VLMD_STANDIN_PYAXENGINE={tag!r}: the stand-in emulates {sorted(RELEASES)}")
    return RELEASES[tag]


RELEASE = current()
