"""Provider names and availability (stand-in for axengine/_providers.py).

The real module looks for the libraries with `ctypes.util.find_library` at import; the
stand-in reads which ones "exist" from $VLMD_STANDIN_LIBS (comma-separated, of `ax_engine`
and `axcl_rt`; default `ax_engine`, a board) and whether `/dev/axcl_host` exists from
$VLMD_STANDIN_AXCL_HOST (`1`: a PCIe host). The order follows the emulated release
(_release.py): since 3554448 the PCIe provider comes first only on a PCIe host, before
it whenever libaxcl_rt is there. `$VLMD_STANDIN_PROVIDERS` (comma-separated names)
overrides everything, for tests that want an exact list.
"""

from __future__ import annotations

import os

from ._release import RELEASE

axengine_provider_name = "AxEngineExecutionProvider"
axclrt_provider_name = "AXCLRTExecutionProvider"


def get_all_providers() -> list[str]:
    return [axengine_provider_name, axclrt_provider_name]


def get_available_providers() -> list[str]:
    """Read per call (the real list is fixed at import) so one imported stand-in serves many tests."""
    explicit = os.environ.get("VLMD_STANDIN_PROVIDERS")
    if explicit is not None:
        return [name.strip() for name in explicit.split(",") if name.strip()]
    libs = {name.strip() for name in os.environ.get("VLMD_STANDIN_LIBS", "ax_engine").split(",") if name.strip()}
    has_engine, has_axcl = "ax_engine" in libs, "axcl_rt" in libs
    on_pcie_host = os.environ.get("VLMD_STANDIN_AXCL_HOST") == "1"
    if has_engine and has_axcl:
        pcie_first = on_pcie_host if RELEASE.pcie_first_only_with_device else True
        return [axclrt_provider_name, axengine_provider_name] if pcie_first else \
            [axengine_provider_name, axclrt_provider_name]
    if has_axcl:
        return [axclrt_provider_name]
    if has_engine:
        return [axengine_provider_name]
    return []
