"""A strict stand-in for AXERA's `axengine` (pyaxengine), for tests only.

It follows AXERA-TECH/pyaxengine at 3554448 (2026-03-24, tag 0.1.3.rc3, the 2026-03 head:
axengine/__init__.py, _providers.py, _session.py, _base_session.py, _node.py, _axe.py,
_axe_capi.py, _axclrt.py), read from its source and written anew, not copied; older
releases are selectable with $VLMD_STANDIN_PYAXENGINE (see _release.py). What matches the
real package, module by module:

- import: providers from the libraries present (_providers.py); ImportError when there
  are none; `[INFO] Available providers: [...]` printed to stdout; the installed wheel's
  version answered by `importlib.metadata.version("axengine")` (_metadata.py); no
  `__version__` attribute, as the real package has none.
- `InferenceSession(path_or_bytes, sess_options=None, providers=None, provider_options=None)`
  (_session.py), `get_inputs(g)` / `get_outputs(g)` -> NodeArg(name, numpy dtype, shape as
  a LIST), the base class's off-by-one past the last group (_base_session.py).
- the board provider's internals (_axe.py, _axe_capi.py): one cached CMM buffer per input
  and output index shared by every shape group and sized for the largest, `_io[0].pInputs[i]`
  (`pVirAddr`, `phyAddr`, `nSize`), `sys_lib.AX_SYS_MflushCache` /
  `AX_SYS_MinvalidateCache`, `engine_lib.AX_ENGINE_RunGroupIOSync` through cffi-like
  handles; CMM bytes exist twice (host mapping, device memory) and only a flush or an
  invalidate moves them; `run()` memmoves every fed input, flushes whole buffers and
  invalidates whole outputs; `STATS` counts it all.
- `[INFO]` lines printed per session (provider, model type, compiler version) and on the
  first board session (chip type, VNPU type, engine version), all on stdout.

Stricter than the real one: unexpected input names raise ValueError. What a ".axmodel"
computes: _graphs.py (a reference graph of a checkpoint, or a synthetic one).
"""

from __future__ import annotations

from . import _metadata
from ._axe_capi import STATS  # noqa: F401
from ._providers import axclrt_provider_name, axengine_provider_name, get_all_providers, get_available_providers  # noqa: F401

_available_providers = get_available_providers()
if not _available_providers:
    raise ImportError(f"No providers found. Please make sure you have installed one of the following: {get_all_providers()}")
print("[INFO] Available providers: ", _available_providers)
_metadata.install()

from ._node import NodeArg  # noqa: E402,F401
from ._session import InferenceSession, SessionOptions  # noqa: E402,F401
