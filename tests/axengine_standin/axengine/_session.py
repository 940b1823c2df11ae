"""InferenceSession (stand-in for axengine/_session.py): choose a provider, dispatch to it.

As the real one: `providers` None takes the first available provider; a name must be
available (ValueError otherwise); a list takes the first available entry, names or
(name, options) tuples, and prints a `[WARNING]` for the unavailable ones. It prints
`[INFO] Using provider: ...` to stdout, then the provider's session does the work
(`provider_options` is passed through as given). `run` has `shape_group` from 0.1.2 on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._base_session import SessionOptions
from ._node import NodeArg
from ._providers import axclrt_provider_name, axengine_provider_name, get_available_providers
from ._release import RELEASE


class InferenceSession:
    def __init__(self, path_or_bytes: Any, sess_options: SessionOptions | None = None, providers: Any = None,
                 provider_options: Any = None, **kwargs: Any) -> None:
        self._sess = None
        self._sess_options = sess_options
        self._provider = None
        self._provider_options = None
        self._available_providers = get_available_providers()
        if providers is None:
            self._provider = self._available_providers[0]
        elif isinstance(providers, str):
            if providers not in self._available_providers:
                raise ValueError(f"Selected provider: '{providers}' is not available.")
            self._provider = providers
        elif isinstance(providers, list):
            unavailable = []
            for p in providers:
                assert isinstance(p, (str, tuple)), f"Invalid provider type: {type(p)}. Must be str or tuple."
                name = p if isinstance(p, str) else p[0]
                if name not in self._available_providers:
                    unavailable.append(name)
                elif self._provider is None:
                    self._provider = name
                    if isinstance(p, tuple):
                        self._provider_options = p[1]
            if unavailable:
                if self._provider is None:
                    raise ValueError(f"Selected provider(s): {unavailable} is(are) not available.")
                print(f"[WARNING] Selected provider(s): {unavailable} is(are) not available.")
        if self._provider is None:
            raise ValueError(f"No available provider found in {providers}.")
        print(f"[INFO] Using provider: {self._provider}")
        if self._provider == axclrt_provider_name:
            from ._axclrt import AXCLRTSession

            self._sess = AXCLRTSession(path_or_bytes, sess_options, provider_options, **kwargs)
        if self._provider == axengine_provider_name:
            from ._axe import AXEngineSession

            self._sess = AXEngineSession(path_or_bytes, sess_options, provider_options, **kwargs)
        if self._sess is None:
            raise RuntimeError(f"Create session failed with provider: {self._provider}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        return False

    def get_session_options(self):
        return self._sess_options

    def get_providers(self):
        return self._provider

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        return self._sess.get_inputs(shape_group)

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        return self._sess.get_outputs(shape_group)

    if RELEASE.shape_groups:
        def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray], run_options=None,
                shape_group: int = 0) -> list[np.ndarray]:
            return self._sess.run(output_names, input_feed, run_options, shape_group)
    else:
        def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray],
                run_options=None) -> list[np.ndarray]:
            return self._sess.run(output_names, input_feed, run_options)
