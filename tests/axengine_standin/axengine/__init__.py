"""A strict stand-in for AXERA's `axengine` (pyaxengine), for tests only.

Same module surface as the real package (AXERA-TECH/pyaxengine: axengine/__init__.py,
_session.py, _base_session.py, _axe.py, _axclrt.py, _node.py, _providers.py), written
from its documented behaviour, not copied:

- `get_available_providers()`: from $VLMD_STANDIN_PROVIDERS (comma-separated), default
  the board provider; importing fails with ImportError when it is empty, like the real one.
- `InferenceSession(path_or_bytes, sess_options=None, providers=None, provider_options=None)`:
  provider choice as the real one (a name, or a list of names / (name, options) tuples;
  `device_id` from the first provider_options dict on the PCIe provider).
- `get_inputs(shape_group=0)` / `get_outputs(shape_group=0)` -> `NodeArg(name, dtype, shape)`;
  a group past the last raises ValueError, the group just past it IndexError (the real
  base class's off-by-one). Shapes are tuples on the board provider, lists on AXCLRT.
- `run(output_names, input_feed, run_options=None, shape_group=0)`: missing inputs ->
  ValueError; an unknown output name -> ValueError; a subset of output names -> the real
  ValueError from indexing (a permuted full list reorders outputs as the real one does);
  each input's exact shape and dtype asserted (a uint16 view of bf16 fails); stricter than
  the real one, unexpected input names raise ValueError too. Every input is copied into a
  private buffer ("CMM") and counted in `STATS`, outputs are fresh copies.

A stand-in ".axmodel" is a small JSON file:
`{"format": "vlmd-axengine-standin/1", "checkpoint": DIR, "graph": "vision" | "layer<i>" | "post",
  "precision": "bf16" | "fp32", "kv_capacity": N, "prefill_chunk": N, "history_groups": N,
  "post_topk": K (optional)}`; the graph is the reference graph H1 builds from DIR. Optional
build keys, as published builds differ: "history_lengths" [128, 256, ...] (Pulsar2's
`--last_kv_cache_len` list, instead of history_groups), "placeholder" "hidden" | "kv_dim"
(group 1's K/V placeholder width), "vision_input" "uint8_nhwc" | "float32_nchw",
"vision_output" "bf16" | "fp32" (npu.reference.build_reference_sessions).
"""

from __future__ import annotations

from ._providers import axclrt_provider_name, axengine_provider_name, get_all_providers, get_available_providers  # noqa: F401
from ._session import STATS, InferenceSession, NodeArg, SessionOptions  # noqa: F401

if not get_available_providers():
    raise ImportError(f"No providers found. Please make sure you have installed one of the following: {get_all_providers()}")
