"""Provider names and availability (stand-in for axengine/_providers.py)."""

from __future__ import annotations

import os

axengine_provider_name = "AxEngineExecutionProvider"
axclrt_provider_name = "AXCLRTExecutionProvider"


def get_all_providers() -> list[str]:
    return [axengine_provider_name, axclrt_provider_name]


def get_available_providers() -> list[str]:
    """$VLMD_STANDIN_PROVIDERS (comma-separated) or the board provider; read per call so tests can vary it."""
    raw = os.environ.get("VLMD_STANDIN_PROVIDERS", axengine_provider_name)
    return [name.strip() for name in raw.split(",") if name.strip()]
